r"""Loss functions of the trainer: ``loss_fn(model, batch) -> per-sample losses``.

The trainer assumes nothing about a batch; the loss function does. The default is maximum
likelihood of a conditional flow on ``(x, y)`` pairs in bits per dimension,

.. math:: \ell_i = -\frac{\log q_\theta(x_i \mid y_i)}{D \ln 2},

(``model.bits_per_dim(x, y)``: the summary network, if any, maps ``y`` to the condition). Another
loss (reverse KL through ``model.inverse``, a physics-informed term, a weighting) is a function of
the same signature. On a decomposed model each per-sample value must be the *global* loss of the
sample, the same on every rank that shares it (a decomposed model's ``log_prob``/``bits_per_dim``
already sum the subdomains' parts).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor, nn

__all__ = ["LossFn", "bits_per_dim_loss", "flow_inputs"]

#: ``loss_fn(model, batch) -> Tensor`` of shape ``(local_batch,)``
LossFn = Callable[[nn.Module, Any], Tensor]


def _pair(batch: Any) -> tuple[Tensor, Optional[Tensor]]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(f"the default loss takes batches (x, y) (or a tensor x), got {type(batch).__name__}; "
                     "pass loss_fn (and drift_inputs) for batches of another kind")


def bits_per_dim_loss(model: nn.Module, batch: Any) -> Tensor:
    """Per-sample negative log-likelihood in bits per dimension of an ``(x, y)`` batch (``y``
    ``None`` or a lone tensor ``x`` for an unconditional flow).

    >>> import torch
    >>> from invnet.networks import ConditionalCouplingFlow
    >>> net = ConditionalCouplingFlow(2, 1, ndim=0, depth=1, hidden=4)
    >>> bits_per_dim_loss(net, (torch.randn(5, 2), torch.randn(5, 1))).shape
    torch.Size([5])
    """
    x, y = _pair(batch)
    return model.bits_per_dim(x, y)


def flow_inputs(model: nn.Module, batch: Any) -> tuple[nn.Module, Tensor, Optional[Tensor]]:
    """What the drift guard rebuilds for an ``(x, y)`` batch: the model, ``x`` and the condition
    the flow sees (``model.condition(y)``, the summary network's output if there is one)."""
    x, y = _pair(batch)
    condition = getattr(model, "condition", None)
    return model, x, (condition(y) if condition is not None and y is not None else y)
