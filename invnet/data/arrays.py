"""Lazy array sources over HDF5 datasets and Zarr arrays: open, validate, read by region."""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

__all__ = ["ArraySource", "open_array", "storage_format"]

_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")


def storage_format(path: str) -> str:
    """``"hdf5"`` or ``"zarr"``, judged from the path (a ``.zarr`` name or a directory is Zarr).

    >>> storage_format("train.h5"), storage_format("results.zarr")
    ('hdf5', 'zarr')
    """
    lower = str(path).lower().rstrip("/")
    if lower.endswith(_HDF5_SUFFIXES):
        return "hdf5"
    if lower.endswith(".zarr") or os.path.isdir(path):
        return "zarr"
    raise ValueError(
        f"cannot tell the storage format of {path!r}: expected an HDF5 file ({', '.join(_HDF5_SUFFIXES)}) "
        "or a Zarr store (a directory, usually named *.zarr)"
    )


class ArraySource:
    r"""A read-only view of one array in an HDF5 file or a Zarr store, read region by region.

    Nothing is loaded when the source is opened; :meth:`read` fetches only the requested region
    (HDF5 and Zarr then read only the chunks it touches). ``max_read_bytes`` bounds a single read,
    so code that would pull a whole large file into memory fails loudly instead; ``bytes_read``,
    ``reads`` and ``largest_read`` (bytes of the biggest single read) count what was fetched (used
    by tests and by curious users).

    Args:
        array: an ``h5py.Dataset`` or ``zarr.Array`` (anything with ``shape``, ``dtype`` and
            numpy-style slicing).
        name: a description used in error messages (``file:array``).
        max_read_bytes: optional bound on the bytes of one read.

    >>> import numpy as np
    >>> src = ArraySource(np.arange(24.0).reshape(4, 1, 6), "demo", max_read_bytes=100)
    >>> src.read((slice(1, 3),)).shape, src.reads, src.bytes_read
    ((2, 1, 6), 1, 96)
    """

    def __init__(self, array: Any, name: str, max_read_bytes: Optional[int] = None, handle: Any = None) -> None:
        self.array = array
        self.name = name
        self.max_read_bytes = max_read_bytes
        self.handle = handle
        self.reads = 0
        self.bytes_read = 0
        self.largest_read = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def chunks(self) -> tuple[int, ...]:
        """Chunk shape on disk (the whole array for a contiguous HDF5 dataset)."""
        chunks = getattr(self.array, "chunks", None)
        return tuple(int(c) for c in chunks) if chunks else self.shape

    def region_nbytes(self, region: tuple[slice, ...]) -> int:
        n = self.dtype.itemsize
        for axis, size in enumerate(self.shape):
            s = region[axis] if axis < len(region) else slice(None)
            n *= len(range(*s.indices(size)))
        return n

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """Read ``array[region]`` (basic slices only) as a numpy array."""
        nbytes = self.region_nbytes(region)
        if self.max_read_bytes is not None and nbytes > self.max_read_bytes:
            raise ValueError(
                f"reading {nbytes} bytes from {self.name} at once exceeds max_read_bytes={self.max_read_bytes}; "
                "read smaller regions"
            )
        out = np.asarray(self.array[region])
        self.reads += 1
        self.bytes_read += nbytes
        self.largest_read = max(self.largest_read, nbytes)
        return out

    def close(self) -> None:
        if self.handle is not None and hasattr(self.handle, "close"):
            self.handle.close()
        self.handle = None


def open_array(path: str, name: str, max_read_bytes: Optional[int] = None) -> ArraySource:
    """Open array ``name`` in the HDF5 file or Zarr store at ``path`` without reading its data.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for a missing array (naming
    the arrays that exist) or a non-numeric dtype.

    >>> import tempfile, os, h5py, numpy as np
    >>> p = os.path.join(tempfile.mkdtemp(), "a.h5")
    >>> with h5py.File(p, "w") as f:
    ...     _ = f.create_dataset("x", data=np.zeros((3, 1, 4), "f4"))
    >>> open_array(p, "x").shape
    (3, 1, 4)
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    fmt = storage_format(path)
    if fmt == "hdf5":
        import h5py

        try:
            handle = h5py.File(path, "r")
        except OSError as err:
            raise ValueError(f"{path!r} is not a readable HDF5 file: {err}") from None
        if name not in handle or not isinstance(handle[name], h5py.Dataset):
            names = sorted(k for k in handle.keys() if isinstance(handle[k], h5py.Dataset))
            handle.close()
            raise ValueError(f"HDF5 file {path!r} has no dataset {name!r}; it holds {names}")
        array = handle[name]
    else:
        import zarr

        try:
            handle = zarr.open_group(path, mode="r")
        except Exception as err:  # zarr raises several types for a non-store directory
            raise ValueError(f"{path!r} is not a readable Zarr group: {err}") from None
        names = sorted(handle.array_keys())
        if name not in names:
            raise ValueError(f"Zarr store {path!r} has no array {name!r}; it holds {names}")
        array = handle[name]
    src = ArraySource(array, f"{path}:{name}", max_read_bytes, handle if fmt == "hdf5" else None)
    if src.dtype.kind not in "fiu":
        src.close()
        raise ValueError(f"{src.name} has dtype {src.dtype}; expected a real floating-point or integer dtype")
    return src
