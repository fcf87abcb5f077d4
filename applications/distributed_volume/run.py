"""A 3D conditional flow on volumes split across MPI ranks: train q(x | y) on the NLL, then write
the posterior mean and standard deviation of test volumes to Zarr (one chunk per rank block).

    mpiexec -n 2 python -m mpi4py applications/distributed_volume/run.py \\
        --data /tmp/dv/data.h5 --out /tmp/dv/posterior.zarr --grid 1 2 1 1

``--data`` may be the HDF5 file or the Zarr store written by make_data.py. Every rank reads only
its own subdomain of every sample it trains on (and of the test observations), trains the same
replicated ConditionalGlow whose conditioner convolutions exchange halos, and writes its own
block of the posterior statistics. Only rank 0 prints.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402

from invnet.distributed import Partition, decompose, default_comm  # noqa: E402
from invnet.distributed.io import array_shape, create_result_array, read_subdomain, write_subdomain  # noqa: E402
from invnet.networks import ConditionalGlow  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="data.h5 or data.zarr from make_data.py")
    ap.add_argument("--out", required=True, help="Zarr store for the posterior mean and std")
    ap.add_argument("--grid", type=int, nargs=4, default=None, help="batch_ranks px py pz (default: 1 N 1 1)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4, help="global batch (divided over batch ranks)")
    ap.add_argument("--samples", type=int, default=16, help="posterior samples per test volume")
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--levels", type=int, default=2)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    comm = default_comm()
    grid = tuple(args.grid) if args.grid else (1, comm.size, 1, 1)
    n_train, _, *space = array_shape(args.data, "x_train")  # metadata only
    part = Partition(tuple(space), grid, comm, levels=args.levels)
    torch.manual_seed(args.seed)  # identical weights everywhere (and broadcast by decompose)
    net = ConditionalGlow(1, 1, hidden=args.hidden, levels=args.levels, depth=args.depth, ndim=3)
    flow = decompose(net, part)
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    say(f"{comm.size} ranks, grid {grid}, volume {tuple(space)}, block {part.local_space_shape} per rank, "
        f"{n_train} training volumes")

    # each rank reads only its subdomain (of its batch group's share of the samples)
    x_all = read_subdomain(args.data, "x_train", part)
    y_all = read_subdomain(args.data, "y_train", part)
    # global normalisation from sums over every rank's block
    xd = x_all.double()
    sums = comm.allreduce_sum(torch.stack([xd.sum(), (xd * xd).sum(), torch.tensor(float(xd.numel()))]))
    mean = float(sums[0] / sums[2])
    std = float((sums[1] / sums[2] - mean**2) ** 0.5)
    x_all, y_all = (x_all - mean) / std, (y_all - mean) / std

    opt = torch.optim.Adam(flow.parameters(), lr=args.lr)
    local_batch = args.batch // part.batch_ranks
    gen = torch.Generator().manual_seed(args.seed + 1000 * part.batch_coord)  # same picks within a volume's ranks
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x_all.shape[0], (local_batch,), generator=gen)
        opt.zero_grad()
        loss = -flow.log_prob(x_all[idx], y_all[idx]).mean() / x_all[0].numel() / part.spatial_size
        loss.backward()
        flow.reduce_gradients()
        opt.step()
        if step % 10 == 0 or step == 1:
            say(f"step {step:4d}  nll/voxel {comm.allreduce_scalar(loss.item()) / comm.size:+.4f}  "
                f"({time.perf_counter() - start:.1f} s)", flush=True)

    # posterior statistics of the test observations, streamed over samples
    y_test = (read_subdomain(args.data, "y_test", part) - mean) / std
    x_test = (read_subdomain(args.data, "x_test", part) - mean) / std
    zgen = torch.Generator().manual_seed(args.seed + 7 + comm.rank)  # independent noise per subdomain
    total = torch.zeros_like(y_test)
    total_sq = torch.zeros_like(y_test)
    with torch.no_grad():
        for _ in range(args.samples):
            z = torch.randn(y_test.shape, generator=zgen)
            x, _ = flow.inverse(z, y_test)
            total += x
            total_sq += x * x
    post_mean = total / args.samples
    post_std = (total_sq / args.samples - post_mean**2).clamp_min(0).sqrt()
    err = comm.allreduce_sum(torch.stack([((post_mean - x_test) ** 2).sum(), ((y_test - x_test) ** 2).sum()]))
    say(f"test: rmse of the posterior mean {float(err[0] / x_test.numel() / comm.size) ** 0.5:.4f}, "
        f"of the observation {float(err[1] / x_test.numel() / comm.size) ** 0.5:.4f} (normalised units)")

    n_test = y_test.shape[0] * part.batch_ranks
    attrs = {"grid": list(grid), "steps": args.steps, "samples": args.samples, "mean": mean, "std": std}
    for name, value in (("mean", post_mean * std + mean), ("std", post_std * std)):
        out = create_result_array(args.out, name, part, n_test, 1, attrs=attrs)
        write_subdomain(out, value, part)
    comm.barrier()
    say(f"wrote {args.out} (mean, std: {(n_test, 1) + tuple(space)}, chunks {part.local_shape(n_test, 1)})")
    comm.close()


if __name__ == "__main__":
    main()
