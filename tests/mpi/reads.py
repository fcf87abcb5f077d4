"""Training on patches of 3D volumes over a parallel grid reads each value once, each rank only
its subdomain: every read of x and y (normalisation, batches, validation) is recorded per rank.
Rank 0 first trains serially (the reference: the same global batch, float64), then every rank
trains on the grid. Checks: no read spans more than a rank's share along any split axis; the bytes
read over all ranks equal the serial run's; the loss trajectory equals serial training's (1e-10).
Run: mpiexec -n N python -m mpi4py tests/mpi/reads.py --data VOL.h5 --tmp DIR --grid B P1 P2 P3"""
import math
import os
import sys

from _common import Verdict, make_comm

from invnet.data import arrays
from invnet.distributed import SerialComm
from invnet.training import trainer_from_config, validate_config

comm = make_comm(sys.argv)
v = Verdict(comm)
data = sys.argv[sys.argv.index("--data") + 1]
tmp = sys.argv[sys.argv.index("--tmp") + 1]
at = sys.argv.index("--grid")
grid = [int(a) for a in sys.argv[at + 1:at + 5]]
PATCH, STEPS, BATCH = [16, 8, 8], 3, 2  # batch per group

READS: list[tuple[str, tuple]] = []
_read = arrays.ArraySource.read


def recording_read(self, region):
    READS.append((self.name, tuple(region)))
    return _read(self, region)


arrays.ArraySource.read = recording_read


def config(out: str, batch: int, grid_=None) -> dict:
    cfg = {"data": {"path": data, "validation_fraction": 0.25, "patch": PATCH},
           "model": {"type": "ConditionalGlow", "hidden": 4, "levels": 2, "depth": 1},
           "optimizer": {"name": "SGD", "lr": 0.02, "momentum": 0.9},
           "training": {"out_dir": os.path.join(tmp, out), "steps": STEPS, "batch_size": batch, "log_every": 1,
                        "validate_every": 3, "progress": False, "precision": "float64"}}
    if grid_ is not None:
        cfg["distributed"] = {"grid": grid_}
    return validate_config(cfg)


def space_bytes(region: tuple, shape: tuple) -> int:
    return math.prod(len(range(*s.indices(n))) for s, n in zip(region, shape)) * 8


def run(cfg: dict, group) -> tuple[list, float]:
    READS.clear()
    trainer = trainer_from_config(cfg, group)
    result = trainer.fit()
    shape = trainer.batches.dataset.x.shape
    total = sum(space_bytes(region, shape) for name, region in READS)  # x and y share the shape here
    return [r["train_bpd"] for r in trainer.metrics.read()] if group.rank == 0 else [], total, result


reference = None
if comm.rank == 0:
    losses, total, _ = run(config(f"serial_{comm.size}", BATCH * grid[0]), SerialComm())
    reference = (losses, total)
reference = comm.bcast(reference)
comm.barrier()
losses, mine, result = run(config(f"grid_{comm.size}", BATCH, grid), comm)
v.check("trained", result.status == "finished" and result.step == STEPS)
full = (16, 8, 12)
for name, region in READS:
    for axis, (s, n, p) in enumerate(zip(region[2:], full, grid[1:])):
        extent = len(range(*s.indices(n)))
        if p > 1:
            v.check(f"{name} read {region}: axis {axis} within this rank's share", extent <= n // p, f"extent {extent}")
total = comm.allreduce_scalar(mine)
v.check("every value read once over the ranks", total == reference[1], f"{total} vs serial {reference[1]}")
if comm.rank == 0:
    worst = max(abs(a - b) / abs(a) for a, b in zip(reference[0], losses))
    v.close("loss trajectory equals serial training", worst, 1e-10)
    v.check("all steps logged", len(losses) == STEPS)
    print(f"{comm.size} ranks, grid {grid}: {len(READS)} reads on rank 0, bytes {total} = serial {reference[1]}",
          flush=True)
v.finish()
