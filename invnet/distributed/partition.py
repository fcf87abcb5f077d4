"""A Cartesian process grid over batch and space, and scatter/gather of global arrays.

``grid = (batch_ranks, p_1, ..., p_d)``: the batch is split over ``batch_ranks`` groups (data
parallelism) and, inside each group, the space of every sample over ``p_1 x ... x p_d`` ranks
(domain decomposition). World rank ``r = b * (p_1 ... p_d) + s`` with ``s`` the row-major index
of the spatial coordinates. Validation is local arithmetic, identical on every rank, and runs
before any message is exchanged, so a bad configuration fails on every rank at once.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .comm import Communicator, SerialComm, default_comm

__all__ = ["Partition", "validate_grid"]


def validate_grid(
    space_shape: Sequence[int], grid: Sequence[int], world_size: int, levels: int = 0
) -> tuple[int, ...]:
    """Check a process grid against a volume and a world size; return the local space shape.

    Raises ``ValueError`` when the grid does not match the space dimensions, has more or fewer
    ranks than the world, does not divide the volume, or leaves an odd local size at some
    squeeze level (each of ``levels`` squeezes halves every local size, so the global size must
    be divisible by ``ranks along that axis x 2^levels``).

    >>> validate_grid((16, 8), (1, 2, 1), world_size=2, levels=2)
    (8, 8)
    >>> validate_grid((12, 8), (1, 2, 1), world_size=2, levels=2)
    Traceback (most recent call last):
    ...
    ValueError: local size 3 along space axis 0 is odd at squeeze level 2: global size 12 over 2 ranks
    gives 6 per rank, halved 1 time(s) to 3; the global size must be divisible by 2 x 2^2 = 8
    """
    space_shape = tuple(int(s) for s in space_shape)
    grid = tuple(grid)
    if not all(isinstance(g, int) and g >= 1 for g in grid):
        raise ValueError(f"grid entries must be positive integers, got {grid}")
    if len(grid) != len(space_shape) + 1:
        raise ValueError(
            f"grid must be (batch_ranks, one rank count per space axis) = {len(space_shape) + 1} entries "
            f"for a space shape {space_shape}, got {grid}"
        )
    need = math.prod(grid)
    if need > world_size:
        raise ValueError(f"grid {grid} needs {need} ranks but the job has only {world_size}")
    if need < world_size:
        raise ValueError(f"grid {grid} uses {need} ranks but the job has {world_size}: every rank must have a place")
    if levels < 0:
        raise ValueError(f"levels must be >= 0, got {levels}")
    local = []
    for axis, (n, p) in enumerate(zip(space_shape, grid[1:])):
        if n % p:
            raise ValueError(
                f"space axis {axis} of size {n} is not divisible by its {p} ranks (grid {grid})"
            )
        size = n // p
        for level in range(1, levels + 1):
            if size % 2:
                raise ValueError(
                    f"local size {size} along space axis {axis} is odd at squeeze level {level}: global size "
                    f"{n} over {p} ranks gives {n // p} per rank, halved {level - 1} time(s) to {size}; the "
                    f"global size must be divisible by {p} x 2^{levels} = {p * 2 ** levels}"
                )
            size //= 2
        local.append(n // p)
    return tuple(local)


class Partition:
    r"""Cartesian process grid ``(batch_ranks, p_1, ..., p_d)`` over a volume of shape ``space_shape``.

    Each rank owns the block ``[c_i n_i / p_i, (c_i + 1) n_i / p_i)`` along space axis ``i`` of the
    samples of its batch group ``b``. The communicators ``world``, ``spatial`` (the ranks that
    share one sample's volume) and ``batch`` (the ranks at the same place of different samples)
    are split from ``comm`` after validation.

    Args:
        space_shape: global space shape ``(n_1, ..., n_d)`` of one sample.
        grid: ``(batch_ranks, p_1, ..., p_d)``; product must equal the world size.
        comm: communicator (default :func:`~invnet.distributed.default_comm`).
        levels: number of squeezes the network applies (checked: even local sizes at each).

    >>> import torch
    >>> part = Partition((8, 8), grid=(1, 1, 1))           # serial: a grid of one
    >>> part.local_space_shape, part.offsets, part.neighbors(0)
    ((8, 8), (0, 0), (None, None))
    >>> x = torch.randn(2, 3, 8, 8)
    >>> bool(torch.equal(part.gather(part.scatter(x)), x))
    True
    """

    def __init__(
        self,
        space_shape: Sequence[int],
        grid: Sequence[int],
        comm: Optional[Communicator] = None,
        levels: int = 0,
    ) -> None:
        comm = default_comm() if comm is None else comm
        self.space_shape = tuple(int(s) for s in space_shape)
        self.grid = tuple(grid)
        self.levels = int(levels)
        # local arithmetic only: fails identically on every rank before any message
        self.local_space_shape = validate_grid(self.space_shape, self.grid, comm.size, self.levels)
        self.ndim = len(self.space_shape)
        self.batch_ranks = self.grid[0]
        self.space_grid = self.grid[1:]
        self.spatial_size = math.prod(self.space_grid)
        self.world = comm
        self.rank = comm.rank
        self.batch_coord, s = divmod(comm.rank, self.spatial_size)
        self.spatial_index = s
        self.coords = self._coords_of(s)
        self.offsets = tuple(c * n for c, n in zip(self.coords, self.local_space_shape))
        if comm.size == 1:
            self.spatial, self.batch = comm, comm
        else:
            self.spatial = comm.split(self.batch_coord, s)
            self.batch = comm.split(s, self.batch_coord)

    # ------------------------------------------------------------------------------------
    def _coords_of(self, s: int) -> tuple[int, ...]:
        coords = []
        for p in reversed(self.space_grid):
            s, c = divmod(s, p)
            coords.append(c)
        return tuple(reversed(coords))

    def _index_of(self, coords: Sequence[int]) -> int:
        s = 0
        for c, p in zip(coords, self.space_grid):
            s = s * p + c
        return s

    def neighbors(self, axis: int) -> tuple[Optional[int], Optional[int]]:
        """Ranks (in the ``spatial`` communicator) of the lower and upper neighbours along space
        ``axis``; ``None`` at the global border."""
        if not 0 <= axis < self.ndim:
            raise ValueError(f"axis must be in [0, {self.ndim}), got {axis}")
        out = []
        for step in (-1, 1):
            c = list(self.coords)
            c[axis] += step
            out.append(self._index_of(c) if 0 <= c[axis] < self.space_grid[axis] else None)
        return out[0], out[1]

    def check_levels(self, levels: int) -> None:
        """Raise ``ValueError`` (naming the level and the size) unless every local size stays
        even through ``levels`` squeezes."""
        validate_grid(self.space_shape, self.grid, self.world.size, levels)

    @property
    def space_slices(self) -> tuple[slice, ...]:
        """This rank's block of the global space."""
        return tuple(slice(o, o + n) for o, n in zip(self.offsets, self.local_space_shape))

    def batch_slice(self, global_batch: int) -> slice:
        """This rank's samples of a global batch (which must divide evenly over the batch ranks)."""
        if global_batch % self.batch_ranks:
            raise ValueError(f"global batch {global_batch} is not divisible by {self.batch_ranks} batch ranks")
        n = global_batch // self.batch_ranks
        return slice(self.batch_coord * n, (self.batch_coord + 1) * n)

    def _block(self, rank: int, global_batch: int) -> tuple[slice, ...]:
        b, s = divmod(rank, self.spatial_size)
        n = global_batch // self.batch_ranks
        coords = self._coords_of(s)
        space = tuple(slice(c * m, (c + 1) * m) for c, m in zip(coords, self.local_space_shape))
        return (slice(b * n, (b + 1) * n), slice(None)) + space

    def _check_global(self, shape: Sequence[int]) -> None:
        if tuple(shape[2:]) != self.space_shape:
            raise ValueError(
                f"expected a global array (batch, channels, *{self.space_shape}), got shape {tuple(shape)}"
            )
        if shape[0] % self.batch_ranks:
            raise ValueError(f"global batch {shape[0]} is not divisible by {self.batch_ranks} batch ranks")

    def local_view(self, global_tensor: Tensor) -> Tensor:
        """This rank's block of a global array every rank holds (no messages); a contiguous copy."""
        self._check_global(global_tensor.shape)
        return global_tensor[self._block(self.rank, global_tensor.shape[0])].contiguous()

    def local_shape(self, global_batch: int, channels: int) -> tuple[int, ...]:
        """Shape of this rank's block of a ``(global_batch, channels, *space_shape)`` array."""
        self.batch_slice(global_batch)
        return (global_batch // self.batch_ranks, channels) + self.local_space_shape

    # ------------------------------------------------------------------------------------
    def scatter(self, global_tensor: Optional[Tensor], root: int = 0) -> Tensor:
        """Send each rank its block of a global array held by ``root`` (``None`` elsewhere).

        The adjoint of :meth:`gather` (``<scatter(X), y>`` summed over ranks ``= <X, gather(y)>``).
        """
        world = self.world
        if world.rank == root:
            if global_tensor is None:
                raise ValueError("the root rank must pass the global array to scatter")
            self._check_global(global_tensor.shape)
            header = torch.tensor(list(global_tensor.shape[:2]) + [_DTYPES.index(global_tensor.dtype)])
        else:
            header = torch.zeros(3, dtype=torch.int64)
        header = world.broadcast(header.to(torch.int64), root)
        batch, channels, code = (int(v) for v in header)
        if world.rank == root:
            for r in range(world.size):
                if r != root:
                    world.sendrecv(global_tensor[self._block(r, batch)].contiguous(), r, None, None)
            return global_tensor[self._block(root, batch)].clone()
        out = torch.empty(self.local_shape(batch, channels), dtype=_DTYPES[code])
        world.sendrecv(None, None, out, root)
        return out

    def gather(self, local: Tensor, root: int = 0) -> Optional[Tensor]:
        """Assemble the blocks of every rank into the global array on ``root`` (``None`` elsewhere)."""
        world = self.world
        if tuple(local.shape[2:]) != self.local_space_shape:
            raise ValueError(
                f"expected a local block with space shape {self.local_space_shape}, got {tuple(local.shape)}"
            )
        if world.rank != root:
            world.sendrecv(local.contiguous(), root, None, None)
            return None
        batch = local.shape[0] * self.batch_ranks
        out = local.new_empty((batch, local.shape[1]) + self.space_shape)
        for r in range(world.size):
            block = self._block(r, batch)
            if r == root:
                out[block] = local
            else:
                buf = local.new_empty(local.shape)
                world.sendrecv(None, None, buf, r)
                out[block] = buf
        return out

    def __repr__(self) -> str:
        return (f"Partition(space_shape={self.space_shape}, grid={self.grid}, rank={self.rank}, "
                f"coords={self.coords}, batch_coord={self.batch_coord})")


_DTYPES = [torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool]


def serial_partition(space_shape: Sequence[int]) -> Partition:
    """The grid of one process over ``space_shape`` (serial runs)."""
    return Partition(space_shape, (1,) * (len(space_shape) + 1), SerialComm())
