"""Engine benchmark (issue 2): memory and time of one training step of a flat stack of Glow
steps (ActNorm, Conv1x1, AffineCoupling) against depth, invnet's memory saving on vs off.

Each (depth, mode) runs in a fresh process (see scripts/bench_common.py for how memory is
measured); configurations are interleaved over ``--rounds`` so that load from other processes
hits both modes alike, and the time ratio is taken per depth from medians of the same run.

    PYTHONPATH=$PWD python scripts/bench_engine.py                       # defaults below
    PYTHONPATH=$PWD python scripts/bench_engine.py --batch 2 --channels 4 --size 8 \\
        --hidden 8 --depths 2 4 --repeats 2 --rounds 1 --out /tmp/engine.json      # seconds

Targets: the memory-saving step takes <= 1.35x the plain-autograd step; its memory is flat in
depth (autograd-saved bytes and peak RSS growth).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import bench_common as bc
import torch

HERE = os.path.abspath(__file__)


def build_stack(channels: int, hidden: int, depth: int, conv: str, ndim: int = 2):
    import invnet
    from invnet.layers import ActNorm, AffineCoupling, Conv1x1

    blocks = []
    for k in range(depth):
        blocks += [
            ActNorm(channels, ndim=ndim),
            Conv1x1(channels, parametrization=conv, ndim=ndim),
            AffineCoupling(channels, hidden=hidden, ndim=ndim, swap=bool(k % 2)),
        ]
    return invnet.Chain(*blocks)


def _setup(cfg: dict):
    from invnet.core.checks import randomize_parameters_

    torch.manual_seed(0)
    flow = build_stack(cfg["channels"], cfg["hidden"], cfg["depth"], cfg["conv"])
    x = torch.randn(cfg["batch"], cfg["channels"], cfg["size"], cfg["size"])
    with torch.no_grad():
        flow(x)  # ActNorm's data-dependent initialisation
    randomize_parameters_(flow, scale=0.02)  # non-trivial couplings (zero-initialised last layers)
    return flow, x


def _loss_and_step(flow, x, saving: bool):
    import invnet

    def loss():
        with invnet.memory_saving(saving):
            z, logdet = flow(x)
            return (0.5 * z.pow(2).flatten(1).sum(1) - logdet).mean()

    def step():
        flow.zero_grad(set_to_none=True)
        loss().backward()

    return loss, step


def worker(cfg: dict) -> dict:
    """Memory: one mode per fresh process. Time: both modes in one process, steps alternating
    (saving, plain, saving, ...), so that load from other processes hits both alike."""
    from invnet.core.checks import saved_bytes

    bc.set_threads(cfg["threads"])
    cpu = torch.device("cpu")
    out = dict(cfg)
    if cfg["measure"] == "memory":
        flow, x = _setup(cfg)
        loss, step = _loss_and_step(flow, x, cfg["mode"] == "saving")
        step()  # warm-up: thread pools, allocator
        out["saved_mb"] = saved_bytes(loss) / bc.MB
        out.update(bc.measure_step_memory(step, cpu))
    else:
        # one network, two step functions: the same weights in both modes
        flow, x = _setup(cfg)
        steps = {mode: _loss_and_step(flow, x, mode == "saving")[1] for mode in ("saving", "plain")}
        for s in steps.values():
            s()  # warm-up
        times = bc.interleaved_times(steps, cfg["repeats"], cpu)
        for mode, t in times.items():
            out[f"{mode}_time_median_s"] = t["time_median_s"]
            out[f"{mode}_times_s"] = t["times_s"]
    out["params"] = bc.parameter_count(flow)
    out["param_mb"] = out["params"] * 4 / bc.MB
    return out


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for depth in sorted({r["depth"] for r in results}):
        row = {"depth": depth}
        for mode in ("saving", "plain"):
            rs = [r for r in results if r["depth"] == depth and r.get("mode") in (mode, "both") and "error" not in r]
            if not rs:
                continue
            times = [r[f"{mode}_time_median_s"] for r in results
                     if r["depth"] == depth and r["measure"] == "time" and "error" not in r]
            mems = [r for r in rs if r["measure"] == "memory"]
            if times:
                row[f"{mode}_time_s"] = statistics.median(times)
            if mems:
                row[f"{mode}_rss_mb"] = statistics.median(r["peak_growth_mb"] for r in mems)
                row[f"{mode}_saved_mb"] = mems[0]["saved_mb"]
            row["param_mb"] = rs[0]["param_mb"]
        if "saving_time_s" in row and "plain_time_s" in row:
            row["time_ratio"] = row["saving_time_s"] / row["plain_time_s"]
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| K | saved MB (saving) | saved MB (plain) | RSS growth MB (saving) | RSS growth MB (plain) | "
          "step s (saving) | step s (plain) | time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['depth']} | {r.get('saving_saved_mb', float('nan')):.2f} | "
            f"{r.get('plain_saved_mb', float('nan')):.1f} | "
            f"{r.get('saving_rss_mb', float('nan')):.1f} | {r.get('plain_rss_mb', float('nan')):.1f} | "
            f"{r.get('saving_time_s', float('nan')):.3f} | {r.get('plain_time_s', float('nan')):.3f} | "
            f"{r.get('time_ratio', float('nan')):.2f} |"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--channels", type=int, default=12)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--conv", choices=["householder", "lu"], default="householder")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per process (median)")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per configuration, interleaved")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default="docs/benchmarks/engine_cpu.json")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    for name in ("batch", "channels", "size", "hidden", "repeats", "rounds", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.channels < 2 or any(d < 1 for d in args.depths):
        raise ValueError("--channels must be >= 2 and every depth >= 1")
    base = {k: getattr(args, k) for k in ("batch", "channels", "size", "hidden", "conv", "repeats", "threads")}
    results = []
    for rnd in range(args.rounds):
        for depth in args.depths:
            for measure, mode in (("memory", "saving"), ("memory", "plain"), ("time", "both")):
                cfg = dict(base, depth=depth, mode=mode, round=rnd, measure=measure)
                r = bc.run_fresh(HERE, cfg, args.threads, args.timeout, mmap_threshold=measure == "memory")
                results.append(r)
                if "error" in r:
                    msg = r["error"]
                elif measure == "memory":
                    msg = f"{r['peak_growth_mb']:.1f} MB RSS growth, {r['saved_mb']:.2f} MB saved"
                else:
                    msg = f"saving {r['saving_time_median_s']:.3f} s, plain {r['plain_time_median_s']:.3f} s"
                print(f"round {rnd} K={depth} {measure} ({mode}): {msg}", flush=True)
    rows = summarize(results)
    record = {
        "benchmark": "engine",
        "command": "python scripts/bench_engine.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": base, "versions": bc.versions(), "results": results, "summary": rows,
    }
    bc.write_json_atomic(args.out, record)
    print_table(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
