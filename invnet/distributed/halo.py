r"""Halo exchange: padding a subdomain with its neighbours' border cells, and its adjoint.

A convolution with reach ``w`` needs ``w`` cells beyond each side of the subdomain. Along one
space axis, every rank sends its first ``w`` slices to the lower neighbour and its last ``w``
slices to the upper one, and receives the matching slices into its ghost layers; at the global
border the ghost layers stay zero, so the decomposed convolution equals the serial, zero-padded
one. Axes are exchanged one after the other (in place, in one padded array), and each slab carries the ghosts
of the axes exchanged before it, which fills the corner (edge, vertex) ghosts without diagonal
messages::

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
from torch.autograd.function import FunctionCtx

from .comm import Communicator
from .partition import Partition

__all__ = ["halo_exchange", "HaloPad"]

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _slab(a: int, along: slice, interior: tuple[slice, ...]) -> tuple[slice, ...]:
    """Index of a slab along space axis ``a``: the full padded range on the axes exchanged before
    it (their ghosts are filled, so corners travel on), the interior on the axes after it."""
    idx = [slice(None), slice(None)]
    for b, inner in enumerate(interior):
        idx.append(slice(None) if b < a else along if b == a else inner)
    return tuple(idx)


def _buffer(like: Tensor) -> Tensor:
    """A contiguous receive buffer of the shape of ``like`` (MPI writes into it directly)."""
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def _exchange(out: Tensor, width: int, neighbors: tuple, comm: Communicator) -> None:
    """Fill the ghost layers of ``out`` (already holding the subdomain in its interior) in place."""
    w = width
    interior = tuple(slice(w, m - w) for m in out.shape[2:])
    for a, (lo, hi) in enumerate(neighbors):
        if lo is None and hi is None:
            continue  # a grid of one along this axis: the zero padding is already there
        n = out.shape[2 + a] - 2 * w
        # my first w slices -> lower neighbour's upper ghost; my upper ghost <- upper neighbour
        send = out[_slab(a, slice(w, 2 * w), interior)].contiguous() if lo is not None else None
        ghost = _slab(a, slice(n + w, n + 2 * w), interior)
        buf = _buffer(out[ghost]) if hi is not None else None
        comm.sendrecv(send, lo, buf, hi)
        if buf is not None:
            out[ghost] = buf
        # my last w slices -> upper neighbour's lower ghost; my lower ghost <- lower neighbour
        send = out[_slab(a, slice(n, n + w), interior)].contiguous() if hi is not None else None
        ghost = _slab(a, slice(0, w), interior)
        buf = _buffer(out[ghost]) if lo is not None else None
        comm.sendrecv(send, hi, buf, lo)
        if buf is not None:
            out[ghost] = buf


def _exchange_adjoint(g: Tensor, width: int, neighbors: tuple, comm: Communicator) -> None:
    """Adjoint of :func:`_exchange`, in place on the padded gradient ``g``: axes in reverse order;
    each ghost layer's gradient is sent to the rank owning those cells and added there."""
    w = width
    interior = tuple(slice(w, m - w) for m in g.shape[2:])
    for a in reversed(range(len(neighbors))):
        lo, hi = neighbors[a]
        if lo is None and hi is None:
            continue  # zero padding: its adjoint drops the ghost gradient
        n = g.shape[2 + a] - 2 * w
        # lower ghost -> home on the lower neighbour; the upper neighbour's lower ghost holds the
        # gradient of my last w slices
        send = g[_slab(a, slice(0, w), interior)].contiguous() if lo is not None else None
        mine = _slab(a, slice(n, n + w), interior)
        buf = _buffer(g[mine]) if hi is not None else None
        comm.sendrecv(send, lo, buf, hi)
        if buf is not None:
            g[mine] += buf
        send = g[_slab(a, slice(n + w, n + 2 * w), interior)].contiguous() if hi is not None else None
        mine = _slab(a, slice(w, 2 * w), interior)
        buf = _buffer(g[mine]) if lo is not None else None
        comm.sendrecv(send, hi, buf, lo)
        if buf is not None:
            g[mine] += buf


def _layout_of(x: Tensor) -> torch.memory_format:
    """The memory format ``x`` is laid out in: channels-last (2D, 3D) when it is contiguous that
    way and not channels-first, else the default (contiguous) one.

    >>> _layout_of(torch.zeros(1, 2, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d))
    torch.channels_last_3d
    >>> _layout_of(torch.zeros(1, 2, 3))
    torch.contiguous_format
    """
    fmt = _CHANNELS_LAST.get(x.dim())
    if fmt is not None and x.is_contiguous(memory_format=fmt) and not x.is_contiguous():
        return fmt
    return torch.contiguous_format


def _padded_like(x: Tensor, width: int) -> Tensor:
    """Zeros of the shape of ``x`` padded by ``width`` cells on both sides of every space axis,
    in the layout of ``x``, as ``F.pad`` makes them: a channels-last conditioner activation stays
    channels-last, so neither filling the interior nor the convolution that reads the result
    reorders the volume (a channels-first array here cost two strided reorders of every padded
    activation, and the adjoint a third)."""
    shape = x.shape[:2] + tuple(m + 2 * width for m in x.shape[2:])
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_layout_of(x)).zero_()


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, width: int, neighbors: tuple, comm: Communicator) -> Tensor:
        ctx.width, ctx.neighbors, ctx.comm = width, neighbors, comm
        out = _padded_like(x, width)
        out[(slice(None), slice(None)) + tuple(slice(width, width + m) for m in x.shape[2:])] = x.detach()
        _exchange(out, width, neighbors, comm)
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, g: Tensor):
        w = ctx.width
        g = g.clone(memory_format=torch.preserve_format)  # the adjoint adds into it: one copy, in the layout of g
        _exchange_adjoint(g, w, ctx.neighbors, ctx.comm)
        return g[(slice(None), slice(None)) + tuple(slice(w, m - w) for m in g.shape[2:])], None, None, None


def halo_exchange(
    x: Tensor, width: int, neighbors: tuple[tuple[Optional[int], Optional[int]], ...], comm: Communicator
) -> Tensor:
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

    def __init__(self, partition: Partition, ndim: int, width: int) -> None:
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
            raise ValueError(
                f"HaloPad expects (batch, channels, *space) with {self.ndim} space dims, got {tuple(x.shape)}"
            )
        if self.width == 0:
            return x
        if self._local:  # a grid of one along every axis: plain zero padding
            return F.pad(x, [self.width] * (2 * self.ndim))
        return halo_exchange(x, self.width, self._neighbors, self.partition.spatial)
