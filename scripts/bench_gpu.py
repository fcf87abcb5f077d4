"""GPU benchmark: the InvertibleNetworks.jl JOSS setup (Glow, 3 scales, hidden 256, batch 8,
256x256 RGB, K = 4 ... 64) for invnet (memory saving on and off) and normflows: peak allocated
GPU memory of one training step and its time.

Each (library, K) runs in a fresh process: one warm-up step, one step between
``torch.cuda.reset_peak_memory_stats`` and ``torch.cuda.max_memory_allocated`` (minus the memory
allocated before it: parameters, data and gradients of the warm-up), then ``--repeats`` timed
steps with ``torch.cuda.synchronize`` around each (median). Out-of-memory is recorded, not fatal.

    PYTHONPATH=$PWD python scripts/bench_gpu.py                   # JOSS setup, K = 4..64
    PYTHONPATH=$PWD python scripts/bench_gpu.py --sizes 256 512 1024   # plus an image-size sweep

Without a CUDA device it prints why and exits with status 2, measuring nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import bench_common as bc
import bench_memory
import torch

HERE = os.path.abspath(__file__)
NO_GPU_MESSAGE = (
    "bench_gpu.py: no CUDA device is available (torch.cuda.is_available() is False); nothing was "
    "measured. Run it on a machine with an NVIDIA GPU and a CUDA build of torch."
)


def worker(cfg: dict) -> dict:
    device = torch.device("cuda")
    out = dict(cfg)
    try:
        model, loss, step = bench_memory._make(cfg, cfg["library"], device)
        step()
        out["params"] = bc.parameter_count(model)
        out.update(bc.measure_step_memory(step, device))
        out.update(bc.median_time(step, cfg["repeats"], device))
    except torch.cuda.OutOfMemoryError as err:
        out["error"] = "out of memory: " + str(err).splitlines()[0][:160]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--libraries", nargs="+", default=["invnet", "invnet-plain", "normflows"],
                   choices=["invnet", "invnet-plain", "normflows", "freia", "memcnn-freia"])
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32, 48, 64])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--sizes", type=int, nargs="*", default=[], help="image sizes for a size sweep at K=--size-depth")
    p.add_argument("--size-depth", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default="docs/benchmarks/gpu.json")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if not torch.cuda.is_available():
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return 2
    libs = [lib for lib in args.libraries if lib.startswith("invnet") or bench_memory.peer_available(lib)]
    base = dict(channels=args.channels, levels=args.levels, hidden=args.hidden, batch=args.batch, ndim=2,
                repeats=args.repeats, device="cuda", measure="gpu", threads=1)
    configs = [dict(base, sweep="depth", depth=k, size=args.size) for k in args.depths]
    configs += [dict(base, sweep="size", depth=args.size_depth, size=s) for s in args.sizes]
    results = []
    for cfg in configs:
        for lib in libs:
            r = bc.run_fresh(HERE, dict(cfg, library=lib), 1, args.timeout, mmap_threshold=False)
            results.append(r)
            msg = r.get("error") or f"{r['peak_growth_mb'] / 1024:.2f} GB, {r['time_median_s']:.3f} s"
            print(f"[{cfg['sweep']}] K={cfg['depth']} {cfg['size']}^2 {lib}: {msg}", flush=True)
    record = {
        "benchmark": "gpu",
        "command": "python scripts/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: v for k, v in vars(args).items() if k != "worker"}, "versions": bc.versions(), "results": results,
    }
    bc.write_json_atomic(args.out, record)
    print("\n| sweep | K | size | " + " | ".join(f"{lib} GB / s" for lib in libs) + " |")
    print("|---|---|---|" + "---|" * len(libs))
    for cfg in configs:
        cells = []
        for lib in libs:
            rs = [r for r in results if r["library"] == lib and r["depth"] == cfg["depth"] and r["size"] == cfg["size"]
                  and r["sweep"] == cfg["sweep"]]
            if not rs or "error" in rs[0]:
                cells.append("OOM" if rs and "out of memory" in rs[0]["error"] else "failed")
            else:
                cells.append(f"{rs[0]['peak_growth_mb'] / 1024:.2f} / {statistics.median(rs[0]['times_s']):.3f}")
        print(f"| {cfg['sweep']} | {cfg['depth']} | {cfg['size']} | " + " | ".join(cells) + " |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
