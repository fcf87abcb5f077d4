"""`invnet sample`'s job split over ranks: each rank samples its chunk-aligned block of
observations into rank 0's temporary store, which is renamed into place when every part is in.
Run: mpiexec -n N python -m mpi4py tests/mpi/sample.py --run RUN --data DATA.h5 --tmp DIR
(DIR holds serial.zarr: the same job on one process, seed 3, rows 0..4)."""
import os
import sys

import numpy as np
import zarr
from _common import Verdict, make_comm

from invnet.inference import sample_job

comm = make_comm(sys.argv)
v = Verdict(comm)
arg = {k: sys.argv[sys.argv.index(k) + 1] for k in ("--run", "--data", "--tmp")}
out = os.path.join(arg["--tmp"], f"ranks{comm.size}.zarr")
report = sample_job(arg["--run"], arg["--data"], out, n_samples=6, keep=2, indices=range(5), seed=3, comm=comm)
v.check("calibration over every rank's observations", report["observations"] == 5 and report["elements"] == 5 * 64)
v.check("SBC and TARP over every rank's observations",
        report["sbc"]["observations"] == 5 and report["tarp"]["observations"] == 5)
comm.barrier()
if comm.rank == 0:
    g, ref = zarr.open_group(out, mode="r"), zarr.open_group(os.path.join(arg["--tmp"], "serial.zarr"), mode="r")
    v.check("every row written once", g["index"][...].tolist() == [0, 1, 2, 3, 4])
    v.check("finite statistics", bool(np.isfinite(g["mean"][...]).all() and (g["std"][...] > 0).all()))
    v.check("marked as invnet's store", g.attrs.get("written_by") == "invnet sample")
    # rank 0 draws its block with the serial job's generator: the same numbers
    n0 = -(-5 // comm.size)
    v.check("rank 0's block equals the serial job's", np.array_equal(g["mean"][:n0], ref["mean"][:n0]))
    # the noise is seeded per observation row (and tile), not per rank: every block does
    v.check("the whole store equals the serial job's", all(np.array_equal(g[k][...], ref[k][...])
                                                           for k in ("mean", "std", "samples", "index")))
    v.check("no temporary left", not [n for n in os.listdir(arg["--tmp"]) if ".tmp-" in n])
    v.check("the report written once, for all", g.attrs["calibration"]["observations"] == 5
            and os.path.exists(os.path.join(arg["--tmp"], f"ranks{comm.size}_report.json")))
v.finish()
