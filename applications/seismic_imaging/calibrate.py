"""The sampling temperature of the seismic posterior, chosen on held-out simulations.

``--temperature auto`` (the default) simulates ``--calibration-pairs`` pairs from their own seed
(:data:`CALIBRATION_SEED`: neither the trainer's streams nor the test set's), samples them at
trial temperatures and keeps the one whose spread-to-error ratio equals a calibrated posterior's
(:func:`invnet.inference.temperature.calibrate_temperature`). The test set then measures the
result on pairs the choice never saw; the application reports the test figures at ``T = 1`` too,
so what the recalibration changed stays visible.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from invnet.inference import PosteriorSampler
from invnet.inference.temperature import TemperatureFit, calibrate_temperature

from .forward import simulate

__all__ = ["CALIBRATION_SEED", "choose_temperature"]

#: seed of the calibration pairs (the test pairs use 2; the trainer's streams are SeedSequences)
CALIBRATION_SEED = 3


def choose_temperature(checkpoint: str, arguments: dict, pairs: int, samples: int,
                       log: Optional[Callable[[str], None]] = None) -> TemperatureFit:
    """Simulate ``pairs`` held-out pairs (seed :data:`CALIBRATION_SEED`) and fit the temperature
    of the network in ``checkpoint`` on them with ``samples`` samples per observation."""
    x, y = simulate(pairs, torch.Generator().manual_seed(CALIBRATION_SEED), **arguments)
    sampler = PosteriorSampler.from_checkpoint(checkpoint)
    return calibrate_temperature(sampler, list(torch.as_tensor(x)), list(torch.as_tensor(y)), n_samples=samples,
                                 batch_size=min(64, samples), seed=CALIBRATION_SEED, log=log)
