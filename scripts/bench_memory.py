"""invnet against its peers: memory and time of one training step of a matched multiscale Glow
(issue 8), on the CPU.

Libraries (see scripts/bench_models.py for the matched networks): ``invnet`` (memory saving on),
``invnet-plain`` (the same blocks, plain autograd), ``normflows``, ``freia``, and
``memcnn-freia`` (each FrEIA Glow step in MemCNN's memory-saving wrapper). Peers that are not
installed are skipped (``pip install -e .[bench]``; memcnn needs ``--no-deps``, see
scripts/install_bench_peers.sh).

Sweeps, each configuration in a fresh process (memory) and, per configuration, one process that
times all libraries round-robin (ratios from the same run):

* ``depth``: K in ``--depths`` at ``--batch`` x ``--channels`` x ``--size``^2, hidden
  ``--hidden``, ``--levels`` scales: memory (peak RSS growth, autograd-saved bytes), step time.
* ``size``: image sizes ``--sizes`` at K=``--size-depth``, batch ``--size-batch``: memory.
* ``3d``: volumes ``--volumes`` (invnet only; the peers have no 3D Glow): memory.
* ``largest3d``: the largest cubic volume a conditional Glow trains on with one sample within
  ``--budget-gb`` of peak RSS growth, memory saving on vs off.
* ``budget``: the trade-off of ``invnet.memory_budget`` at K=``--budget-depth``: invnet with an
  unlimited budget, a quarter of the plain step's autograd-saved bytes, and 0 (memory-free),
  against every library (memory per configuration in a fresh process; one round-robin timing
  process), and a plot of step time against peak memory (``--plots``).
* ``accumulate``: gradient accumulation (``.grad`` kept, ``zero_grad(set_to_none=False)``):
  memory of a step at K in ``--accumulate-depths``, every library, beside the default step of the
  depth sweep.

    PYTHONPATH=$PWD python scripts/bench_memory.py                      # full run (~25 min)
    PYTHONPATH=$PWD python scripts/bench_memory.py --tiny --out /tmp/b.json   # seconds
    PYTHONPATH=$PWD python scripts/bench_memory.py --sweeps budget accumulate --plots docs/figures \
        --out docs/benchmarks/memory_budget_cpu.json                   # the budget trade-off

Writes a JSON record (``--out``) and prints Markdown tables; ``--plots DIR`` draws PNGs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from typing import Any, Optional

import bench_common as bc
import bench_models as bm
import torch

HERE = os.path.abspath(__file__)


def peer_available(library: str) -> bool:
    mods = {"normflows": ["normflows"], "freia": ["FrEIA"], "memcnn-freia": ["FrEIA", "memcnn"]}
    for mod in mods.get(library, []):
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            return False
    return True


# ----------------------------------------------------------------------------------------------
# worker side
def _library_and_budget(label: str, cfg: dict) -> tuple[str, Any]:
    """``"invnet@quarter"`` -> ``("invnet", bytes)``: a library label with an optional memory
    budget (``cfg["budgets"]`` maps the names to bytes)."""
    library, _, name = label.partition("@")
    return library, (cfg.get("budgets", {}).get(name, name) if name else None)


def _make(cfg: dict, label: str, device: torch.device):
    import invnet

    library, budget = _library_and_budget(label, cfg)
    torch.manual_seed(0)
    model = bm.build(
        library, cfg["channels"], cfg["levels"], cfg["depth"], cfg["hidden"], cfg["size"], cfg["ndim"],
        cfg.get("cond_channels", 0),
    ).to(device)
    space = (cfg["size"],) * cfg["ndim"]
    x = torch.randn((cfg["batch"], cfg["channels"]) + space, device=device)
    c = None
    if cfg.get("cond_channels", 0):
        c = torch.randn((cfg["batch"], cfg["cond_channels"]) + space, device=device)

    def loss():
        with invnet.memory_budget(budget):
            return model.nll(x, c)

    def step():
        # accumulation: .grad kept (zeroed in place), as between micro-batches
        model.zero_grad(set_to_none=not cfg.get("accumulate", False))
        with invnet.memory_budget(budget):
            loss().backward()

    return model, loss, step


def worker(cfg: dict) -> dict:
    from invnet.core.checks import saved_bytes

    bc.set_threads(cfg["threads"])
    if cfg.get("address_limit_gb"):  # guard a shared machine against a runaway configuration
        limit = int(cfg["address_limit_gb"] * 1024**3)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    device = torch.device(cfg.get("device", "cpu"))
    out: dict[str, Any] = dict(cfg)
    try:
        if cfg["measure"] == "memory":
            model, loss, step = _make(cfg, cfg["library"], device)
            step()  # warm-up: ActNorm initialisation, thread pools, allocator, a budget's measuring step
            out["saved_mb"] = saved_bytes(loss) / bc.MB
            out.update(bc.measure_step_memory(step, device))
            out["params"] = bc.parameter_count(model)
        else:
            steps = {}
            for lib in cfg["libraries"]:
                model, _, step = _make(cfg, lib, device)
                step()  # warm-up
                steps[lib] = step
                out[f"{lib}_params"] = bc.parameter_count(model)
            for lib, t in bc.interleaved_times(steps, cfg["repeats"], device).items():
                out[f"{lib}_time_median_s"] = t["time_median_s"]
                out[f"{lib}_times_s"] = t["times_s"]
    except (MemoryError, RuntimeError) as err:  # out of memory under the guard, CUDA OOM
        out["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return out


# ----------------------------------------------------------------------------------------------
# driver side
def _run(cfg: dict, args, log: list[dict]) -> dict:
    mem = cfg["measure"] == "memory"
    r = bc.run_fresh(HERE, dict(cfg, threads=args.threads), args.threads, args.timeout, mmap_threshold=mem)
    log.append(r)
    label = f"[{cfg['sweep']}] K={cfg['depth']} size={cfg['size']}^{cfg['ndim']} batch={cfg['batch']}"
    if "error" in r:
        print(f"{label} {cfg.get('library', 'time')}: ERROR {r['error']}", flush=True)
    elif mem:
        print(f"{label} {cfg['library']}: {r['peak_growth_mb']:.1f} MB RSS growth, {r['saved_mb']:.1f} MB saved",
              flush=True)
    else:
        times = ", ".join(f"{lib} {r[f'{lib}_time_median_s']:.3f} s" for lib in cfg["libraries"])
        print(f"{label} time: {times}", flush=True)
    return r


def sweep_depth(args, libs: list[str], log: list[dict]) -> None:
    base = dict(sweep="depth", channels=args.channels, levels=args.levels, hidden=args.hidden, size=args.size,
                batch=args.batch, ndim=2)
    for depth in args.depths:
        if args.measure in ("both", "memory"):
            for lib in libs:
                _run(dict(base, depth=depth, library=lib, measure="memory"), args, log)
        if args.measure in ("both", "time") and (args.time_depths is None or depth in args.time_depths):
            _run(dict(base, depth=depth, libraries=libs, measure="time", repeats=args.repeats), args, log)


def sweep_size(args, libs: list[str], log: list[dict]) -> None:
    base = dict(sweep="size", channels=args.channels, levels=args.levels, hidden=args.hidden, depth=args.size_depth,
                batch=args.size_batch, ndim=2)
    for size in args.sizes:
        for lib in libs:
            _run(dict(base, size=size, library=lib, measure="memory"), args, log)


def sweep_3d(args, libs: list[str], log: list[dict]) -> None:
    base = dict(sweep="3d", channels=1, levels=args.levels, hidden=args.hidden, depth=args.volume_depth,
                batch=args.volume_batch, ndim=3)
    for size in args.volumes:
        for lib in [lib for lib in libs if lib.startswith("invnet")]:
            _run(dict(base, size=size, library=lib, measure="memory"), args, log)


def largest_3d(args, log: list[dict]) -> dict:
    """Grow a cubic volume (one sample, conditional Glow) until the step's peak RSS growth would
    exceed the budget; sizes whose linear-in-voxels prediction exceeds the budget are not run."""
    budget_mb = args.budget_gb * 1024
    base = dict(sweep="largest3d", channels=1, cond_channels=1, levels=args.levels, hidden=args.hidden,
                depth=args.volume_depth, batch=1, ndim=3, address_limit_gb=args.budget_gb + 6)
    found: dict[str, Any] = {}
    for lib in ("invnet", "invnet-plain"):
        best, per_voxel = None, None
        for size in args.largest_sizes:
            if per_voxel is not None and per_voxel * size**3 > budget_mb:
                found[f"{lib}_next_predicted_mb"] = per_voxel * size**3
                found[f"{lib}_next_size"] = size
                break
            r = _run(dict(base, size=size, library=lib, measure="memory"), args, log)
            if "error" in r or r["peak_growth_mb"] > budget_mb:
                break
            best = (size, r["peak_growth_mb"])
            per_voxel = max(r["peak_growth_mb"], 1.0) / size**3
        found[lib] = {"size": best[0], "peak_growth_mb": best[1]} if best else None
    found["budget_gb"] = args.budget_gb
    return found


def sweep_budget(args, libs: list[str], log: list[dict]) -> None:
    """invnet under memory budgets (unlimited, a quarter of the plain step's saved bytes, 0)
    against every library at one depth: memory in fresh processes, time round-robin."""
    base = dict(sweep="budget", channels=args.channels, levels=args.levels, hidden=args.hidden, size=args.size,
                batch=args.batch, ndim=2, depth=args.budget_depth)
    plain = _run(dict(base, library="invnet-plain", measure="memory"), args, log)
    if "error" in plain:
        return
    budgets = {"unlimited": "unlimited", "quarter": int(plain["saved_mb"] * bc.MB / 4), "0": 0}
    labels = [f"invnet@{name}" for name in budgets]
    others = [lib for lib in libs if lib not in ("invnet", "invnet-plain")]
    for label in labels + others:
        _run(dict(base, library=label, budgets=budgets, measure="memory"), args, log)
    _run(dict(base, libraries=labels + ["invnet-plain"] + others, budgets=budgets, measure="time",
              repeats=args.repeats), args, log)


def sweep_accumulate(args, libs: list[str], log: list[dict]) -> None:
    """Memory of a step that accumulates into existing ``.grad`` buffers, every library."""
    base = dict(sweep="accumulate", channels=args.channels, levels=args.levels, hidden=args.hidden, size=args.size,
                batch=args.batch, ndim=2, accumulate=True)
    for depth in args.accumulate_depths:
        for lib in libs:
            _run(dict(base, depth=depth, library=lib, measure="memory"), args, log)


def _median(rs: list[dict], key: str) -> Optional[float]:
    vals = [r[key] for r in rs if key in r]
    return statistics.median(vals) if vals else None


def _per_round_ratio(timed: list[dict], label: str, ref: str) -> Optional[float]:
    """Median over the round-robin rounds of ``label``'s step time / ``ref``'s in the same round."""
    ratios = [a / b for r in timed if f"{label}_times_s" in r and f"{ref}_times_s" in r
              for a, b in zip(r[f"{label}_times_s"], r[f"{ref}_times_s"])]
    return statistics.median(ratios) if ratios else None


def summarize(log: list[dict], libs: list[str]) -> dict:
    ok = [r for r in log if "error" not in r]
    mem = [r for r in ok if r["measure"] == "memory"]
    depth_rows = []
    for depth in sorted({r["depth"] for r in ok if r["sweep"] == "depth"}):
        row: dict[str, Any] = {"depth": depth}
        for lib in libs:
            rs = [r for r in mem if r["sweep"] == "depth" and r["depth"] == depth and r["library"] == lib]
            if rs:
                row[f"{lib}_rss_mb"] = _median(rs, "peak_growth_mb")
                row[f"{lib}_saved_mb"] = _median(rs, "saved_mb")
                row[f"{lib}_params"] = rs[0]["params"]
            ts = [r for r in ok if r["sweep"] == "depth" and r["depth"] == depth and r["measure"] == "time"]
            t = _median(ts, f"{lib}_time_median_s")
            if t is not None:
                row[f"{lib}_time_s"] = t
        depth_rows.append(row)
    size_rows = []
    for sweep in ("size", "3d"):
        for size in sorted({r["size"] for r in mem if r["sweep"] == sweep}):
            row = {"sweep": sweep, "size": size}
            for lib in libs:
                rs = [r for r in mem if r["sweep"] == sweep and r["size"] == size and r["library"] == lib]
                if rs:
                    row[f"{lib}_rss_mb"] = _median(rs, "peak_growth_mb")
                    row[f"{lib}_saved_mb"] = _median(rs, "saved_mb")
            for r in log:
                if r.get("sweep") == sweep and r.get("size") == size and "error" in r:
                    row[f"{r['library']}_error"] = r["error"]
            size_rows.append(row)
    budget_rows = []
    labels = list(dict.fromkeys(r["library"] for r in mem if r["sweep"] == "budget"))
    timed = [r for r in ok if r["sweep"] == "budget" and r["measure"] == "time"]
    for label in labels:
        rs = [r for r in mem if r["sweep"] == "budget" and r["library"] == label]
        row = {"library": label, "depth": rs[0]["depth"], "rss_mb": _median(rs, "peak_growth_mb"),
               "saved_mb": _median(rs, "saved_mb"), "time_s": _median(timed, f"{label}_time_median_s"),
               "budget_bytes": _library_and_budget(label, rs[0])[1]}
        for ref in ("invnet-plain", "normflows"):  # round by round: a slow drift of the machine cancels
            row[f"per_round_vs_{ref}"] = _per_round_ratio(timed, label, ref)
        budget_rows.append(row)
    accumulate_rows = []
    for depth in sorted({r["depth"] for r in mem if r["sweep"] == "accumulate"}):
        row = {"depth": depth}
        for lib in libs:
            rs = [r for r in mem if r["sweep"] == "accumulate" and r["depth"] == depth and r["library"] == lib]
            if rs:
                row[f"{lib}_rss_mb"] = _median(rs, "peak_growth_mb")
        accumulate_rows.append(row)
    return {"depth": depth_rows, "size": size_rows, "budget": budget_rows, "accumulate": accumulate_rows}


def targets(summary: dict) -> dict:
    """The issue's targets, evaluated on the depth sweep (None where a figure is missing)."""
    rows = {r["depth"]: r for r in summary["depth"]}
    out: dict[str, Any] = {}

    def get(depth, key):
        return rows.get(depth, {}).get(key)

    k_lo, k_hi = (min(rows), max(rows)) if rows else (None, None)
    if k_lo is not None and get(k_lo, "invnet_rss_mb") and get(k_hi, "invnet_rss_mb") is not None:
        out["invnet_rss_ratio_kmax_over_kmin"] = get(k_hi, "invnet_rss_mb") / get(k_lo, "invnet_rss_mb")
        out["invnet_rss_ratio_depths"] = [k_lo, k_hi]
    if get(32, "invnet_rss_mb") is not None and get(32, "normflows_rss_mb"):
        out["invnet_over_normflows_rss_k32"] = get(32, "invnet_rss_mb") / get(32, "normflows_rss_mb")
    below = [get(k, "invnet_rss_mb") < get(k, "memcnn-freia_rss_mb") for k in rows
             if get(k, "invnet_rss_mb") is not None and get(k, "memcnn-freia_rss_mb") is not None]
    if below:
        out["invnet_below_memcnn_at_every_k"] = all(below)
    ratios = {k: get(k, "invnet_time_s") / get(k, "invnet-plain_time_s") for k in rows
              if get(k, "invnet_time_s") and get(k, "invnet-plain_time_s")}
    if ratios:
        out["invnet_time_over_plain"] = ratios
    vs_memcnn = {k: get(k, "invnet_time_s") / get(k, "memcnn-freia_time_s") for k in rows
                 if get(k, "invnet_time_s") and get(k, "memcnn-freia_time_s")}
    if vs_memcnn:
        out["invnet_time_over_memcnn"] = vs_memcnn
    return out


def print_tables(summary: dict, libs: list[str]) -> None:
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    if summary["depth"]:
        _print_depth_tables(summary, libs, f)
    _print_budget_tables(summary, libs, f)
    _print_size_tables(summary, libs, f)


def _print_depth_tables(summary: dict, libs: list[str], f) -> None:
    print("\nStep memory (peak RSS growth, MB) and autograd-saved MB, by depth K")
    print("| K | " + " | ".join(f"{lib} RSS / saved" for lib in libs) + " |")
    print("|---|" + "---|" * len(libs))
    for r in summary["depth"]:
        cells = [f"{f(r.get(f'{lib}_rss_mb'))} / {f(r.get(f'{lib}_saved_mb'))}" for lib in libs]
        print(f"| {r['depth']} | " + " | ".join(cells) + " |")
    print("\nStep time (median, s) by depth K")
    print("| K | " + " | ".join(libs) + " |")
    print("|---|" + "---|" * len(libs))
    for r in summary["depth"]:
        if any(r.get(f"{lib}_time_s") is not None for lib in libs):
            print(f"| {r['depth']} | " + " | ".join(f(r.get(f"{lib}_time_s"), "{:.3f}") for lib in libs) + " |")


def _print_budget_tables(summary: dict, libs: list[str], f) -> None:
    if summary.get("budget"):
        plain = next((r for r in summary["budget"] if r["library"] == "invnet-plain"), {})
        print(f"\nMemory budget trade-off at K={summary['budget'][0]['depth']} (time relative to invnet-plain)")
        print("| library | budget (bytes) | peak RSS growth (MB) | saved (MB) | step time (s) | time / plain | "
              "per round: / plain | per round: / normflows |")
        print("|---|---|---|---|---|---|---|---|")
        for r in summary["budget"]:
            ratio = r["time_s"] / plain["time_s"] if r.get("time_s") and plain.get("time_s") else None
            print(f"| {r['library']} | {r['budget_bytes'] if r['budget_bytes'] is not None else '-'} | "
                  f"{f(r['rss_mb'])} | {f(r['saved_mb'])} | {f(r['time_s'], '{:.3f}')} | {f(ratio, '{:.2f}')} | "
                  f"{f(r.get('per_round_vs_invnet-plain'), '{:.3f}')} | "
                  f"{f(r.get('per_round_vs_normflows'), '{:.3f}')} |")
    if summary.get("accumulate"):
        default = {r["depth"]: r for r in summary["depth"]}
        print("\nGradient accumulation (.grad kept): peak RSS growth (MB), default step in brackets")
        print("| K | " + " | ".join(libs) + " |")
        print("|---|" + "---|" * len(libs))
        for r in summary["accumulate"]:
            cells = [f"{f(r.get(f'{lib}_rss_mb'))} ({f(default.get(r['depth'], {}).get(f'{lib}_rss_mb'))})"
                     for lib in libs]
            print(f"| {r['depth']} | " + " | ".join(cells) + " |")


def _print_size_tables(summary: dict, libs: list[str], f) -> None:
    for sweep, title in (("size", "image size (2D)"), ("3d", "volume size (3D, peers: no 3D Glow)")):
        rows = [r for r in summary["size"] if r["sweep"] == sweep]
        if not rows:
            continue
        print(f"\nStep memory (peak RSS growth, MB) by {title}")
        print("| size | " + " | ".join(libs) + " |")
        print("|---|" + "---|" * len(libs))
        for r in rows:
            cells = []
            for lib in libs:
                if sweep == "3d" and lib in bm.PEERS_2D_ONLY:
                    cells.append("no 3D")
                elif f"{lib}_error" in r:
                    cells.append("failed")
                else:
                    cells.append(f(r.get(f"{lib}_rss_mb")))
            print(f"| {r['size']} | " + " | ".join(cells) + " |")


def plot(summary: dict, libs: list[str], folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    paths = []
    rows = summary["depth"]
    if rows:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for lib in libs:
            ks = [r["depth"] for r in rows if r.get(f"{lib}_rss_mb") is not None]
            axes[0].plot(ks, [r[f"{lib}_rss_mb"] for r in rows if r.get(f"{lib}_rss_mb") is not None], "o-", label=lib)
            timed = [r for r in rows if r.get(f"{lib}_time_s") is not None]
            axes[1].plot([r["depth"] for r in timed], [r[f"{lib}_time_s"] for r in timed], "o-", label=lib)
        for ax, lab in zip(axes, ("peak RSS growth of one step (MB)", "step time, median (s)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("steps per scale K")
            ax.set_ylabel(lab)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend()
        fig.suptitle("Glow training step on the CPU: memory and time against depth")
        fig.tight_layout()
        path = os.path.join(folder, "bench_depth.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    rows = [r for r in summary.get("budget", []) if r.get("time_s") is not None and r.get("rss_mb") is not None]
    if rows:
        paths.append(_plot_tradeoff(rows, folder, plt))
    rows = [r for r in summary["size"] if r["sweep"] in ("size", "3d")]
    if rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for sweep, marker in (("size", "o-"), ("3d", "s--")):
            for lib in libs:
                pts = [(r["size"] ** (2 if sweep == "size" else 3), r[f"{lib}_rss_mb"])
                       for r in rows if r["sweep"] == sweep and r.get(f"{lib}_rss_mb") is not None]
                if pts:
                    ax.plot(*zip(*pts), marker, label=f"{lib} ({'2D' if sweep == 'size' else '3D'})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pixels / voxels per sample")
        ax.set_ylabel("peak RSS growth of one step (MB)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(folder, "bench_size.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _plot_tradeoff(rows: list[dict], folder: str, plt) -> str:
    """Step time against peak memory: invnet's budgets as one curve, every other library a point."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    curve = [r for r in rows if r["library"].startswith("invnet@")]
    if curve:
        ax.plot([r["rss_mb"] for r in curve], [r["time_s"] for r in curve], "o-", color="C0",
                label="invnet, memory_budget")
        for r in curve:
            ax.annotate(r["library"].split("@")[1], (r["rss_mb"], r["time_s"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)
    for i, r in enumerate(r for r in rows if not r["library"].startswith("invnet@")):
        ax.plot([r["rss_mb"]], [r["time_s"]], "s", color=f"C{i + 1}", label=r["library"])
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # labels at the decades only: no overlaps
    ax.set_xlabel("peak RSS growth of one step (MB)")
    ax.set_ylabel("step time, median (s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Glow training step, K={rows[0]['depth']}: time against memory")
    fig.tight_layout()
    path = os.path.join(folder, "bench_budget_tradeoff.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_and_report(args, record: dict, libs: list[str], budget_note: str) -> int:
    """Write the JSON record atomically, print the tables and targets, draw the plots."""
    bc.write_json_atomic(args.out, record)
    print_tables(record["summary"], libs)
    if record["largest_3d"]:
        print(f"\nLargest cubic volume (conditional Glow, one sample){budget_note}: {record['largest_3d']}")
    print("\nTargets:", json.dumps(record["targets"], indent=1))
    if args.plots:
        for path in plot(record["summary"], libs, args.plots):
            print(f"plot: {path}")
    print(f"wrote {args.out}")
    return 0


def merge(args) -> int:
    """Summarise the results of several records together (one JSON, tables, plots)."""
    records = []
    for path in args.merge:
        with open(path) as fh:
            records.append(json.load(fh))
    libs = []
    for rec in records:
        libs += [lib for lib in rec["libraries"] if lib not in libs]
    log = [r for rec in records for r in rec["results"]]
    largest = next((rec["largest_3d"] for rec in records if rec.get("largest_3d")), None)
    summary = summarize(log, libs)
    record = {
        "benchmark": "memory", "device": "cpu", "merged_from": [
            {"path": path, "command": rec["command"]} for path, rec in zip(args.merge, records)
        ],
        "libraries": libs, "versions": records[0]["versions"], "results": log, "summary": summary,
        "targets": targets(summary), "largest_3d": largest,
    }
    return _write_and_report(args, record, libs, "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--libraries", nargs="+", default=list(bm.LIBRARIES), choices=bm.LIBRARIES + bm.EXTRA_LIBRARIES)
    p.add_argument("--sweeps", nargs="+", default=["depth", "size", "3d", "largest3d"],
                   choices=["depth", "size", "3d", "largest3d", "budget", "accumulate"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per library (median)")
    p.add_argument("--measure", choices=["both", "memory", "time"], default="both",
                   help="depth sweep: measure memory, time or both (default)")
    p.add_argument("--time-depths", type=int, nargs="*", default=None, help="depths to time (default: all)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--size-depth", type=int, default=8)
    p.add_argument("--size-batch", type=int, default=4)
    p.add_argument("--volumes", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--volume-depth", type=int, default=4)
    p.add_argument("--volume-batch", type=int, default=2)
    p.add_argument("--largest-sizes", type=int, nargs="+", default=[32, 64, 96, 128, 160, 192, 224, 256])
    p.add_argument("--budget-gb", type=float, default=4.0)
    p.add_argument("--budget-depth", type=int, default=16, help="K of the memory-budget sweep")
    p.add_argument("--accumulate-depths", type=int, nargs="+", default=[4, 32],
                   help="K of the gradient-accumulation sweep")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--tiny", action="store_true", help="a seconds-long run of every sweep (smoke test)")
    p.add_argument("--out", default="docs/benchmarks/memory_cpu.json")
    p.add_argument("--plots", default=None, help="folder for PNG plots (none by default)")
    p.add_argument("--merge", nargs="+", default=None,
                   help="JSON records of earlier runs (e.g. sweeps run in parallel): summarise them together, "
                        "measure nothing")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.tiny:
        args.batch, args.size, args.hidden, args.levels, args.depths, args.repeats = 2, 8, 4, 2, [1, 2], 1
        args.sizes, args.size_depth, args.size_batch = [8], 1, 1
        args.volumes, args.volume_depth, args.volume_batch = [4], 1, 1
        args.largest_sizes, args.budget_gb = [4, 8], 0.5
        args.budget_depth = 2
        if args.accumulate_depths == p.get_default("accumulate_depths"):  # unless given
            args.accumulate_depths = [1, 2]
    for name in ("batch", "channels", "size", "hidden", "levels", "repeats", "threads", "size_depth", "size_batch",
                 "volume_depth", "volume_batch", "budget_depth"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    div = 2**args.levels
    for name in ("size", "sizes", "volumes", "largest_sizes"):
        vals = getattr(args, name)
        for v in vals if isinstance(vals, list) else [vals]:
            if v % div:
                raise ValueError(f"--{name.replace('_', '-')} values must be divisible by 2^levels = {div}, got {v}")
    if args.merge:
        return merge(args)
    libs = [lib for lib in args.libraries if lib.startswith("invnet") or peer_available(lib)]
    skipped = sorted(set(args.libraries) - set(libs))
    if skipped:
        print(f"not installed, skipped: {', '.join(skipped)} (see scripts/install_bench_peers.sh)", flush=True)
    log: list[dict] = []
    largest = None
    if "depth" in args.sweeps:
        sweep_depth(args, libs, log)
    if "size" in args.sweeps:
        sweep_size(args, libs, log)
    if "3d" in args.sweeps:
        sweep_3d(args, libs, log)
    if "largest3d" in args.sweeps:
        largest = largest_3d(args, log)
    if "budget" in args.sweeps:
        sweep_budget(args, libs, log)
    if "accumulate" in args.sweeps:
        sweep_accumulate(args, libs, log)
    summary = summarize(log, libs)
    record = {
        "benchmark": "memory", "device": "cpu",
        "command": "python scripts/bench_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: v for k, v in vars(args).items() if k != "worker"}, "libraries": libs, "skipped": skipped,
        "versions": bc.versions(), "results": log, "summary": summary, "targets": targets(summary),
        "largest_3d": largest,
    }
    return _write_and_report(args, record, libs, f" within {args.budget_gb} GB")


if __name__ == "__main__":
    sys.exit(main())
