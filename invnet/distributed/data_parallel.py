r"""Data parallelism: replicas on ranks, each with its own samples.

Parameters (and buffers) are broadcast from rank 0 at the start, ActNorm's data-dependent
initialisation sees the statistics of the global batch, and after each backward the gradients
are flattened into one buffer and summed over the ranks in a single allreduce, then scaled. With
equal local batches and a loss that is a mean over samples, the averaged gradient equals the
serial gradient of the concatenated batch:
:math:`\nabla \tfrac1{B}\sum_{i} \ell_i = \tfrac1{R}\sum_r \nabla \tfrac{R}{B}\sum_{i \in r} \ell_i`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from .comm import Communicator, default_comm

__all__ = ["broadcast_parameters", "allreduce_gradients", "use_global_statistics", "DataParallel"]


@torch.no_grad()
def broadcast_parameters(module: nn.Module, comm: Communicator, root: int = 0) -> None:
    """Overwrite every parameter and buffer of ``module`` with the root rank's values.

    >>> from invnet.distributed.comm import SerialComm
    >>> broadcast_parameters(nn.Linear(2, 2), SerialComm())
    """
    if comm.size == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        comm.broadcast(t.data, root)


def allreduce_gradients(module: nn.Module, comm: Communicator, scale: float = 1.0) -> None:
    r"""Replace each trainable parameter's gradient by ``scale`` times its sum over ranks, with
    ONE allreduce of a flat buffer (one per dtype if parameters mix dtypes). This is invnet's one
    gradient reduction: data parallelism (``scale = 1/ranks``), domain decomposition (partial
    gradients summed over the ranks of a volume) and both (``scale = 1/batch_ranks``) use it,
    through :class:`~invnet.distributed.ParallelStrategy`. A parameter without a gradient on some
    rank counts as zero there; one without a gradient on every rank keeps none (so that an
    optimizer skips it as it would serially).

    >>> import torch
    >>> from invnet.distributed.comm import SerialComm
    >>> lin = nn.Linear(2, 1); lin(torch.ones(1, 2)).sum().backward()
    >>> allreduce_gradients(lin, SerialComm(), scale=0.5)
    >>> lin.bias.grad.tolist()
    [0.5]
    """
    params = [p for p in module.parameters() if p.requires_grad]
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for group in by_dtype.values():
        # one buffer: the gradients, then one has-a-gradient flag per parameter
        flags = torch.tensor([0.0 if p.grad is None else 1.0 for p in group], dtype=group[0].dtype,
                             device=group[0].device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group] + [flags])
        if comm.size > 1:
            flat = comm.allreduce_sum(flat)
        if scale != 1.0:
            flat[: -len(group)] *= scale
        offset = 0
        for p, has in zip(group, flat[-len(group):].tolist()):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone() if has > 0 else None
            offset += n


def use_global_statistics(module: nn.Module, comm: Communicator) -> int:
    """Make every ActNorm in ``module`` initialise from statistics summed over ``comm``; returns
    how many were set.

    >>> from invnet.layers import ActNorm
    >>> from invnet.distributed.comm import SerialComm
    >>> use_global_statistics(ActNorm(3), SerialComm())
    1
    """
    from ..layers.actnorm import ActNorm

    count = 0
    for m in module.modules():
        if isinstance(m, ActNorm):
            m.stats_reduce = comm.allreduce_sum if comm.size > 1 else None
            count += 1
    return count


class DataParallel(nn.Module):
    r"""Data-parallel wrapper of a network (any ``nn.Module``): broadcasts its parameters from
    rank 0, sets global ActNorm statistics, and averages gradients over ranks with one flat
    allreduce in :meth:`reduce_gradients` (call it after ``backward``, before the optimiser step).

    Following the synchronous data parallelism of "Accurate, Large Minibatch SGD" (Goyal et al.,
    2017, arXiv:1706.02677): with equal local batches, the averaged gradient is the gradient of the
    mean loss over the concatenated batch.

    Args:
        network: the model (replicated on every rank).
        comm: communicator (default :func:`~invnet.distributed.default_comm`).

    >>> import torch, invnet
    >>> from invnet.distributed.comm import SerialComm
    >>> dp = DataParallel(invnet.layers.ActNorm(2), SerialComm())
    >>> z, logdet = dp(torch.randn(4, 2))
    >>> (-logdet.mean()).backward(); dp.reduce_gradients()
    >>> dp.module.log_scale.grad.shape
    torch.Size([2])
    """

    def __init__(self, network: nn.Module, comm: Optional[Communicator] = None) -> None:
        super().__init__()
        self.module = network
        self.comm = default_comm() if comm is None else comm
        use_global_statistics(network, self.comm)
        broadcast_parameters(network, self.comm)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # whatever the wrapped network takes and gives
        return self.module(*args, **kwargs)

    def log_prob(self, x: Tensor, c: Optional[Tensor] = None) -> Tensor:
        """The wrapped network's ``log_prob`` on this rank's samples."""
        return self.module.log_prob(x, c)

    def reduce_gradients(self) -> None:
        """Average gradients over ranks (one allreduce)."""
        allreduce_gradients(self.module, self.comm, scale=1.0 / self.comm.size)

    def mean_over_ranks(self, value: float) -> float:
        """Average of a per-rank number (e.g. the loss, for logging)."""
        return self.comm.allreduce_scalar(value) / self.comm.size
