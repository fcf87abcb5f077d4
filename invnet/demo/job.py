"""``invnet demo``: write the problem's pairs, train with ``invnet train``'s machinery (config,
checkpoints, metrics), sample held-out posteriors into Zarr and report calibration.

The output folder is the demo's own: it is recognised by the first line of the ``config.toml``
the demo writes, and a rerun replaces the previous demo's outputs in it. A folder that holds
other files with the names the demo writes is refused, so the demo never overwrites anything else.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Optional

from ..data.atomic import atomic_file
from .problem import NOISE, demo_data_matches, make_demo_data

__all__ = ["run_demo", "DEMO_SIZES", "DEMO_OUTPUTS"]

#: problem and training sizes. "small" (the default) takes about 2 minutes of CPU on one thread
#: (README), "large" twice as long, "tiny" a few seconds (tests). Rational-quadratic spline
#: couplings: with affine couplings the demo's posteriors stayed over-confident however long they
#: trained (90% intervals covered 0.86 of 300 held-out truths with the ratio E|s-x|^2/E|mean-x|^2
#: anywhere from 1.85 to 2.29). A two-scale Glow rather than one squeeze and a flat stack: on the
#: same 300, two training seeds each, 90% coverage 0.911 / 0.907 against 0.876 / 0.891, TARP's
#: ATC -0.023 / -0.062 against -0.137 / -0.061, RMSE 0.188 against 0.194 / 0.190
#: (docs/posterior_accuracy.md, "The demo's posterior").
DEMO_SIZES = {
    "small": {"image": 16, "n": 3000, "steps": 1200, "batch_size": 32, "levels": 2, "depth": 2, "hidden": 48,
              "coupling": "spline", "n_samples": 200, "observations": 40, "lr": 2e-3},
    "large": {"image": 16, "n": 3000, "steps": 2400, "batch_size": 32, "levels": 2, "depth": 2, "hidden": 48,
              "coupling": "spline", "n_samples": 200, "observations": 40, "lr": 2e-3},
    "tiny": {"image": 8, "n": 40, "steps": 6, "batch_size": 8, "levels": 2, "depth": 1, "hidden": 8,
             "coupling": "spline", "n_samples": 10, "observations": 2, "lr": 1e-3},
}
#: what the demo writes into its folder
DEMO_OUTPUTS = ("data.h5", "config.toml", "run", "posterior.zarr", "posterior_report.json", "plots", "report.json",
                "report.md")
_FIRST_LINE = "# written by `invnet demo`"


def _config_text(p: dict, data: str, out_dir: str, seed: int, device: str = "auto", precision: str = "float32") -> str:
    return f"""{_FIRST_LINE}; run it again with `invnet train {{this file}}` (see docs/config.md)
[data]
path = "{data}"
x = "x"
y = "y"
validation_fraction = 0.1
seed = {seed}

[model]
type = "ConditionalGlow"
levels = {p['levels']}
depth = {p['depth']}
hidden = {p['hidden']}
coupling = "{p['coupling']}"

[optimizer]
name = "Adam"
lr = {p['lr']}

[scheduler]
name = "CosineAnnealingLR"
T_max = {p['steps']}

[training]
out_dir = "{out_dir}"
steps = {p['steps']}
batch_size = {p['batch_size']}
clip_grad_norm = 50.0
validate_every = {max(1, p['steps'] // 6)}
log_every = {max(1, p['steps'] // 100)}
checkpoint_every_minutes = 2.0
keep_last = 2
seed = {seed}
progress = true
device = "{device}"
precision = "{precision}"
"""


def _is_demo_folder(out_dir: str) -> bool:
    try:
        with open(os.path.join(out_dir, "config.toml")) as f:
            return f.readline().startswith(_FIRST_LINE)
    except (OSError, UnicodeDecodeError):
        return False


def _claim_folder(out_dir: str) -> bool:
    """Check that the demo may write into ``out_dir``; returns whether a previous demo is there."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir!r} exists and is not a folder")
    if not os.path.isdir(out_dir):
        return False
    if _is_demo_folder(out_dir):
        return True
    taken = [n for n in DEMO_OUTPUTS if os.path.lexists(os.path.join(out_dir, n))]
    if taken:
        raise ValueError(f"--out {out_dir!r} holds {taken}, which the demo did not write and would replace; "
                         "choose another --out (the default is ./invnet_demo_output)")
    return False


def run_demo(out_dir: str = "invnet_demo_output", steps: Optional[int] = None, seed: int = 0,
             size: str = "small", threads: Optional[int] = 1, device: str = "auto", precision: str = "float32") -> dict:
    """Generate the problem, train, sample held-out posteriors, write plots, Zarr and a report.
    Returns the calibration report (also in ``out_dir/report.json`` and ``report.md``), with
    ``status`` ``"finished"``, or ``"preempted"``/``"interrupted"`` (and ``signal``) when a signal
    stopped the training (a checkpoint was written; the report then holds no calibration).

    ``threads``: torch's CPU threads for the demo (restored afterwards; ``None`` leaves them). The
    demo's tensors are small (16x16 images) and gain little from threads, while on a busy machine
    the threads of each parallel region wait for each other: measured on 2 cores at load 6, one
    thread took 0.09 s a step and two 1.1 s (up to 4.4 s)."""
    import torch

    if size not in DEMO_SIZES:
        raise ValueError(f"size must be one of {sorted(DEMO_SIZES)}, got {size!r}")
    p = dict(DEMO_SIZES[size])
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be positive, got {steps}")
        p["steps"] = steps
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be positive, got {threads}")
    from ..training.device import check_device_name
    from ..training.precision import PRECISIONS

    if check_device_name(device):
        raise ValueError(f"device must be {check_device_name(device)}, got {device!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    out_dir = os.path.abspath(out_dir)
    previous = _claim_folder(out_dir)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(out_dir, previous, p, size, seed, device, precision)
    finally:
        torch.set_num_threads(before)


def _run(out_dir: str, previous: bool, p: dict, size: str, seed: int, device: str, precision: str) -> dict:
    from ..data import train_validation_split
    from ..inference import sample_job
    from ..inference.diagnostics import diagnostics_summary
    from ..training import load_config, train_from_config

    t0, cpu0 = time.time(), time.process_time()
    replacing = " (replacing the previous demo's outputs)" if previous else ""
    print(f"invnet demo ({size}): output folder {out_dir}{replacing}", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    data = os.path.join(out_dir, "data.h5")
    if not demo_data_matches(data, p["n"], p["image"], seed):
        make_demo_data(data, p["n"], p["image"], seed)
    with atomic_file(os.path.join(out_dir, "config.toml")) as f:
        f.write(_config_text(p, "data.h5", "run", seed, device, precision))
    print(f"deblurring {p['image']}x{p['image']} layered images, {p['n']} simulated pairs -> {data}", flush=True)
    cfg = load_config(os.path.join(out_dir, "config.toml"))
    if os.path.isdir(cfg["training"]["out_dir"]):  # the previous demo's run (the folder is the demo's own)
        shutil.rmtree(cfg["training"]["out_dir"])
    result = train_from_config(cfg, resume=False)
    t_train = time.time() - t0
    if result.status != "finished":
        print(f"invnet demo: stopped by {result.signal} during training (checkpoint {result.checkpoint}); "
              "run the demo again to start over", flush=True)
        return {"status": result.status, "signal": result.signal, "checkpoint": result.checkpoint}
    _, val_idx = train_validation_split(p["n"], cfg["data"]["validation_fraction"], cfg["data"]["seed"])
    obs = val_idx[: p["observations"]]
    store = os.path.join(out_dir, "posterior.zarr")
    plots = os.path.join(out_dir, "plots")
    t1 = time.time()
    chosen = result.best_checkpoint or result.checkpoint  # the best-by-validation weights, as `invnet sample` takes
    report = sample_job(chosen, data, store, n_samples=p["n_samples"], batch_size=min(100, p["n_samples"]),
                        indices=obs, plots=plots, seed=seed, overwrite=True, progress=True, device=device)
    t_sample, t_total, cpu = time.time() - t1, time.time() - t0, time.process_time() - cpu0
    report = dict(report, status="finished", size=size, train_seconds=round(t_train, 1),
                  sample_seconds=round(t_sample, 1), total_seconds=round(t_total, 1), cpu_seconds=round(cpu, 1),
                  steps=result.step, final_train_bpd=result.last_train_loss, final_val_bpd=result.last_val_loss)
    with atomic_file(os.path.join(out_dir, "report.json")) as f:
        json.dump(report, f, indent=1)
    cov = report["coverage"]
    lines = [
        "# invnet demo: posterior sampling for deblurring",
        "",
        f"- problem: y = gaussian_blur(x, 1.5) + {NOISE} noise on {p['image']}x{p['image']} layered images; "
        f"{p['n']} simulated pairs (10% held out)",
        f"- network: ConditionalGlow, {p['levels']} scales x {p['depth']} steps, hidden {p['hidden']}, "
        f"{p['coupling']} couplings; "
        f"{result.step} steps in "
        f"{t_train:.0f} s; validation NLL {report['final_val_bpd']:.3f} bits/dim (normalised data)",
        f"- posterior: {p['n_samples']} samples for each of {len(obs)} held-out observations ({t_sample:.0f} s)",
        f"- RMSE of the posterior mean {report['rmse_mean']:.4f}, "
        f"mean posterior std {report['mean_posterior_std']:.4f}",
        f"- z-scores: mean {report['z_mean']:.3f}, std {report['z_std']:.3f} (0 and 1 if calibrated)",
        "- coverage of central intervals (sample quantiles): " + ", ".join(
            f"{float(k):.0%}: {cov[k]['empirical']:.3f}" for k in ("0.5", "0.9", "0.95")),
        f"- E|sample - x|^2 / E|mean - x|^2 = {report['ratio_sample_to_mean_sq_error']:.3f} (2 if calibrated)",
        f"- {diagnostics_summary(report)}",
        f"- time: {t_total:.0f} s wall clock, {cpu:.0f} s CPU (all threads) for the demo ({size})",
        "",
        "Files: data.h5 (pairs), config.toml, run/ (checkpoints, metrics.jsonl, metrics.png), posterior.zarr "
        "(mean, std, samples, index; docs/config.md), posterior_report.json, plots/ (posterior_*.png, "
        "error_vs_std.png, coverage.png, sbc_ranks.png, tarp.png), report.json.",
    ]
    with atomic_file(os.path.join(out_dir, "report.md")) as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[2:-3]))
    print(f"\nwrote: {os.path.join(out_dir, 'report.md')}\n       {store}\n       {plots}/\n       "
          f"{os.path.join(out_dir, 'run', 'metrics.png')}\n"
          f"took {t_total:.0f} s (train {t_train:.0f} s, sample {t_sample:.0f} s; CPU {cpu:.0f} s)")
    return report
