"""Shared helpers of the MPI test scripts (run under mpiexec by tests/test_mpi.py).

Each script records its checks locally and reduces the verdict over ranks before exiting, so a
failure on one rank never leaves the others waiting in an unmatched collective.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from invnet.distributed import MPIComm, TorchComm  # noqa: E402

_COMM = None
_VERDICT = None
#: set by suite.py: scripts then share one communicator and one verdict, reduced once at the end
SUITE = False


def make_comm(argv: list[str]):
    """``gloo`` in argv selects the torch.distributed backend, else mpi4py (one per process)."""
    global _COMM
    if _COMM is None:
        _COMM = TorchComm("gloo") if "gloo" in argv else MPIComm()
    return _COMM


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / max(||b||, tiny)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class Verdict:
    """Collects named checks on this rank; :meth:`finish` reduces them over all ranks."""

    def __new__(cls, comm):
        global _VERDICT
        if SUITE and _VERDICT is not None:
            return _VERDICT
        _VERDICT = super().__new__(cls)
        _VERDICT._init(comm)
        return _VERDICT

    def _init(self, comm) -> None:
        self.comm = comm
        self.failures: list[str] = []
        self.count = 0

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.count += 1
        if not ok:
            self.failures.append(f"rank {self.comm.rank}: {name} {detail}")

    def close(self, name: str, err: float, tol: float) -> None:
        self.check(name, err <= tol, f"error {err:.3e} > {tol:.0e}")

    def finish(self, final: bool = False) -> None:
        if SUITE and not final:
            return
        for f in self.failures:
            print("FAIL", f, flush=True)
        bad = self.comm.allreduce_scalar(len(self.failures))
        total = self.comm.allreduce_scalar(self.count)
        if self.comm.rank == 0:
            print(f"{'OK' if bad == 0 else 'FAILED'}: {int(total)} checks over {self.comm.size} ranks, "
                  f"{int(bad)} failed", flush=True)
        self.comm.close()
        sys.stdout.flush()
        os._exit(0 if bad == 0 else 1)  # os._exit: gloo may abort in its own teardown otherwise
