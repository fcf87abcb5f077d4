"""Distributed invnet: data parallelism and domain decomposition of one volume over MPI ranks.

Launch with ``mpiexec -n N python -m mpi4py script.py`` (``-m mpi4py`` turns an exception on one
rank into an abort of all, instead of a hang). See docs/distributed.md.
"""
from .comm import Communicator, MPIComm, SerialComm, TorchComm, agree_on_errors, default_comm
from .data_parallel import DataParallel, allreduce_gradients, broadcast_parameters, use_global_statistics
from .decompose import DecomposedFlow, check_decomposable, count_squeezes, decompose
from .halo import HaloPad, halo_exchange
from .partition import Partition, validate_grid
from .reduce import sum_over_ranks
from .strategy import ParallelStrategy

__all__ = [
    "Communicator", "MPIComm", "SerialComm", "TorchComm", "default_comm", "agree_on_errors", "ParallelStrategy",
    "Partition", "validate_grid", "HaloPad", "halo_exchange", "sum_over_ranks",
    "decompose", "DecomposedFlow", "count_squeezes", "check_decomposable",
    "DataParallel", "allreduce_gradients", "broadcast_parameters", "use_global_statistics",
]
