"""A small communication interface with three backends: mpi4py (default), torch.distributed
(gloo on CPU, NCCL on GPU) and serial (one process).

Everything distributed in invnet talks to a :class:`Communicator`; nothing else imports MPI. The
operations are the few a domain decomposition and data parallelism need: sum over ranks,
broadcast, a paired send/receive for halos, a barrier, and splitting into sub-communicators.
Tensors are passed as buffers (no pickling): contiguous CPU tensors directly; CUDA tensors
directly where MPI is CUDA-aware (after a stream synchronisation, since MPI does not know about
CUDA streams), otherwise staged through host memory.
"""
from __future__ import annotations

import builtins
import os
import socket
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar, Union

import torch
from torch import Tensor

if TYPE_CHECKING:  # for annotations only: MPI and torch.distributed are imported when a backend is made
    import numpy as np
    from mpi4py import MPI
    from torch.distributed import ProcessGroup

__all__ = ["Communicator", "SerialComm", "MPIComm", "TorchComm", "default_comm", "agree_on_errors"]

T = TypeVar("T")


class Communicator:
    """Interface of a group of ``size`` processes, this one being ``rank``.

    All operations are collective over the group except :meth:`sendrecv`, which pairs with the
    matching call on the partner ranks. Every rank must call collectives in the same order.
    """

    rank: int = 0
    size: int = 1

    def allreduce_sum(self, t: Tensor) -> Tensor:
        r"""Return :math:`\sum_{r} t_r` on every rank (a new tensor; ``t`` is unchanged)."""
        raise NotImplementedError

    def broadcast(self, t: Tensor, root: int = 0) -> Tensor:
        """Overwrite ``t`` in place with the root's values and return it."""
        raise NotImplementedError

    def sendrecv(
        self, send: Optional[Tensor], dest: Optional[int], recv: Optional[Tensor], source: Optional[int]
    ) -> Optional[Tensor]:
        """Send ``send`` to ``dest`` and receive into ``recv`` from ``source`` at the same time
        (either side may be ``None``: nothing sent / received). Returns ``recv``."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait until every rank of the group arrives."""
        raise NotImplementedError

    def split(self, color: int, key: int) -> Communicator:
        """Sub-communicator of the ranks that passed the same ``color``, ordered by ``key``."""
        raise NotImplementedError

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Send a picklable Python object from ``root`` to every rank (configs, paths, flags)."""
        raise NotImplementedError

    def allreduce_scalar(self, value: float) -> float:
        """Sum of a Python number over ranks (for verdicts and logging)."""
        return float(self.allreduce_sum(torch.tensor([float(value)], dtype=torch.float64))[0])

    def agree(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any: a decision all ranks must take together
        (stop after this step, write a checkpoint now).

        >>> SerialComm().agree(True), SerialComm().agree(False)
        (True, False)
        """
        if self.size == 1:
            return bool(flag)
        return self.allreduce_scalar(1.0 if flag else 0.0) > 0

    def node_local(self) -> tuple[int, int]:
        """``(rank, size)`` of this process among the ranks on its node (the processes that share
        memory with it): under MPI the world split by ``MPI.COMM_TYPE_SHARED``. A rank uses it to
        pick the GPU of its node (:func:`invnet.training.device.resolve_device`). Collective.

        >>> SerialComm().node_local()
        (0, 1)
        """
        return 0, 1

    def close(self) -> None:
        """Release backend resources (no-op unless the backend needs it)."""


class SerialComm(Communicator):
    """The group of one process: every operation is the identity, so distributed code runs
    serially unchanged.

    >>> import torch
    >>> comm = SerialComm()
    >>> comm.allreduce_sum(torch.tensor([1.0, 2.0])).tolist(), comm.size
    ([1.0, 2.0], 1)
    """

    rank = 0
    size = 1

    def allreduce_sum(self, t: Tensor) -> Tensor:
        return t.clone()

    def broadcast(self, t: Tensor, root: int = 0) -> Tensor:
        if root != 0:
            raise ValueError(f"a serial communicator has only rank 0, got root={root}")
        return t

    def sendrecv(
        self, send: Optional[Tensor], dest: Optional[int], recv: Optional[Tensor], source: Optional[int]
    ) -> Optional[Tensor]:
        if dest not in (None, 0) or source not in (None, 0):
            raise ValueError(f"a serial communicator has only rank 0, got dest={dest}, source={source}")
        if send is not None and recv is not None:
            recv.copy_(send)
        return recv

    def barrier(self) -> None:
        return None

    def split(self, color: int, key: int) -> Communicator:
        return SerialComm()

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj


def _sync_if_cuda(t: Optional[Tensor]) -> None:
    # MPI reads device memory directly and knows nothing of CUDA streams: finish pending kernels.
    if t is not None and t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()


class MPIComm(Communicator):
    """mpi4py backend (the default under ``mpiexec``).

    Args:
        comm: an ``mpi4py.MPI.Comm`` (default ``COMM_WORLD``).
        cuda_aware: pass CUDA tensors to MPI directly (requires a CUDA-aware MPI build). ``None``
            reads the environment variable ``INVNET_CUDA_AWARE_MPI`` (``1`` = yes); otherwise
            CUDA tensors are staged through host memory.

    >>> comm = MPIComm()  # doctest: +SKIP
    """

    def __init__(self, comm: Optional[MPI.Comm] = None, cuda_aware: Optional[bool] = None) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        if cuda_aware is None:
            cuda_aware = os.environ.get("INVNET_CUDA_AWARE_MPI", "0") == "1"
        self.cuda_aware = bool(cuda_aware)

    # A buffer MPI can read/write: a numpy view for CPU tensors, the tensor itself for CUDA
    # tensors (``__cuda_array_interface__``) when MPI is CUDA-aware.
    def _buf(self, t: Tensor) -> Union[Tensor, np.ndarray]:
        if t.is_cuda:
            _sync_if_cuda(t)
            return t
        return t.numpy()

    def _staged(self, t: Tensor) -> tuple[Tensor, bool]:
        if t.is_cuda and not self.cuda_aware:
            return t.detach().cpu().contiguous(), True
        return t.detach().contiguous(), False

    def allreduce_sum(self, t: Tensor) -> Tensor:
        src, staged = self._staged(t)
        out = torch.empty_like(src)
        self.comm.Allreduce(self._buf(src), self._buf(out), op=self._MPI.SUM)
        return out.to(t.device) if staged else out

    def broadcast(self, t: Tensor, root: int = 0) -> Tensor:
        buf, staged = self._staged(t)
        if not staged and not t.is_contiguous():
            buf = buf.clone()
        self.comm.Bcast(self._buf(buf), root=root)
        if staged or buf.data_ptr() != t.data_ptr():
            with torch.no_grad():
                t.copy_(buf)
        return t

    def sendrecv(
        self, send: Optional[Tensor], dest: Optional[int], recv: Optional[Tensor], source: Optional[int]
    ) -> Optional[Tensor]:
        MPI = self._MPI
        if send is None and recv is None:
            return None
        sbuf, _ = self._staged(send) if send is not None else (None, False)
        rbuf, rstaged = self._staged(recv) if recv is not None else (None, False)
        if rbuf is not None and not rstaged and rbuf.data_ptr() != recv.data_ptr():
            rstaged = True
        # PROC_NULL turns a missing side into a no-op, so border ranks call the same code.
        dest_ = MPI.PROC_NULL if dest is None or send is None else dest
        source_ = MPI.PROC_NULL if source is None or recv is None else source
        if sbuf is None:
            sbuf = torch.empty(0, dtype=rbuf.dtype)
        if rbuf is None:
            rbuf = torch.empty(0, dtype=sbuf.dtype)
        self.comm.Sendrecv(self._buf(sbuf), dest_, 0, self._buf(rbuf), source_, 0)
        if recv is not None and rstaged:
            recv.copy_(rbuf)
        return recv

    def barrier(self) -> None:
        self.comm.Barrier()

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=root)

    def split(self, color: int, key: int) -> MPIComm:
        return MPIComm(self.comm.Split(color, key), cuda_aware=self.cuda_aware)

    def node_local(self) -> tuple[int, int]:
        shared = self.comm.Split_type(self._MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return shared.Get_rank(), shared.Get_size()
        finally:
            shared.Free()

    def abort(self, code: int = 1) -> None:
        """End every rank of the job at once (used when one rank cannot go on)."""
        self.comm.Abort(code)


class TorchComm(Communicator):
    """torch.distributed backend: gloo for CPU tensors, NCCL for CUDA tensors (with NCCL, the
    few CPU tensors the jobs reduce, flags and loss sums, travel through this rank's GPU).

    Ranks and the world size come from the MPI launcher (mpi4py); rank 0 picks a free TCP port
    and broadcasts its host and port, so no environment variables are needed. Set
    ``MASTER_ADDR`` to override the host (e.g. a fast interface on a cluster).

    Args:
        backend: ``"gloo"`` or ``"nccl"``.
        group: an existing process group (used by :meth:`split`); ``None`` initialises the
            default group.

    >>> comm = TorchComm("gloo")  # doctest: +SKIP
    """

    def __init__(
        self, backend: str = "gloo", group: Optional[ProcessGroup] = None, _ranks: Optional[list[int]] = None
    ) -> None:
        import torch.distributed as dist

        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        self._dist = dist
        self.backend = backend
        if group is None and not dist.is_initialized():
            from mpi4py import MPI

            world = MPI.COMM_WORLD
            rank, size = world.Get_rank(), world.Get_size()
            host, port = None, None
            if rank == 0:
                host = os.environ.get("MASTER_ADDR", socket.gethostname())
                with socket.socket() as s:
                    s.bind(("", 0))
                    port = s.getsockname()[1]
            host, port = world.bcast((host, port), root=0)
            kwargs = {}
            if backend == "nccl":  # one GPU per rank: the GPU of its node-local rank
                local, _ = MPIComm(world).node_local()
                kwargs["device_id"] = torch.device("cuda", local % max(1, torch.cuda.device_count()))
            dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=size, **kwargs)
        self.group = group
        self._ranks = _ranks  # global ranks of this group, in group order
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def _global(self, r: int) -> int:
        return r if self._ranks is None else self._ranks[r]

    def _on_backend_device(self, t: Tensor) -> Tensor:
        # NCCL moves only CUDA memory
        if self.backend == "nccl" and not t.is_cuda:
            return t.to(torch.device("cuda", torch.cuda.current_device()))
        return t

    def allreduce_sum(self, t: Tensor) -> Tensor:
        out = self._on_backend_device(t.detach().contiguous()).clone()
        self._dist.all_reduce(out, op=self._dist.ReduceOp.SUM, group=self.group)
        return out.to(t.device)

    def broadcast(self, t: Tensor, root: int = 0) -> Tensor:
        buf = self._on_backend_device(t.detach().contiguous())
        self._dist.broadcast(buf, src=self._global(root), group=self.group)
        if buf.data_ptr() != t.data_ptr():
            with torch.no_grad():
                t.copy_(buf)
        return t

    def sendrecv(
        self, send: Optional[Tensor], dest: Optional[int], recv: Optional[Tensor], source: Optional[int]
    ) -> Optional[Tensor]:
        dist = self._dist
        ops = []
        rbuf = None
        if send is not None and dest is not None:
            ops.append(dist.P2POp(dist.isend, self._on_backend_device(send.detach().contiguous()), self._global(dest),
                                  self.group))
        if recv is not None and source is not None:
            rbuf = recv if recv.is_contiguous() and (recv.is_cuda or self.backend != "nccl") else \
                self._on_backend_device(torch.empty_like(recv))
            ops.append(dist.P2POp(dist.irecv, rbuf, self._global(source), self.group))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        if rbuf is not None and rbuf.data_ptr() != recv.data_ptr():
            recv.copy_(rbuf)
        return recv

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=self._global(root), group=self.group)
        return box[0]

    def split(self, color: int, key: int) -> TorchComm:
        # new_group is collective over the whole default group: every rank creates every group,
        # in the same order, and keeps its own.
        dist = self._dist
        mine = self._on_backend_device(torch.tensor([color, key, self._global(self.rank)], dtype=torch.int64))
        table = [torch.zeros_like(mine) for _ in range(self.size)]
        dist.all_gather(table, mine, group=self.group)
        rows = [tuple(int(v) for v in r) for r in table]
        own = None
        for col in sorted({r[0] for r in rows}):
            ranks = [g for _, g in sorted((k, g) for c, k, g in rows if c == col)]
            grp = dist.new_group(ranks)
            if col == color:
                own = (grp, ranks)
        return TorchComm(self.backend, group=own[0], _ranks=own[1])

    def node_local(self) -> tuple[int, int]:
        from mpi4py import MPI  # the ranks came from the MPI launcher (see __init__)

        if self._ranks is not None or self.size != MPI.COMM_WORLD.Get_size():
            raise ValueError("node_local is defined on the world group of a TorchComm, not on a split one")
        return MPIComm(MPI.COMM_WORLD).node_local()

    def close(self) -> None:
        if self.group is None and self._dist.is_initialized():
            self._dist.destroy_process_group()


def default_comm(backend: str = "auto") -> Communicator:
    """The communicator of this job. ``backend``: ``"auto"`` (the environment variable
    ``INVNET_COMM`` if set, else :class:`MPIComm` over ``COMM_WORLD`` when mpi4py is installed and
    more than one process runs, else :class:`SerialComm`), ``"mpi"``, ``"gloo"`` or ``"nccl"``
    (:class:`TorchComm`), ``"serial"``.

    >>> default_comm().size >= 1
    True
    """
    choice = os.environ.get("INVNET_COMM", "auto") if backend == "auto" else backend
    if choice in ("gloo", "nccl"):
        return TorchComm(choice)
    if choice == "serial":
        return SerialComm()
    if choice not in ("auto", "mpi"):
        raise ValueError(f"the communication backend must be auto, mpi, gloo, nccl or serial (INVNET_COMM or "
                         f"[distributed] backend), got {choice!r}")
    try:
        from mpi4py import MPI
    except ImportError:
        if choice == "mpi":
            raise
        return SerialComm()
    if choice == "mpi" or MPI.COMM_WORLD.Get_size() > 1:
        return MPIComm()
    return SerialComm()


#: the errors a job reports as bad input (exit code 2); :func:`agree_on_errors` shares them
_INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                 PermissionError)


def agree_on_errors(comm: Communicator, check: Callable[[], T]) -> T:
    """Run ``check()`` on every rank and return its result; if it raises a bad-input error
    (``ValueError``, ``FileNotFoundError``, ...) on any rank, every rank raises the error of the
    lowest such rank (same type, same one-line message), so no rank is left waiting in a
    collective the failed one never reaches. Collective (one allreduce, one broadcast on failure).

    >>> agree_on_errors(SerialComm(), lambda: 3)
    3
    >>> agree_on_errors(SerialComm(), lambda: int("x"))
    Traceback (most recent call last):
    ...
    ValueError: invalid literal for int() with base 10: 'x'
    """
    error: Optional[BaseException] = None
    result = None
    try:
        result = check()
    except _INPUT_ERRORS as err:
        error = err
    if comm.size == 1:
        if error is not None:
            raise error
        return result
    failed = torch.zeros(comm.size, dtype=torch.float64)
    failed[comm.rank] = 0.0 if error is None else 1.0
    failed = comm.allreduce_sum(failed)
    if not bool((failed > 0).any()):
        return result
    root = int(torch.nonzero(failed > 0)[0, 0])
    kind, message = comm.bcast((type(error).__name__, str(error)) if comm.rank == root else None, root)
    if comm.rank == root:
        raise error
    cls = getattr(builtins, kind, ValueError)
    raise (cls if isinstance(cls, type) and issubclass(cls, _INPUT_ERRORS) else ValueError)(message) from None
