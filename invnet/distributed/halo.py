r"""Halo exchange: padding a subdomain with its neighbours' border cells, and its adjoint.

A convolution with reach ``w`` needs ``w`` cells beyond each side of the subdomain. Along one
space axis, every rank sends its first ``w`` slices to the lower neighbour and its last ``w``
slices to the upper one, and receives the matching slices into its ghost layers; at the global
border the ghost layers stay zero, so the decomposed convolution equals the serial, zero-padded
one. Axes are exchanged one after the other on the already padded array, which fills the corner
(edge, vertex) ghosts without diagonal messages::

      rank (0,0)            rank (0,1)
    +---+--------+---+    +---+--------+---+
    | 0 |  0  0  | 0 |    | 0 |  0  0  | 0 |    zero: global border
    +---+--------+---+    +---+--------+---+
    | 0 | a  ..  b| c'|    |b' | c  ..  d| 0 |    c' = copy of c (neighbour's first column)
    | 0 | ..     ..|  .|    | . |..     ..| 0 |    b' = copy of b (neighbour's last column)
    +---+--------+---+    +---+--------+---+

The exchange :math:`H` is linear, and its backward is its adjoint :math:`H^T`: the gradient on a
ghost cell is sent back to the rank that owns the cell and added there (axes in reverse order).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .comm import Communicator

__all__ = ["halo_exchange", "HaloPad"]


def _exchange_axis(x: Tensor, dim: int, w: int, lo: Optional[int], hi: Optional[int], comm: Communicator) -> Tensor:
    n = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = n + 2 * w
    out = x.new_zeros(shape)
    out.narrow(dim, w, n).copy_(x)
    # my first w slices -> lower neighbour's upper ghost; my upper ghost <- upper neighbour
    recv_hi = out.narrow(dim, n + w, w)
    buf = torch.empty_like(recv_hi) if hi is not None else None
    comm.sendrecv(x.narrow(dim, 0, w).contiguous() if lo is not None else None, lo, buf, hi)
    if buf is not None:
        recv_hi.copy_(buf)
    # my last w slices -> upper neighbour's lower ghost; my lower ghost <- lower neighbour
    recv_lo = out.narrow(dim, 0, w)
    buf = torch.empty_like(recv_lo) if lo is not None else None
    comm.sendrecv(x.narrow(dim, n - w, w).contiguous() if hi is not None else None, hi, buf, lo)
    if buf is not None:
        recv_lo.copy_(buf)
    return out


def _exchange_axis_adjoint(
    g: Tensor, dim: int, w: int, lo: Optional[int], hi: Optional[int], comm: Communicator
) -> Tensor:
    n = g.shape[dim] - 2 * w
    gi = g.narrow(dim, w, n).clone()
    # the lower ghost holds the gradient of the lower neighbour's last w slices: send it home;
    # the upper neighbour's lower ghost gradient belongs to my last w slices: add it
    buf = torch.empty_like(gi.narrow(dim, n - w, w)) if hi is not None else None
    comm.sendrecv(g.narrow(dim, 0, w).contiguous() if lo is not None else None, lo, buf, hi)
    if buf is not None:
        gi.narrow(dim, n - w, w).add_(buf)
    buf = torch.empty_like(gi.narrow(dim, 0, w)) if lo is not None else None
    comm.sendrecv(g.narrow(dim, n + w, w).contiguous() if hi is not None else None, hi, buf, lo)
    if buf is not None:
        gi.narrow(dim, 0, w).add_(buf)
    return gi


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, width: int, neighbors: tuple, comm: Communicator) -> Tensor:
        ctx.width, ctx.neighbors, ctx.comm = width, neighbors, comm
        out = x.detach()
        for axis, (lo, hi) in enumerate(neighbors):
            out = _exchange_axis(out, 2 + axis, width, lo, hi, comm)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.contiguous()
        for axis in reversed(range(len(ctx.neighbors))):
            lo, hi = ctx.neighbors[axis]
            g = _exchange_axis_adjoint(g, 2 + axis, ctx.width, lo, hi, ctx.comm)
        return g, None, None, None


def halo_exchange(x: Tensor, width: int, neighbors: "tuple[tuple[Optional[int], Optional[int]], ...]", comm: Communicator) -> Tensor:
    """Pad every space axis of ``x`` (``(N, C, *space)``) by ``width`` cells taken from the
    neighbouring ranks (``neighbors[axis] = (lower, upper)`` ranks of ``comm``, ``None`` at the
    global border, where the pad is zero). Differentiable; the backward is the exact adjoint.

    >>> import torch
    >>> from invnet.distributed.comm import SerialComm
    >>> halo_exchange(torch.ones(1, 1, 2), 1, ((None, None),), SerialComm()).tolist()
    [[[0.0, 1.0, 1.0, 0.0]]]
    """
    if width < 0:
        raise ValueError(f"halo width must be >= 0, got {width}")
    if len(neighbors) != x.dim() - 2:
        raise ValueError(f"need one neighbour pair per space axis ({x.dim() - 2}), got {len(neighbors)}")
    if width == 0:
        return x
    for axis, n in enumerate(x.shape[2:]):
        if any(r is not None for r in neighbors[axis]) and n < width:
            raise ValueError(
                f"halo width {width} exceeds the local size {n} along space axis {axis}: use fewer ranks "
                f"along that axis, a smaller kernel, or fewer squeezes"
            )
    return _HaloExchange.apply(x, width, tuple(tuple(p) for p in neighbors), comm)


class HaloPad(nn.Module):
    """Drop-in replacement for :class:`invnet.layers.ZeroPad` on a decomposed volume: pads by
    ``width`` cells exchanged with the neighbouring subdomains, with zeros only at the global border.

    Args:
        partition: the :class:`~invnet.distributed.Partition` of the volume.
        ndim: number of space dimensions (must match the partition).
        width: halo width (the reach of the convolution that follows).

    >>> import torch
    >>> from invnet.distributed import Partition
    >>> pad = HaloPad(Partition((4, 4), grid=(1, 1, 1)), ndim=2, width=1)
    >>> pad(torch.ones(1, 1, 4, 4)).shape
    torch.Size([1, 1, 6, 6])
    """

    def __init__(self, partition, ndim: int, width: int) -> None:
        super().__init__()
        if ndim != partition.ndim:
            raise ValueError(f"HaloPad for {ndim} space dimension(s) on a partition of {partition.ndim}")
        if width < 0:
            raise ValueError(f"halo width must be >= 0, got {width}")
        self.partition = partition
        self.ndim = ndim
        self.width = width
        self._neighbors = tuple(partition.neighbors(a) for a in range(ndim))
        self._local = all(p == (None, None) for p in self._neighbors)

    def extra_repr(self) -> str:
        return f"ndim={self.ndim}, width={self.width}, grid={self.partition.grid}"

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.ndim + 2:
            raise ValueError(f"HaloPad expects (batch, channels, *space) with {self.ndim} space dims, got {tuple(x.shape)}")
        if self.width == 0:
            return x
        if self._local:  # a grid of one along every axis: plain zero padding
            return F.pad(x, [self.width] * (2 * self.ndim))
        return halo_exchange(x, self.width, self._neighbors, self.partition.spatial)
