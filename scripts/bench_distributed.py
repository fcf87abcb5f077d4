"""Scaling benchmark of a domain-decomposed 3D flow: time per training step, halo time as a
fraction of the step, and peak memory per rank.

    # strong scaling: one 128^3 volume on 1 and 2 ranks
    mpiexec -n 1 python -m mpi4py scripts/bench_distributed.py --mode strong --size 128
    mpiexec -n 2 python -m mpi4py scripts/bench_distributed.py --mode strong --size 128
    # weak scaling: a 64^3 block per rank (the volume grows with the ranks)
    mpiexec -n 1 python -m mpi4py scripts/bench_distributed.py --mode weak --size 64
    mpiexec -n 2 python -m mpi4py scripts/bench_distributed.py --mode weak --size 64

Each rank runs one thread (OMP_NUM_THREADS=1 unless set). The network: a Haar squeeze, then
``--depth`` steps of (ActNorm, 1x1 convolution, affine coupling with a 3x3x3 conditioner),
trained on the NLL with the memory-free backward; the volume is split along the first axis.
Halo time is measured around the exchange (forward) and its adjoint (backward), waiting included.
Peak memory: VmHWM of each process (reset before the timed steps). Rank 0 prints one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import invnet  # noqa: E402
from invnet.distributed import Partition, decompose, default_comm, halo as halo_module  # noqa: E402
from invnet.layers import ActNorm, AffineCoupling, Conv1x1, HaarSqueeze  # noqa: E402

HALO_SECONDS = [0.0]


def _timed(fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            HALO_SECONDS[0] += time.perf_counter() - t0

    return wrapper


halo_module._exchange = _timed(halo_module._exchange)
halo_module._exchange_adjoint = _timed(halo_module._exchange_adjoint)


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return _status_mb("VmHWM:")


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("strong", "weak"), default="strong")
    ap.add_argument("--size", type=int, default=128, help="edge of the volume (strong) or of each rank's block (weak)")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--reference-kernels", action="store_true",
                    help="PyTorch's own convolution kernel choice (invnet.layers.kernels off), for comparison")
    args = ap.parse_args()
    kernel_choice = contextlib.ExitStack()
    if args.reference_kernels:
        from invnet.layers.kernels import reference_kernels

        kernel_choice.enter_context(reference_kernels())  # for the whole run (thread-local)

    comm = default_comm()
    ranks = comm.size
    s = args.size
    space = (s, s, s) if args.mode == "strong" else (s * ranks, s, s)
    net = [HaarSqueeze(ndim=3)]
    for k in range(args.depth):
        net += [ActNorm(8), Conv1x1(8), AffineCoupling(8, hidden=args.hidden, ndim=3, swap=bool(k % 2))]
    torch.manual_seed(0)
    flow = decompose(invnet.Chain(*net), Partition(space, (1, ranks, 1, 1), comm))
    gen = torch.Generator().manual_seed(1 + comm.rank)
    x = torch.randn((1, 1) + flow.partition.local_space_shape, generator=gen)
    opt = torch.optim.SGD(flow.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad()
        loss = -flow.log_prob(x).mean()
        loss.backward()
        flow.reduce_gradients()
        opt.step()

    step()  # warm-up (and ActNorm initialisation)
    reset_peak()
    baseline = _status_mb("VmRSS:")  # interpreter, torch, weights, input: before the timed steps
    comm.barrier()
    HALO_SECONDS[0] = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    comm.barrier()
    seconds = (time.perf_counter() - t0) / args.steps
    cpu_seconds = (time.process_time() - c0) / args.steps  # CPU time: steadier on a loaded machine
    halo = HALO_SECONDS[0] / args.steps
    per_rank = torch.zeros(5, ranks, dtype=torch.float64)
    per_rank[:, comm.rank] = torch.tensor(
        [seconds, halo, peak_rss_mb(), peak_rss_mb() - baseline, cpu_seconds], dtype=torch.float64)
    per_rank = comm.allreduce_sum(per_rank)
    if comm.rank == 0:
        print(json.dumps({
            "mode": args.mode, "ranks": ranks, "volume": list(space), "local": list(flow.partition.local_space_shape),
            "depth": args.depth, "hidden": args.hidden, "threads_per_rank": torch.get_num_threads(),
            "step_s": round(float(per_rank[0].max()), 3),
            "step_cpu_s_per_rank": [round(float(v), 3) for v in per_rank[4]],
            "kernels": "reference (PyTorch's choice)" if args.reference_kernels else "invnet rule",
            "halo_s": [round(float(v), 4) for v in per_rank[1]],
            # the exchange itself is best seen on the rank that waits least; the max includes waiting
            # for a slower neighbour (load imbalance)
            "halo_fraction_min": round(float((per_rank[1] / per_rank[0]).min()), 4),
            "halo_fraction_max": round(float((per_rank[1] / per_rank[0]).max()), 4),
            "peak_rss_mb_per_rank": [round(float(v), 1) for v in per_rank[2]],
            "step_peak_above_baseline_mb_per_rank": [round(float(v), 1) for v in per_rank[3]],
        }), flush=True)
    kernel_choice.close()
    comm.close()


if __name__ == "__main__":
    main()
