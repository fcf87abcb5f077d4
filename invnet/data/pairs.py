"""Pairs (x, y) of unknowns and observations stored as two arrays with a common first axis."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np

from .arrays import ArraySource, open_array
from .shard import Shard

__all__ = ["PairDataset", "open_pairs"]


class PairDataset:
    r"""Samples :math:`(x_i, y_i)` read lazily from two arrays shaped ``(N, C, *space)``.

    ``x`` is the unknown (what the network models), ``y`` the observation (its condition). Reads
    go through :class:`~invnet.data.arrays.ArraySource`, region by region, so a file far larger
    than memory is fine. With ``patch`` set, ``x`` and ``y`` must share their space shape and a
    sample is a patch cut at the same place from both (the corner is chosen by the caller, e.g.
    :class:`~invnet.data.loader.BatchLoader`, from its own seeded generator).

    Args:
        x, y: the two sources.
        patch: optional patch size per space axis.

    >>> import numpy as np
    >>> from invnet.data.arrays import ArraySource
    >>> ds = PairDataset(ArraySource(np.zeros((5, 1, 8, 8), "f4"), "x"), ArraySource(np.ones((5, 2, 8, 8), "f4"), "y"))
    >>> xb, yb = ds.read([3, 0])
    >>> len(ds), xb.shape, yb.shape, ds.x_shape, ds.y_shape
    (5, (2, 1, 8, 8), (2, 2, 8, 8), (1, 8, 8), (2, 8, 8))
    """

    def __init__(self, x: ArraySource, y: ArraySource, patch: Optional[Sequence[int]] = None) -> None:
        for name, src in (("x", x), ("y", y)):
            if len(src.shape) < 2:
                raise ValueError(f"{src.name} ({name}) must be shaped (samples, channels, *space), got {src.shape}")
            if len(src.shape) > 5:
                raise ValueError(f"{src.name} ({name}) has {len(src.shape) - 2} space axes; at most 3 are supported")
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x and y must hold the same number of samples: {x.name} has {x.shape[0]}, {y.name} has {y.shape[0]}"
            )
        if x.shape[0] < 1:
            raise ValueError(f"{x.name} holds no samples")
        self.patch: Optional[tuple[int, ...]] = None
        if patch is not None:
            patch = tuple(int(p) for p in patch)
            space = x.shape[2:]
            if y.shape[2:] != space:
                raise ValueError(
                    f"patches need x and y with the same space shape; got {x.shape[2:]} and {y.shape[2:]}"
                )
            if len(patch) != len(space) or any(p < 1 or p > s for p, s in zip(patch, space)):
                raise ValueError(f"patch {patch} must have one size per space axis of {space}, each 1..size")
            self.patch = patch
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def x_shape(self) -> tuple[int, ...]:
        """Shape of one ``x`` sample as served (patched if ``patch`` is set)."""
        return (self.x.shape[1],) + (self.patch or self.x.shape[2:])

    @property
    def y_shape(self) -> tuple[int, ...]:
        return (self.y.shape[1],) + (self.patch or self.y.shape[2:])

    @property
    def y_on_x_grid(self) -> bool:
        """Whether ``y`` lives on the grid of ``x`` (same space shape, at least one space axis):
        then a shard that splits space cuts ``y`` like ``x``; otherwise ``y`` is read whole."""
        return len(self.x.shape) > 2 and self.y.shape[2:] == self.x.shape[2:]

    def _space_regions(self, shard: Optional[Shard], corner: Sequence[int] = (),
                       size: Optional[Sequence[int]] = None) -> tuple[tuple, tuple]:
        """The space regions of ``x`` and ``y`` to read: the shard's subdomain of the box at
        ``corner`` (of ``size``: the patch, else the whole sample); ``y`` whole unless on the grid."""
        size = tuple(size or self.patch or self.x.shape[2:])
        x_space = (shard or Shard()).region(size, corner)
        if self.y_on_x_grid:
            return x_space, x_space
        return x_space, tuple(slice(None) for _ in self.y.shape[2:])

    def read(self, indices: Sequence[int], corners: Optional[Sequence[Sequence[int]]] = None,
             shard: Optional[Shard] = None) -> tuple[np.ndarray, np.ndarray]:
        """Read samples ``indices`` (any order) as float arrays; with patches, ``corners[k]`` is
        the patch corner of sample ``k`` (required then). With a ``shard`` that splits space,
        only its subdomain of each sample (or patch) is read (of ``y`` too when it lives on the
        grid of ``x``; see :class:`~invnet.data.shard.Shard`); its batch group is not applied here
        (``indices`` are already this group's)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"sample indices must lie in [0, {len(self)}), got {idx.min()}..{idx.max()}")
        if self.patch is not None:
            if corners is None or len(corners) != len(idx):
                raise ValueError("a patched dataset needs one corner per index")
            xs, ys = [], []
            for i, corner in zip(idx, corners):
                x_space, y_space = self._space_regions(shard, corner)
                rows = (slice(int(i), int(i) + 1), slice(None))
                xs.append(self.x.read(rows + x_space))
                ys.append(self.y.read(rows + y_space))
            return np.concatenate(xs).astype(np.float64, copy=False), np.concatenate(ys).astype(np.float64, copy=False)
        x_space, y_space = self._space_regions(shard)
        return self._read_rows(self.x, idx, x_space), self._read_rows(self.y, idx, y_space)

    @staticmethod
    def _read_rows(src: ArraySource, idx: np.ndarray, space: tuple[slice, ...] = ()) -> np.ndarray:
        # Read each run of consecutive sorted indices as one region, then restore the order asked for.
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        parts = []
        start = 0
        for k in range(1, len(sorted_idx) + 1):
            if k == len(sorted_idx) or sorted_idx[k] != sorted_idx[k - 1] + 1:
                lo, hi = int(sorted_idx[start]), int(sorted_idx[k - 1]) + 1
                parts.append(src.read((slice(lo, hi), slice(None)) + tuple(space)))
                start = k
        if parts:
            block = np.concatenate(parts)
        else:
            sizes = [len(range(*s.indices(n))) for s, n in zip(space, src.shape[2:])] + list(src.shape[2 + len(space):])
            block = np.zeros((0, src.shape[1], *sizes) if len(src.shape) > 1 else (0,), src.dtype)
        out = np.empty_like(block)
        out[order] = block
        return out.astype(np.float64, copy=False)

    def iter_blocks(self, indices: Optional[Sequence[int]] = None, rows: Optional[int] = None,
                    shard: Optional[Shard] = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream whole samples (or their ``shard``'s subdomain) in blocks of consecutive rows
        (``rows`` defaults to the on-disk chunk length of ``x`` along the sample axis), restricted
        to ``indices`` when given."""
        if rows is None:
            rows = max(1, self.x.chunks[0])
        idx = np.arange(len(self)) if indices is None else np.sort(np.asarray(indices, dtype=np.int64))
        # whole samples (not patches): with a shard, its part of each whole sample
        x_space, y_space = self._space_regions(shard, size=self.x.shape[2:]) if shard is not None else ((), ())
        for k in range(0, len(idx), rows):
            yield self._read_rows(self.x, idx[k:k + rows], x_space), self._read_rows(self.y, idx[k:k + rows], y_space)

    def close(self) -> None:
        self.x.close()
        self.y.close()


def open_pairs(
    path: str,
    x: str = "x",
    y: str = "y",
    patch: Optional[Sequence[int]] = None,
    max_read_bytes: Optional[int] = None,
) -> PairDataset:
    """Open arrays ``x`` and ``y`` of an HDF5 file or Zarr store as a :class:`PairDataset`,
    checking names, dtypes, counts and shapes (nothing is read yet).

    >>> import tempfile, os, h5py, numpy as np
    >>> p = os.path.join(tempfile.mkdtemp(), "pairs.h5")
    >>> with h5py.File(p, "w") as f:
    ...     _ = f.create_dataset("x", data=np.zeros((4, 1, 8), "f4"))
    ...     _ = f.create_dataset("y", data=np.zeros((3, 1, 8), "f4"))
    >>> open_pairs(p)
    Traceback (most recent call last):
    ...
    ValueError: x and y must hold the same number of samples: ...
    """
    xs = open_array(path, x, max_read_bytes)
    try:
        ys = open_array(path, y, max_read_bytes)
    except Exception:
        xs.close()
        raise
    try:
        return PairDataset(xs, ys, patch)
    except Exception:
        xs.close()
        ys.close()
        raise
