"""Read a trained super-resolution run for evaluation and sampling: :func:`load_run`.

Every run is an invnet run folder (checkpoints with safetensors weights, the network spec and the
data description). ``python -m applications.super_resolution`` trains :class:`~.model.SRFlow`
(``[model] type = "applications.super_resolution.model:SRFlow"``), rebuilt here from its spec.
The generic path, ``invnet train`` on a pairs file (``make_pairs.py`` + ``invnet_train.toml``), fits a
:class:`invnet.networks.ConditionalGlow` on whole high-resolution patches,
conditioned on an ``ImageSummary`` of the low-resolution input (the SRFlow layout), and writes
checkpoint directories (safetensors weights, the network spec, the data normalisation).
:class:`InvnetTrainModel` wraps such a checkpoint in the small interface that
:func:`applications.super_resolution.evaluate.evaluate` uses (``factor``, ``parameters()``,
``sample(y, n, temperature, generator)``), sampling through :class:`invnet.inference.PosteriorSampler`
in raw data units. It has no ``bits_per_dim``: its density is over whole images, not over the
detail coefficients of ``model.py``, so the two test NLLs would not compare.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from invnet.inference import PosteriorSampler
from invnet.training.checkpoint import resolve_checkpoint

from .data import check_arguments
from .model import SRFlow

__all__ = ["SRFLOW_TYPE", "InvnetTrainModel", "is_invnet_checkpoint", "load_run"]

#: the ``[model] type`` of this application's own model
SRFLOW_TYPE = "applications.super_resolution.model:SRFlow"


def is_invnet_checkpoint(path: str) -> bool:
    """Whether ``path`` is an invnet checkpoint or run directory."""
    if not os.path.isdir(path):
        return False
    try:
        resolve_checkpoint(path)
    except (ValueError, FileNotFoundError):
        return False
    return True


class InvnetTrainModel:
    """A super-resolution model from an ``invnet train`` checkpoint (see the module docstring).

    Args:
        path: a checkpoint directory, or the run's ``out_dir`` (its latest checkpoint is used).
        device: where to run the network.
    """

    def __init__(self, path: str, device: str | torch.device = "cpu") -> None:
        self.sampler = PosteriorSampler.from_checkpoint(path)  # reads the weights once
        path = resolve_checkpoint(path)
        with open(os.path.join(path, "meta.json")) as f:  # the checkpoint's small JSON part
            meta = json.load(f)
        data = meta.get("data") or {}
        x_shape, y_shape = data.get("x_shape"), data.get("y_shape")
        if not x_shape or not y_shape or len(x_shape) != 3 or len(y_shape) != 3:
            raise ValueError(
                f"{path} was not trained on images: expected x and y of shape (channels, H, W), "
                f"got x {x_shape} and y {y_shape}"
            )
        factor = x_shape[-1] // y_shape[-1]
        if factor < 2 or x_shape[-1] != factor * y_shape[-1] or x_shape[-2] != factor * y_shape[-2]:
            raise ValueError(f"{path}: x {x_shape} is not an integer upscaling of y {y_shape}")
        self.path = path
        self.step = int(meta["step"])
        self.factor = factor
        self.channels = int(x_shape[0])
        self.sampler.model.to(device)
        self.device = torch.device(device)
        #: the held-out set the evaluation uses (:func:`~.data.held_out_images`): scikit-image
        #: patches of the size the network was trained on (make_pairs.py draws from the same images)
        self.data_arguments = {"source": "skimage", "factor": factor, "patch": int(x_shape[-1])}

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.sampler.model.parameters()

    def sample(self, y: Tensor, n: int = 1, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` candidates per low-resolution input, shape ``(n, N, C, factor H, factor W)``."""
        if y.dim() != 4 or y.shape[1] != self.channels:
            raise ValueError(f"y must have shape (N, {self.channels}, H, W), got {tuple(y.shape)}")
        out = [self.sampler.sample(n, yi.to(self.device), temperature, generator) for yi in y]
        return torch.stack(out, dim=1)


def load_run(path: str, device: str | torch.device = "cpu") -> tuple[SRFlow | InvnetTrainModel, dict]:
    """The model of a run folder or checkpoint ``path`` (in eval mode, on ``device``) and the
    ``[data] arguments`` of :func:`~.data.simulate` that describe its images (for
    :func:`~.data.held_out_images`). Raises ``ValueError`` for anything else (e.g. a ``.pt`` file
    of the application's former training loop, whose format is gone: retrain)."""
    if not is_invnet_checkpoint(path):
        raise ValueError(f"{path!r} is not an invnet run folder or checkpoint (train one with "
                         "`python -m applications.super_resolution`)")
    ckpt = resolve_checkpoint(path)
    with open(os.path.join(ckpt, "meta.json")) as f:
        meta = json.load(f)
    if (meta.get("spec") or {}).get("type") != SRFLOW_TYPE:
        model = InvnetTrainModel(ckpt, device)
        return model, model.data_arguments
    arguments = dict((meta.get("data") or {}).get("arguments") or {})
    check_arguments(**arguments)
    model = PosteriorSampler.from_checkpoint(ckpt, device=device).model.eval()
    return model, arguments
