"""One rank raises in the middle of the work while the others wait in a collective: under
``python -m mpi4py`` the whole job must end quickly with a non-zero exit (no hang).
Run: mpiexec -n N python -m mpi4py tests/mpi/failure.py"""
import sys

import torch
from _common import make_comm

from invnet.distributed import Partition, halo_exchange

comm = make_comm(sys.argv)
n = comm.size
part = Partition((8 * n, 8), (1, n, 1), comm)
x = torch.randn(1, 2, 8, 8)
halo_exchange(x, 1, (part.neighbors(0), part.neighbors(1)), part.spatial)  # some real traffic first
if comm.rank == n - 1:
    raise RuntimeError(f"deliberate failure on rank {comm.rank}")
comm.barrier()  # the other ranks wait here for a partner that never comes
comm.allreduce_sum(x)
print("UNREACHABLE: the job went on after a rank failed", flush=True)
