"""Rank-aware reading and writing: each rank reads only its own samples and subdomain from HDF5
or Zarr, and writes its own chunk-aligned region of a Zarr result array.

pip's h5py has no MPI driver, so every rank opens the HDF5 file read-only with plain h5py and
slices its block (HDF5 then reads only the chunks that block touches). Results go to Zarr with
one chunk per rank block, ``(local_batch, channels, *local_space)``: no two ranks ever write the
same chunk, so no locking is needed. Rank 0 creates the array, everyone waits at a barrier, then
each rank writes its block.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch import Tensor

from ..data.arrays import open_array
from .partition import Partition

if TYPE_CHECKING:  # zarr is imported where an array is made
    import zarr

__all__ = ["array_shape", "read_subdomain", "create_result_array", "write_subdomain"]


def array_shape(path: str, name: str) -> tuple[int, ...]:
    """Shape of the array ``name`` in an HDF5 file or Zarr store (metadata only, no data read)."""
    src = open_array(path, name)
    try:
        return src.shape
    finally:
        src.close()


def read_subdomain(
    path: str, name: str, partition: Partition, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Read this rank's block ``(local_batch, C, *local_space)`` of the array ``name`` (shape
    ``(N, C, *space)``) in an HDF5 file or Zarr store: its batch group's samples and its subdomain.
    Opening and errors are those of :func:`invnet.data.open_array`.

    >>> import tempfile, os, h5py, numpy as np
    >>> from invnet.distributed import Partition, SerialComm
    >>> path = os.path.join(tempfile.mkdtemp(), "x.h5")
    >>> with h5py.File(path, "w") as f:
    ...     _ = f.create_dataset("x", data=np.arange(32.0).reshape(2, 1, 4, 4))
    >>> read_subdomain(path, "x", Partition((4, 4), (1, 1, 1), SerialComm())).shape
    torch.Size([2, 1, 4, 4])
    """
    src = open_array(path, name)
    try:
        shape = src.shape
        if len(shape) != partition.ndim + 2 or shape[2:] != partition.space_shape:
            raise ValueError(
                f"{path}:{name} has shape {shape}; the partition expects (N, C, *{partition.space_shape})"
            )
        region = (partition.batch_slice(shape[0]), slice(None)) + partition.space_slices
        block = src.read(region)
    finally:
        src.close()
    return torch.from_numpy(np.ascontiguousarray(block)).to(dtype)


def create_result_array(path: str, name: str, partition: Partition, global_batch: int, channels: int,
                        dtype: str = "float32", attrs: Optional[dict] = None) -> zarr.Array:
    """Create (on rank 0; the others wait at a barrier and open it) a Zarr array
    ``(global_batch, channels, *space)`` chunked exactly by rank blocks. Returns the array."""
    import zarr

    chunks = partition.local_shape(global_batch, channels)
    shape = (global_batch, channels) + partition.space_shape
    if partition.world.rank == 0:
        arr = zarr.create_array(store=path, name=name, shape=shape, chunks=chunks, dtype=dtype, overwrite=True,
                                fill_value=np.nan)
        if attrs:
            arr.attrs.update(attrs)
    partition.world.barrier()
    return zarr.open_group(path, mode="r+")[name]


def write_subdomain(arr: zarr.Array, local: Tensor, partition: Partition) -> None:
    """Write this rank's block into a result array made by :func:`create_result_array` (exactly
    one chunk, so ranks never share a chunk)."""
    global_batch = arr.shape[0]
    expected = partition.local_shape(global_batch, arr.shape[1])
    if tuple(local.shape) != expected:
        raise ValueError(f"this rank's block must have shape {expected}, got {tuple(local.shape)}")
    region = (partition.batch_slice(global_batch), slice(None)) + partition.space_slices
    arr[region] = local.detach().cpu().numpy().astype(arr.dtype)
