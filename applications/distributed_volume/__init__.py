"""A 3D conditional flow on volumes split over MPI ranks, trained and sampled by invnet's jobs.

``mpiexec -n 4 python -m mpi4py -m applications.distributed_volume`` trains the ConditionalGlow of
``config.toml`` (``[distributed] grid = [2, 2, 1, 1]``: two batch groups, every volume split over
two ranks) through ``invnet.training`` and writes the posterior mean and standard deviation of the
test volumes to one Zarr store, each rank its own chunks; the data come from
``python -m applications.distributed_volume.make_data``. README.md in this folder.

Nothing is imported here, so that ``python -m applications.distributed_volume.make_data`` runs
its module once.
"""
