"""Where a job computes: the device named in the config (``auto``, ``cpu``, ``cuda``, ``cuda:N``),
one GPU per rank under MPI, and batches moved there.

Under ``mpiexec`` with ``device = "cuda"`` (or ``"auto"`` on a GPU node) every rank takes the GPU
of its node-local rank: the world is split by shared memory (``MPI.COMM_TYPE_SHARED``), and rank
``k`` of its node uses ``cuda:k`` (modulo the GPUs it sees). Checkpoints never depend on the
device: weights and optimizer state are saved on the CPU and loaded onto whatever device the
resumed run (or the sampler) uses.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ..distributed.comm import Communicator, SerialComm

__all__ = ["DEVICE_CHOICES", "check_device_name", "resolve_device", "device_assignment", "to_device"]

#: what a config's ``device`` may say (``cuda:N`` with any N)
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


def check_device_name(name: Any) -> Optional[str]:
    """A complaint about a device name, or ``None`` if it is one of :data:`DEVICE_CHOICES`.

    >>> check_device_name("cuda:1") is None, check_device_name("gpu")
    (True, 'one of auto, cpu, cuda, cuda:N (N a GPU index)')
    """
    if name in ("auto", "cpu", "cuda"):
        return None
    if isinstance(name, str) and name.startswith("cuda:") and name[5:].isdigit():
        return None
    return "one of auto, cpu, cuda, cuda:N (N a GPU index)"


def resolve_device(name: Union[str, torch.device] = "auto", comm: Optional[Communicator] = None) -> torch.device:
    """The device this rank computes on.

    * ``"auto"``: CUDA when available, else the CPU;
    * ``"cpu"``; ``"cuda:N"``: that GPU (it must exist);
    * ``"cuda"``: the GPU of this rank's node-local rank (``comm.node_local()``, a split of the
      world by shared memory; collective when CUDA is chosen, so every rank resolves together).

    A ``torch.device`` is returned as given (tests use ``"meta"``). Raises ``ValueError`` naming
    what is missing.

    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    True
    """
    if isinstance(name, torch.device):
        return name
    complaint = check_device_name(name)
    if complaint:
        raise ValueError(f"device must be {complaint}, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} needs CUDA, but torch.cuda.is_available() is False on this machine "
                         "(a CPU build of torch, or no GPU visible); use device = \"cpu\" or \"auto\"")
    count = torch.cuda.device_count()
    if name.startswith("cuda:"):
        index = int(name[5:])
        if index >= count:
            raise ValueError(f"device {name!r}: this machine sees {count} GPU(s) (cuda:0 .. cuda:{count - 1})")
        return torch.device("cuda", index)
    local, _ = (comm or SerialComm()).node_local()
    return torch.device("cuda", local % count)


def device_assignment(device: torch.device, comm: Communicator) -> str:
    """One line for rank 0's log saying which rank computes where, e.g. ``"ranks 0-3: cuda:0,
    cuda:1, cuda:0, cuda:1 (the GPU of each rank's node-local rank, MPI.COMM_TYPE_SHARED)"``.
    Collective (one allreduce) when more than one rank runs.

    >>> device_assignment(torch.device("cpu"), SerialComm())
    'computing on cpu'
    """
    if comm.size == 1:
        return f"computing on {device}"
    table = torch.zeros(comm.size, dtype=torch.float64)  # 0: the CPU, k + 1: cuda:k
    table[comm.rank] = 1.0 + device.index if device.type == "cuda" and device.index is not None else 0.0
    names = ["cpu" if v == 0 else f"cuda:{int(v) - 1}" for v in comm.allreduce_sum(table).tolist()]
    if all(n == "cpu" for n in names):
        return f"ranks 0-{comm.size - 1}: computing on cpu"
    return (f"ranks 0-{comm.size - 1}: " + ", ".join(names)
            + " (the GPU of each rank's node-local rank: the world split by MPI.COMM_TYPE_SHARED)")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or tuples, lists and dicts of them, nested; anything else is left as
    it is) on ``device``. Copies from page-locked (pinned) host memory to a GPU are non-blocking.

    >>> x = torch.ones(2)
    >>> to_device((x, {"y": x}, 3), torch.device("cpu"))[1]["y"] is x
    True
    """
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        return batch.to(device, non_blocking=device.type == "cuda" and batch.is_pinned())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
