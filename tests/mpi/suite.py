"""Runs several MPI test scripts in one launch (one interpreter start per rank instead of one
per script), with one verdict reduced at the end.
Run: mpiexec -n N python -m mpi4py tests/mpi/suite.py primitives data_parallel bad_config [gloo]"""
import runpy
import sys
from pathlib import Path

import _common

_common.SUITE = True
here = Path(__file__).resolve().parent
names = [a for a in sys.argv[1:] if (here / f"{a}.py").exists()]
if not names:
    raise SystemExit("name at least one script of tests/mpi to run")
for name in names:
    runpy.run_path(str(here / f"{name}.py"), run_name="__suite__")
comm = _common.make_comm(sys.argv)
_common.Verdict(comm).finish(final=True)
