"""Bad configurations fail with a clear ValueError on every rank before any message is exchanged.
Run: mpiexec -n N python -m mpi4py tests/mpi/bad_config.py"""
import sys

import torch
from _common import Verdict, make_comm

import invnet
from invnet.distributed import Communicator, Partition, decompose
from invnet.layers import AffineCoupling, Squeeze

comm = make_comm(sys.argv)
v = Verdict(comm)
n = comm.size


class CountingComm(Communicator):
    """Wraps a communicator and counts every call that could exchange a message."""

    def __init__(self, inner):
        self.inner, self.rank, self.size, self.calls = inner, inner.rank, inner.size, 0

    def _count(self, name, *args):
        self.calls += 1
        return getattr(self.inner, name)(*args)

    def allreduce_sum(self, t):
        return self._count("allreduce_sum", t)

    def broadcast(self, t, root=0):
        return self._count("broadcast", t, root)

    def sendrecv(self, send, dest, recv, source):
        return self._count("sendrecv", send, dest, recv, source)

    def barrier(self):
        return self._count("barrier")

    def split(self, color, key):
        return CountingComm(self._count("split", color, key))


def expect_error(label, make, *words):
    counting = CountingComm(comm)
    try:
        make(counting)
    except ValueError as err:
        msg = str(err)
        v.check(f"{label}: message names {words}", all(w in msg for w in words), f"got: {msg}")
        v.check(f"{label}: no message before the error", counting.calls == 0, f"{counting.calls} calls")
        if comm.rank == 0:
            print(f"{label}: ValueError: {msg}", flush=True)
    else:
        v.check(f"{label}: raised", False, "no ValueError")


if n > 1:
    expect_error("not divisible", lambda cc: Partition((4 * n + 1, 8), (1, n, 1), cc),
                 "not divisible", f"{4 * n + 1}")
expect_error("grid larger than the world", lambda cc: Partition((16, 16), (1, 2 * n, 1), cc),
             f"needs {2 * n} ranks", f"only {n}")
if n > 1:
    expect_error("grid smaller than the world", lambda cc: Partition((16, 16), (1, 1, 1), cc), "uses 1 ranks")
expect_error("odd local size", lambda cc: Partition((6 * n, 8), (1, n, 1), cc, levels=2),
             "squeeze level 2", "local size 3", "axis 0")
expect_error("grid of the wrong rank", lambda cc: Partition((16, 16), (n, 1), cc), "grid must be")


def net_with_squeezes(ch=2):
    return invnet.Chain(Squeeze(ndim=2), AffineCoupling(4 * ch, hidden=4, ndim=2), Squeeze(ndim=2))


def decomposed_on(space, net_fn):
    def make(cc):
        part = Partition(space, (1, n, 1), comm)  # valid: its own messages are not counted
        part.world = part.spatial = part.batch = cc  # count only what decompose would send
        return decompose(net_fn(), part)
    return make


expect_error("decompose: odd local size at a squeeze level", decomposed_on((6 * n, 8), net_with_squeezes),
             "squeeze level 2", "local size 3")
if n > 1:
    expect_error("decompose: patch squeeze", decomposed_on((8 * n, 8), lambda: invnet.Chain(Squeeze("patch", ndim=2))),
                 "patch", "checkerboard")


class PaddedConvCoupling(AffineCoupling):
    def __init__(self):
        super().__init__(2, hidden=4, ndim=2, conditioner=torch.nn.Conv2d(1, 2, 3, padding=1))


expect_error("decompose: convolution that pads by itself",
             decomposed_on((8 * n, 8), lambda: invnet.Chain(PaddedConvCoupling())), "padding=0", "ZeroPad")
v.finish()
