"""The communicator hook of the trainer: serial by default, MPI/torch.distributed plug in here."""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["Comm", "SerialComm"]


class Comm(Protocol):
    """What the trainer needs from a communicator. ``allreduce`` sums a tensor over ranks and
    returns the result (in place or not); ``bcast`` sends a picklable object from rank 0.
    Only rank 0 logs and writes files; all ranks take every collective in the same order."""

    rank: int
    size: int

    def allreduce(self, tensor: Tensor) -> Tensor: ...

    def bcast(self, obj: Any) -> Any: ...

    def barrier(self) -> None: ...


class SerialComm:
    """The one-process communicator: rank 0 of 1; every collective is the identity.

    >>> import torch
    >>> comm = SerialComm()
    >>> comm.rank, comm.size, comm.allreduce(torch.tensor([2.0])).tolist(), comm.bcast("a")
    (0, 1, [2.0], 'a')
    """

    rank = 0
    size = 1

    def allreduce(self, tensor: Tensor) -> Tensor:
        return tensor

    def bcast(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:
        return None


def average_gradients(params: list[torch.nn.Parameter], comm: Comm) -> None:
    """Average ``.grad`` over ranks with ONE allreduce of a flat buffer (a no-op serially)."""
    if comm.size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = comm.allreduce(torch.cat([g.reshape(-1) for g in grads])) / comm.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
