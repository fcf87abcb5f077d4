"""Adjoint (dot-product) tests of every communication primitive, and exactness of the halo
against the serial zero-padded volume. Run: mpiexec -n N python -m mpi4py tests/mpi/primitives.py [gloo]"""
import itertools
import sys

import torch
import torch.nn.functional as F
from _common import Verdict, make_comm, rel

from invnet.distributed import Partition, halo_exchange, sum_over_ranks

torch.set_default_dtype(torch.float64)
comm = make_comm(sys.argv)
v = Verdict(comm)
r, n = comm.rank, comm.size
gen = torch.Generator().manual_seed(100 + r)  # different data on every rank
TOL = 1e-14


def randn(*shape):
    return torch.randn(shape, generator=gen)


def dot_all(a, b):
    return comm.allreduce_scalar(float((a.detach() * b.detach()).sum()))


def adjoint(name, fx, y, x, fty):
    """|<F x, y> - <x, F^T y>| / (||F x|| ||y||), all sums over ranks (the usual dot-test scale,
    which cancellation in the two sums cannot inflate)."""
    lhs, rhs = dot_all(fx, y), dot_all(x, fty)
    scale = max((dot_all(fx, fx) * dot_all(y, y)) ** 0.5, 1e-300)
    v.close(f"adjoint {name}", abs(lhs - rhs) / scale, TOL)


# allreduce: (A x)_r = sum_s x_s on every rank; A is symmetric
x, y = randn(5, 3), randn(5, 3)
adjoint("allreduce", comm.allreduce_sum(x), y, x, comm.allreduce_sum(y))
v.check("allreduce leaves its input", torch.equal(x, x.clone()))

# broadcast from root: B x_root = (x, ..., x); B^T y = sum_r y_r at the root
x = randn(4, 2) if r == 0 else torch.zeros(4, 2)
y = randn(4, 2)
adjoint("broadcast", comm.broadcast(x.clone(), 0), y, x, comm.allreduce_sum(y))

# object broadcast (configs, paths) from the last rank
got = comm.bcast({"from": r, "path": "/x"} if r == n - 1 else None, root=n - 1)
v.check("bcast of an object", got == {"from": n - 1, "path": "/x"}, str(got))

# sendrecv around a ring: rank r receives x_{r-1}; the adjoint sends the other way
x, y = randn(3, 4, 2), randn(3, 4, 2)
px = comm.sendrecv(x, (r + 1) % n, torch.empty_like(x), (r - 1) % n)
pty = comm.sendrecv(y, (r - 1) % n, torch.empty_like(y), (r + 1) % n)
adjoint("sendrecv", px, y, x, pty)

# sum_over_ranks: forward is the sum, backward (replicated loss) passes w through
x = randn(6).requires_grad_(True)
w = torch.arange(6.0)  # the same on every rank: a replicated loss <w, sum_r x_r>
s = sum_over_ranks(x, comm)
v.close("sum_over_ranks forward", rel(s, comm.allreduce_sum(x.detach())), 0.0)
(g,) = torch.autograd.grad((w * s).sum(), x)
v.close("sum_over_ranks gradient", rel(g, w), 0.0)

# scatter / gather over batch and space grids (adjoint pair, and gather(scatter(X)) = X)
for grid in [(1, n, 1), (1, 1, n), (n, 1, 1)] + ([(2, 2, 1), (2, 1, 2)] if n == 4 else []):
    part = Partition((8, 4), grid, comm)
    X = randn(2 * n, 3, 8, 4) if r == 0 else None
    s = part.scatter(X)
    y = randn(*s.shape)
    G = part.gather(y)
    zero = torch.zeros(())
    adjoint(f"scatter/gather grid={grid}", s, y, X if r == 0 else zero, G if r == 0 else zero)
    back = part.gather(s)
    v.check(f"gather(scatter(X)) = X grid={grid}", r != 0 or torch.equal(back, X))

# halo exchange in 1D/2D/3D over every way to lay the ranks out, widths 1 and 2
common = torch.Generator().manual_seed(7)  # same global volume on every rank
for ndim in (1, 2, 3):
    layouts = [g for g in itertools.product([1, 2, 4], repeat=ndim) if torch.tensor(g).prod() == n]
    for space_grid, width in itertools.product(layouts, (1, 2)):
        local = (4,) * ndim
        part = Partition(tuple(4 * p for p in space_grid), (1,) + space_grid, comm)
        neighbors = tuple(part.neighbors(a) for a in range(ndim))
        x = randn(2, 3, *local).requires_grad_(True)
        hx = halo_exchange(x, width, neighbors, part.spatial)
        y = randn(*hx.shape)
        (hty,) = torch.autograd.grad(hx, x, y)
        adjoint(f"halo ndim={ndim} grid={space_grid} width={width}", hx, y, x, hty)
        # against the serial zero padding of the gathered volume
        X = torch.randn((2, 3) + part.space_shape, generator=common)
        padded = F.pad(X, [width] * (2 * ndim))
        window = padded[(slice(None), slice(None)) + tuple(
            slice(o, o + m + 2 * width) for o, m in zip(part.offsets, local))]
        got = halo_exchange(part.local_view(X), width, neighbors, part.spatial)
        v.check(f"halo = serial padding ndim={ndim} grid={space_grid} width={width}", torch.equal(got, window))
        if ndim >= 2:  # a channels-last block stays channels-last (as F.pad keeps it), same values
            fmt = torch.channels_last if ndim == 2 else torch.channels_last_3d
            last = halo_exchange(part.local_view(X).contiguous(memory_format=fmt), width, neighbors, part.spatial)
            v.check(f"halo channels-last ndim={ndim} grid={space_grid} width={width}",
                    torch.equal(last, window) and last.is_contiguous(memory_format=fmt))

v.finish()
