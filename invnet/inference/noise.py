r"""Latent noise that does not depend on how a volume is split over ranks.

Posterior sampling draws :math:`z \sim \mathcal N(0, I)` and maps it through the inverse flow.
When the volume is split over ranks, each rank holds a block of every latent; for the samples to
be the same whatever the grid (and the same as serially), the value at a global latent position
may depend only on the seed, the observation, the sample number and the position. The latent
space of every sample is therefore cut into fixed global tiles of ``tile`` cells per axis (the
tiles at the upper border are cut short); tile :math:`t` of sample :math:`j` of observation
:math:`i` is drawn, all channels at once, from a generator seeded by
``numpy.random.SeedSequence((seed, i, j, *t))``. A rank draws only the tiles its block overlaps
and keeps the overlap, so no rank ever holds more than its block plus one tile.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["TiledNoise", "TILE"]

#: tile edge (latent cells per axis); part of what a store's samples depend on (its ``noise`` attribute)
TILE = 16


class TiledNoise:
    """Standard normal latents for one observation, sample after sample, independent of the grid.

    Args:
        seed: the job's seed.
        row: the observation's row in its file (so the noise does not depend on which rank or
            in which order observations are sampled).
        tile: tile edge in latent cells.

    :meth:`draw` returns the next ``n`` samples' latents, restricted to a block of the global
    latent: the same numbers however the samples are batched and however the volume is split.

    >>> noise = TiledNoise(seed=1, row=7, tile=4)
    >>> whole = noise.draw(2, 3, (6, 8))                      # two samples of a 3 x 6 x 8 latent
    >>> halves = [TiledNoise(1, 7, 4).draw(2, 3, (6, 8), (slice(0, 6), slice(a, a + 4))) for a in (0, 4)]
    >>> bool(torch.equal(torch.cat(halves, -1), whole)), tuple(whole.shape)
    (True, (2, 3, 6, 8))
    >>> later = TiledNoise(1, 7, 4); _ = later.draw(1, 3, (6, 8))
    >>> bool(torch.equal(later.draw(1, 3, (6, 8)), whole[1:]))  # sample 1, whatever the batching
    True
    """

    def __init__(self, seed: int, row: int, tile: int = TILE) -> None:
        if tile < 1:
            raise ValueError(f"tile must be positive, got {tile}")
        self.seed, self.row, self.tile = int(seed), int(row), int(tile)
        self.drawn = 0

    def _tile(self, sample: int, index: tuple[int, ...], channels: int, dtype: torch.dtype) -> Tensor:
        words = np.random.SeedSequence((self.seed, self.row, sample) + index).generate_state(2, np.uint32)
        g = torch.Generator().manual_seed(int(words[0]) << 31 | int(words[1]) >> 1)
        return torch.randn((channels,) + (self.tile,) * len(index), generator=g, dtype=dtype)

    def draw(self, n: int, channels: int, space: Sequence[int], block: Sequence[slice] = (),
             dtype: torch.dtype = torch.float64) -> Tensor:
        """The next ``n`` samples' latents ``(n, channels, *block)`` of a global latent of space
        shape ``space`` (``block``: this rank's part, one slice per axis; default the whole)."""
        space = tuple(int(s) for s in space)
        block = tuple(block) or tuple(slice(0, s) for s in space)
        bounds = [b.indices(s)[:2] for b, s in zip(block, space)]
        out = torch.empty((n, channels) + tuple(hi - lo for lo, hi in bounds), dtype=dtype)
        tiles = [range(lo // self.tile, math.ceil(hi / self.tile)) for lo, hi in bounds]
        for k in range(n):
            for index in itertools.product(*tiles):
                values = self._tile(self.drawn + k, index, channels, dtype)
                src, dst = [slice(None)], [k, slice(None)]
                for t, (lo, hi) in zip(index, bounds):  # the overlap of this tile and the block
                    a, b = max(lo, t * self.tile), min(hi, (t + 1) * self.tile)
                    src.append(slice(a - t * self.tile, b - t * self.tile))
                    dst.append(slice(a - lo, b - lo))
                out[tuple(dst)] = values[tuple(src)]
        self.drawn += n
        return out
