# The files here are MPI programs run under mpiexec by tests/test_mpi.py; pytest (which imports
# every module for --doctest-modules) must not import them.
collect_ignore_glob = ["*.py"]
