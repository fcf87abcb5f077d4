"""What one process reads: its batch group's share of the samples and its subdomain of each."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Shard"]


@dataclass(frozen=True)
class Shard:
    r"""This process's part of the data, as a parallel strategy hands it to a batch source
    (:meth:`invnet.distributed.ParallelStrategy.shard`).

    * ``group`` of ``groups``: the batch groups split every global batch (and the validation
      and normalisation samples) into contiguous parts; group ``g`` keeps the ``g``-th.
    * ``cell`` of ``cells``: this process's place on the grid of subdomains (one entry per
      space axis; ``()`` reads whole samples). Along an axis of size :math:`n` split into
      :math:`p` parts, part :math:`c` is :math:`[\lfloor cn/p \rfloor, \lfloor (c+1)n/p \rfloor)`:
      equal blocks when :math:`p` divides :math:`n` (training checks that it does), a partition of
      the axis otherwise. Arrays on the grid of ``x`` are cut to it; others (vectors,
      observations on another grid) are read whole: they are replicated over the ranks that
      share a sample.

    The serial shard (the default) reads everything.

    >>> s = Shard(group=1, groups=2, cell=(1, 0), cells=(2, 1))
    >>> s.samples([3, 5, 8, 9, 10]).tolist(), s.region((8, 8), corner=(0, 2))
    ([9, 10], (slice(4, 8, None), slice(2, 10, None)))
    """

    group: int = 0
    groups: int = 1
    cell: tuple[int, ...] = ()
    cells: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.group < self.groups:
            raise ValueError(f"batch group must lie in [0, {self.groups}), got {self.group}")
        if len(self.cell) != len(self.cells) or not all(0 <= c < p for c, p in zip(self.cell, self.cells)):
            raise ValueError(f"cell {self.cell} does not lie on a grid of {self.cells} subdomains")

    @property
    def splits_space(self) -> bool:
        """Whether this process reads a part of each sample (not the whole)."""
        return any(p > 1 for p in self.cells)

    def samples(self, indices: Sequence[int]) -> np.ndarray:
        """This group's contiguous part of ``indices`` (``numpy.array_split``: the first groups
        get one more when they do not divide evenly)."""
        return np.array_split(np.asarray(indices, dtype=np.int64), self.groups)[self.group]

    def region(self, size: Sequence[int], corner: Sequence[int] = ()) -> tuple[slice, ...]:
        """Space slices of this subdomain of a box of shape ``size`` at ``corner`` (a patch, or
        the whole sample with no corner)."""
        corner = tuple(corner) or (0,) * len(size)
        if not self.cells:
            return tuple(slice(int(c), int(c) + int(n)) for c, n in zip(corner, size))
        if len(self.cells) != len(size):
            raise ValueError(f"the shard splits {len(self.cells)} space axes, the data have {len(size)}")
        return tuple(slice(int(o) + c * int(n) // p, int(o) + (c + 1) * int(n) // p)
                     for o, n, c, p in zip(corner, size, self.cell, self.cells))
