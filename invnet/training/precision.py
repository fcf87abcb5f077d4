"""The arithmetic a job trains and samples in: one ``precision`` setting.

=============  ======================  ==================================  ==============
precision      parameters (master)     conditioners (inside couplings)     loss scaling
=============  ======================  ==================================  ==============
``float32``    float32                 float32                             no
``bfloat16``   float32                 bfloat16 (``torch.autocast``)       no
``float16``    float32                 float16 (``torch.autocast``)        ``GradScaler``
``float64``    float64                 float64                             no
=============  ======================  ==================================  ==============

Under autocast the invertible arithmetic (affine maps, logdets, ActNorm, 1x1 convolutions and
their inverses) stays in float32 and only the conditioners run in low precision; the memory-free
backward rebuilds under the autocast state its forward ran in (the engine's mixed-precision
bridge, docs/precision.md). ``float16``'s narrow range needs loss scaling; ``bfloat16``'s does not.
Older configs and checkpoints say ``dtype = "float32"``/``"float64"``: the same two names.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch
from torch import nn

__all__ = ["PRECISIONS", "Precision"]

#: the precision names a config may use
PRECISIONS = ("float32", "bfloat16", "float16", "float64")

_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """One of :data:`PRECISIONS` and what it implies.

    >>> p = Precision("bfloat16")
    >>> p.parameter_dtype, p.autocast_dtype, p.grad_scaler(torch.device("cpu")) is None
    (torch.float32, torch.bfloat16, True)
    >>> with p.autocast(torch.device("cpu")):
    ...     torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype
    torch.bfloat16
    """

    name: str = "float32"

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.name!r}")

    @property
    def parameter_dtype(self) -> torch.dtype:
        """The dtype of the parameters (the master weights the optimizer updates) and of the data."""
        return torch.float64 if self.name == "float64" else torch.float32

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The conditioners' dtype under autocast (``None``: no autocast)."""
        return _AUTOCAST.get(self.name)

    def autocast(self, device: torch.device) -> ContextManager:
        """The autocast region a forward pass (training, validation, sampling) runs in."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def grad_scaler(self, device: torch.device) -> Optional[torch.amp.GradScaler]:
        """A loss scaler for float16 (``None`` otherwise)."""
        return torch.amp.GradScaler(device.type) if self.name == "float16" else None

    @classmethod
    def of_model(cls, model: nn.Module) -> Precision:
        """``float64`` for a model with float64 parameters, else ``float32``."""
        p = next(iter(model.parameters()), None)
        return cls("float64" if p is not None and p.dtype == torch.float64 else "float32")
