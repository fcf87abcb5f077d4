"""The seismic forward operator (pylops post-stack modelling) and the simulator of the training pairs.

The forward model is ``d = W D m / 2 + noise``: the depth derivative of the log-impedance ``m``
(the normal-incidence reflectivity) convolved with a Ricker wavelet, plus white noise. It costs
well under a millisecond per section, so training draws fresh pairs for every batch
(:func:`simulate`, the ``[data] source`` of the configs) instead of reading a fixed file.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import torch

from .earth_models import earth_models

__all__ = ["poststack_operator", "observe", "standardization", "simulate", "to_log_impedance"]

#: prior draws that fix the standardisation of a shape (a fixed seed: the same numbers in every process)
_MOMENT_DRAWS, _MOMENT_SEED = 1024, 20261201


@functools.lru_cache(maxsize=8)
def poststack_operator(shape: tuple[int, ...], f0: float = 30.0, dt: float = 0.004) -> Any:
    """pylops ``PoststackLinearModelling``: d = W D m / 2 for log-impedance m on ``shape``
    (time first), Ricker wavelet of peak frequency ``f0`` Hz sampled every ``dt`` s (at most
    60 ms long, and shorter than half the trace). Built once per shape and process."""
    from pylops.avo.poststack import PoststackLinearModelling
    from pylops.utils.wavelets import ricker

    half = min(int(0.06 / dt), shape[0] // 2 - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pylops notes that it drops one sample of the time axis
        wav, _, _ = ricker(np.arange(half + 1) * dt, f0=f0)
    spat = shape[1:] if len(shape) > 1 else None
    return PoststackLinearModelling(wav, nt0=shape[0], spatdims=spat)


def observe(models: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Noisy post-stack data for models ``(n, 1, *shape)``: ``d = F m + noise * e``, ``e ~ N(0, I)``.

    >>> from .earth_models import earth_models
    >>> observe(earth_models(2, (16, 8), seed=0), 0.02, np.random.default_rng(0)).shape
    (2, 1, 16, 8)
    """
    n, shape = models.shape[0], tuple(models.shape[2:])
    # the operator acts on every trace (time axis) alone: the batch is one section of n x lateral traces
    traces = np.moveaxis(models[:, 0].reshape(n, shape[0], -1), 1, 0).reshape(shape[0], -1)
    op = poststack_operator((shape[0], traces.shape[1]))
    clean = np.moveaxis((op @ traces.ravel()).reshape(shape[0], n, -1), 0, 1).reshape((n, 1) + shape)
    return clean + noise * rng.normal(size=clean.shape)


@functools.lru_cache(maxsize=8)
def standardization(shape: tuple[int, ...], noise: float) -> tuple[float, float, float]:
    """``(x_mean, x_std, y_std)``: the prior's log-impedance mean and standard deviation over all
    points, and the data's standard deviation (its mean is zero: the wavelet has none), from
    1024 prior draws with a fixed seed. The simulator divides by them so that the network sees
    numbers of order one (a simulated source is not normalised by the trainer)."""
    rng = np.random.default_rng(_MOMENT_SEED)
    models = earth_models(_MOMENT_DRAWS, shape, seed=int(rng.integers(2**62)))
    data = np.concatenate([observe(models[i:i + 64], noise, rng) for i in range(0, len(models), 64)])  # batch-sized
    return float(models.mean()), float(models.std()), float(data.std())


def simulate(n: int, generator: torch.Generator, shape: list[int] = (32, 32), noise: float = 0.02
             ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` fresh pairs (standardised log-impedance ``x``, standardised data ``y``), each
    ``(n, 1, *shape)`` float32: earth models from the prior (:mod:`.earth_models`), data from
    :func:`observe`; the simulator of ``[data] source = "applications.seismic_imaging:simulate"``
    (its keyword arguments are the config's ``[data] arguments``). All randomness comes from
    ``generator``, so a resumed run draws the batches an uninterrupted one would. Physical units:
    ``m = x_mean + x_std * x`` (:func:`to_log_impedance`), ``d = y_std * y``
    (:func:`standardization`).

    >>> x, y = simulate(2, torch.Generator().manual_seed(0), shape=[16, 8])
    >>> x.shape, y.shape, x.dtype
    ((2, 1, 16, 8), (2, 1, 16, 8), dtype('float32'))
    >>> bool((simulate(2, torch.Generator().manual_seed(0), shape=[16, 8])[1] == y).all())
    True
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 4:
        raise ValueError(f"shape must be 2 or 3 sizes of at least 4 (depth first), got {list(shape)}")
    if not noise >= 0:
        raise ValueError(f"noise must be non-negative, got {noise}")
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    models = earth_models(n, shape, seed=int(rng.integers(2**62)))
    data = observe(models, noise, rng)
    x_mean, x_std, y_std = standardization(shape, float(noise))
    return ((models - x_mean) / x_std).astype(np.float32), (data / y_std).astype(np.float32)


def to_log_impedance(x: np.ndarray, shape: list[int], noise: float = 0.02) -> np.ndarray:
    """Standardised ``x`` (as :func:`simulate` returns it) back in log-impedance."""
    x_mean, x_std, _ = standardization(tuple(int(s) for s in shape), float(noise))
    return x_mean + x_std * np.asarray(x)
