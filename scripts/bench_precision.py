"""Training step time and peak memory in bfloat16 and float16 against float32, through the library
Trainer (``precision = ...``: autocast for the conditioners, float32 master weights and invertible
arithmetic, loss scaling for float16), as ratios from one run.

    python scripts/bench_precision.py --out docs/benchmarks/precision_cpu.json            # CPU
    python scripts/bench_precision.py --device cuda --out docs/benchmarks/precision_gpu.json

Model: a conditional Glow (``--levels`` scales, ``--depth`` steps each, ``--hidden`` channels) on a
batch of ``--batch`` x ``--channels`` x ``--size`` x ``--size`` with a condition on the same grid.
Time: median of ``--repeats`` training steps per precision, the precisions interleaved round-robin
in one process (load from other processes hits them alike). Memory, each precision in a fresh
process: the peak growth of one step (CPU: RSS high-water mark, ``MALLOC_MMAP_THRESHOLD_=65536``;
CUDA: allocated bytes) and the exact bytes of tensors alive at the step's peak
(:func:`invnet.core.memory_trace.trace_live_bytes`, independent of load). The load average
before and after is recorded: timings on a shared machine are not final.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from bench_common import (
    FixedPairs,
    interleaved_times,
    measure_step_memory,
    run_fresh,
    set_threads,
    write_json_atomic,
)

PRECISIONS = ("float32", "bfloat16", "float16")


def trainer(cfg: dict, precision: str, out_dir: str):
    from invnet.networks import ConditionalGlow
    from invnet.training import Trainer

    torch.manual_seed(0)
    net = ConditionalGlow(cfg["channels"], cfg["channels"], hidden=cfg["hidden"], levels=cfg["levels"],
                          depth=cfg["depth"], ndim=2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    pairs = FixedPairs((cfg["batch"], cfg["channels"], cfg["size"], cfg["size"]), 0.3, seed=0)
    t = Trainer(net, opt, pairs, out_dir, steps=1, device=cfg["device"], precision=precision, progress=False)
    t.fit()  # warm-up: ActNorm initialisation, kernel choices, allocator
    return t


def worker(cfg: dict) -> dict:
    """One precision in this process: the memory of one step."""
    from invnet.core.memory_trace import trace_live_bytes

    set_threads(cfg["threads"])
    with tempfile.TemporaryDirectory() as out:
        t = trainer(cfg, cfg["precision"], out)
        memory = measure_step_memory(t._train_step, t.device)
        live = trace_live_bytes(t._train_step) if t.device.type == "cpu" else None
        loss = t.last_train_loss
    return {**cfg, **memory, "live_peak_mb": None if live is None else live.peak_bytes / 2**20,
            "finite_loss": loss is not None and loss == loss and abs(loss) != float("inf")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    cfg = {k: getattr(args, k) for k in ("batch", "channels", "size", "hidden", "levels", "depth", "threads", "device")}
    load_before = os.getloadavg()
    memory = {p: run_fresh(os.path.abspath(__file__), dict(cfg, precision=p), args.threads, timeout=1800)
              for p in args.precisions}
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        trainers = {p: trainer(cfg, p, os.path.join(out, p)) for p in args.precisions}
        times = interleaved_times({p: t._train_step for p, t in trainers.items()}, args.repeats,
                                  next(iter(trainers.values())).device)
    load_after = os.getloadavg()
    base_t = times["float32"]["time_median_s"] if "float32" in times else None
    base_m = memory.get("float32", {})
    summary = []
    for p in args.precisions:
        m = memory[p]
        row = {"precision": p, "step_s": round(times[p]["time_median_s"], 4),
               "peak_growth_mb": m.get("peak_growth_mb"), "live_peak_mb": m.get("live_peak_mb"),
               "finite_loss": m.get("finite_loss"), "error": m.get("error")}
        if base_t:
            row["time_ratio_to_float32"] = round(times[p]["time_median_s"] / base_t, 3)
        for key in ("peak_growth_mb", "live_peak_mb"):
            if base_m.get(key) and m.get(key) is not None:
                row[f"{key.replace('_mb', '')}_ratio_to_float32"] = round(m[key] / base_m[key], 3)
        summary.append(row)
    record = {"config": cfg, "load_average_before": load_before, "load_average_after": load_after,
              "summary": summary, "times": times, "memory": memory}
    for row in summary:
        print(json.dumps(row))
    if args.out:
        write_json_atomic(args.out, record)


if __name__ == "__main__":
    main()
