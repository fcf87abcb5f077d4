"""Results (posterior samples, mean, std) written into a Zarr store region by region."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # zarr is imported where a store is opened
    import zarr

__all__ = ["ZarrResultWriter", "chunk_aligned_range"]


def chunk_aligned_range(n: int, chunk: int, rank: int, size: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of ``n`` that rank ``rank`` of ``size`` owns when whole chunks of
    ``chunk`` rows are dealt out as evenly as possible, so no two ranks ever write one chunk.

    >>> [chunk_aligned_range(10, 2, r, 3) for r in range(3)]
    [(0, 4), (4, 8), (8, 10)]
    """
    if chunk < 1 or n < 0 or not 0 <= rank < size:
        raise ValueError(
            f"need chunk >= 1, n >= 0 and 0 <= rank < size; got chunk={chunk}, n={n}, rank={rank}, size={size}"
        )
    n_chunks = -(-n // chunk)
    per, extra = divmod(n_chunks, size)
    first = rank * per + min(rank, extra)
    count = per + (1 if rank < extra else 0)
    return min(first * chunk, n), min((first + count) * chunk, n)


class ZarrResultWriter:
    r"""A Zarr group of result arrays written region by region.

    :meth:`create` lays out the arrays once (one process); afterwards any process may
    :meth:`open` the store and :meth:`write` regions. A region must be chunk-aligned (start on a
    chunk boundary and end on one or at the array's end) along every axis, so concurrent writers
    that own disjoint aligned regions (see :func:`chunk_aligned_range`) never touch the same chunk
    and need no locks. Nothing is held in memory beyond the region being written.

    >>> import tempfile, os, numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "r.zarr")
    >>> w = ZarrResultWriter.create(path, {"mean": ((4, 1, 3), (2, 1, 3), "f4")}, attrs={"n_samples": 8})
    >>> w.write("mean", 2, np.ones((2, 1, 3)))
    >>> r = ZarrResultWriter.open(path).read("mean")  # rows never written stay NaN
    >>> float(r[2:].sum()), bool(np.isnan(r[:2]).all()), ZarrResultWriter.open(path).attrs["n_samples"]
    (6.0, True, 8)
    """

    def __init__(self, group: zarr.Group) -> None:
        self.group = group

    @classmethod
    def create(
        cls, path: str, arrays: dict[str, tuple[Sequence[int], Sequence[int], str]], attrs: Optional[dict] = None,
        overwrite: bool = False,
    ) -> ZarrResultWriter:
        """Create the store with ``arrays = {name: (shape, chunks, dtype)}`` and attributes."""
        import zarr

        for name, spec in arrays.items():
            if len(spec) != 3 or len(spec[0]) != len(spec[1]) or any(int(c) < 1 for c in spec[1]):
                raise ValueError(
                    f"array {name!r} needs (shape, chunks, dtype) with one positive chunk size per axis, got {spec}"
                )
        if os.path.exists(path) and not overwrite:
            raise ValueError(f"{path!r} already exists; choose another output or pass overwrite=True")
        group = zarr.open_group(path, mode="w")
        for name, (shape, chunks, dtype) in arrays.items():
            group.create_array(name, shape=tuple(int(s) for s in shape), chunks=tuple(int(c) for c in chunks),
                               dtype=dtype, fill_value=np.nan if np.dtype(dtype).kind == "f" else 0)
        if attrs:
            group.attrs.update(attrs)
        return cls(group)

    @classmethod
    def open(cls, path: str) -> ZarrResultWriter:
        import zarr

        if not os.path.exists(path):
            raise FileNotFoundError(f"result store {path!r} does not exist")
        return cls(zarr.open_group(path, mode="r+"))

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self.group[name][...])

    def write(self, name: str, start: int | Sequence[int], data: np.ndarray) -> None:
        """Write ``data`` at ``start`` (a row index, or one index per axis) of array ``name``."""
        if name not in self.group:
            raise ValueError(f"no result array {name!r}; the store holds {sorted(self.group.array_keys())}")
        arr = self.group[name]
        data = np.asarray(data)
        starts = [int(start)] + [0] * (arr.ndim - 1) if np.isscalar(start) else [int(s) for s in start]
        if len(starts) != arr.ndim or data.ndim != arr.ndim:
            raise ValueError(f"{name}: start and data need {arr.ndim} axes, got start {starts} and data {data.shape}")
        region = []
        for axis, (s, n, size, chunk) in enumerate(zip(starts, data.shape, arr.shape, arr.chunks)):
            stop = s + n
            if s < 0 or stop > size:
                raise ValueError(f"{name}: region [{s}, {stop}) on axis {axis} lies outside [0, {size})")
            if s % chunk or (stop % chunk and stop != size):
                raise ValueError(
                    f"{name}: region [{s}, {stop}) on axis {axis} is not aligned to chunks of {chunk}; "
                    "aligned regions let writers in parallel never share a chunk"
                )
            region.append(slice(s, stop))
        arr[tuple(region)] = data.astype(arr.dtype, copy=False)
