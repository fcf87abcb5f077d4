"""Train a 3D conditional flow on volumes split over MPI ranks, then sample its posterior on the grid.

    python -m applications.distributed_volume.make_data                  # data/train.h5, data/test.h5
    mpiexec -n 4 python -m mpi4py -m applications.distributed_volume     # config.toml: grid = [2, 2, 1, 1]
    mpiexec -n 2 python -m mpi4py -m applications.distributed_volume --set distributed.grid=[1,2,1,1]

Trains the network of the config with invnet's trainer on the config's grid (each rank reads only
its subdomain of its batch group's samples; rerunning the command resumes a stopped run, a
finished one is only sampled again), then draws posterior samples of the test volumes with
invnet's sampling job on the same split of space: one Zarr store RUN/posterior.zarr (mean, std,
samples; each rank writes its own chunks) and the calibration numbers in RUN/results.json (or
--results), written by rank 0. The same two steps as jobs: `invnet train config.toml`, then
`invnet sample RUN --data test.h5 --out posterior.zarr`, both under mpiexec.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

from invnet.data.atomic import atomic_file
from invnet.distributed import default_comm
from invnet.inference import sample_job

from ..common import app_parser, load_app_config, run_main, train

HERE = os.path.dirname(os.path.abspath(__file__))


def held_out_path(train_path: str) -> str:
    """The test file beside the training file: ``data/train.h5 -> data/test.h5``.

    >>> held_out_path("/tmp/dv/train.zarr")
    '/tmp/dv/test.zarr'
    """
    folder, name = os.path.split(train_path.rstrip("/"))
    return os.path.join(folder, "test" + os.path.splitext(name)[1])


def main(argv: Optional[list[str]] = None) -> int:
    parser = app_parser("distributed_volume", __doc__, os.path.join(HERE, "config.toml"))
    parser.add_argument("--test", default=None, help="HDF5/Zarr test pairs (x, y) to sample (default: test.* beside "
                                                     "the training file)")
    parser.add_argument("--samples", type=int, default=16, help="posterior samples per test volume")
    parser.add_argument("--results", default=None, help="where to write the metrics JSON (default RUN/results.json)")
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error("--samples must be at least 2")
    cfg = load_app_config(args)  # every rank checks the same config: a bad one is exit 2 on every rank
    train_path = cfg["data"]["path"]
    if train_path is None:
        raise ValueError("this application reads its pairs from a file ([data] path), written by "
                         "`python -m applications.distributed_volume.make_data`")
    test = os.path.abspath(args.test) if args.test else held_out_path(train_path)
    for path in (train_path, test):
        if not os.path.exists(path):
            raise ValueError(f"{path!r} does not exist: write the data first with `python -m "
                             f"applications.distributed_volume.make_data --out {os.path.dirname(path)}`")
    comm = default_comm(cfg["distributed"]["backend"])  # MPI under mpiexec, serial otherwise
    result = train(cfg, args, comm)
    run = cfg["training"]["out_dir"]
    store = os.path.join(run, "posterior.zarr")
    report = sample_job(run, test,  # the run folder: its latest checkpoint, on every rank
                        store, n_samples=args.samples, batch_size=min(8, args.samples),
                        overwrite=True, comm=comm)
    if comm.rank == 0:
        report.update(grid=cfg["distributed"]["grid"] or [comm.size], ranks=comm.size, steps=result.step,
                      final_train_bpd=result.last_train_loss, final_val_bpd=result.last_val_loss,
                      network=cfg["model"], checkpoint=result.checkpoint, store=store)
        out = args.results or os.path.join(run, "results.json")
        with atomic_file(out) as f:
            f.write(json.dumps(report, indent=1) + "\n")
        cov = report.get("coverage", {})
        print(f"posterior of {report.get('observations')} test volumes: RMSE of the mean "
              f"{report.get('rmse_mean'):.4f}, "
              f"mean std {report.get('mean_posterior_std'):.4f}, 90% interval covers "
              f"{cov.get('0.9', {}).get('empirical', float('nan')):.3f}; store {store}; results {out}", flush=True)
    comm.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
