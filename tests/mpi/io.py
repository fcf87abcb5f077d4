"""Each rank reads only its block from HDF5 and Zarr and writes its own chunk of a Zarr result.
Run: mpiexec -n N python -m mpi4py tests/mpi/io.py --tmp DIR"""
import os
import sys

import h5py
import numpy as np
import torch
import zarr
from _common import Verdict, make_comm

from invnet.distributed import Partition
from invnet.distributed.io import create_result_array, read_subdomain, write_subdomain

comm = make_comm(sys.argv)
v = Verdict(comm)
n = comm.size
tmp = sys.argv[sys.argv.index("--tmp") + 1]
grids = {1: [(1, 1, 1)], 2: [(1, 2, 1), (2, 1, 1)], 4: [(1, 2, 2), (2, 1, 2)]}[n]
for grid in grids:
    tag = "x".join(map(str, grid))
    part = Partition((8, 12), grid, comm)
    data = np.random.default_rng(0).standard_normal((4, 2, 8, 12)).astype("float32")
    h5, zr = os.path.join(tmp, f"in_{tag}.h5"), os.path.join(tmp, f"in_{tag}.zarr")
    if comm.rank == 0:
        with h5py.File(h5 + ".tmp", "w") as f:
            f.create_dataset("x", data=data, chunks=(1, 2, 4, 4))
        os.replace(h5 + ".tmp", h5)
        zarr.create_array(store=zr, name="x", data=data, chunks=(1, 2, 4, 4), overwrite=True)
    comm.barrier()
    expected = part.local_view(torch.from_numpy(data))
    v.check(f"grid {grid}: HDF5 block", torch.equal(read_subdomain(h5, "x", part), expected))
    v.check(f"grid {grid}: Zarr block", torch.equal(read_subdomain(zr, "x", part), expected))
    out = create_result_array(os.path.join(tmp, f"out_{tag}.zarr"), "mean", part, 4, 2)
    v.check(f"grid {grid}: one chunk per rank", tuple(out.chunks) == part.local_shape(4, 2))
    write_subdomain(out, 2 * expected, part)
    comm.barrier()
    if comm.rank == 0:
        back = zarr.open_group(os.path.join(tmp, f"out_{tag}.zarr"), mode="r")["mean"][:]
        v.check(f"grid {grid}: gathered result", np.array_equal(back, 2 * data))
v.finish()
