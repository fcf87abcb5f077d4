"""Check the calibration of `invnet demo` runs on more held-out observations than the demo reports.

The demo reports 40 held-out posteriors, too few for TARP or SBC to see a small miscalibration.
This samples the best-by-validation weights of each given demo folder for the first
``--observations`` pairs of its validation split (the pairs the demo holds out; the demo's own 40
are the first of them) and prints coverage, the ratio E|s-x|^2 / E|mean-x|^2 (2 if calibrated),
z-scores and the SBC/TARP line, one row per folder. Used for the demo figures in README.md and
docs/posterior_accuracy.md:

    python -m invnet demo --out /tmp/demo_small
    python -m invnet demo --out /tmp/demo_large --size large
    python scripts/demo_calibration.py /tmp/demo_small /tmp/demo_large --observations 300
    python scripts/demo_calibration.py /tmp/demo_small --temperatures 1 1.03 1.05   # a row per temperature
"""
from __future__ import annotations

import argparse
import os
import tempfile

import h5py
import torch

from invnet.data import train_validation_split
from invnet.inference import sample_job
from invnet.inference.diagnostics import diagnostics_summary
from invnet.training import load_config


def evaluate(folder: str, observations: int, samples: int, seed: int, temperature: float = 1.0) -> dict:
    best = os.path.join(folder, "run", "checkpoints", "best")
    data = os.path.join(folder, "data.h5")
    if not (os.path.isdir(best) and os.path.isfile(data)):
        raise SystemExit(f"{folder}: not a finished `invnet demo` folder (needs run/checkpoints/best and data.h5)")
    with h5py.File(data, "r") as f:
        n = int(f.attrs["n"])
    split = load_config(os.path.join(folder, "config.toml"))["data"]  # the split the demo trained with
    _, val = train_validation_split(n, split["validation_fraction"], split["seed"])
    if observations > len(val):
        raise SystemExit(f"{folder}: only {len(val)} held-out pairs, asked for {observations}")
    with tempfile.TemporaryDirectory() as tmp:
        return sample_job(best, data, os.path.join(tmp, "posterior.zarr"), n_samples=samples, batch_size=100,
                          indices=val[:observations], seed=seed, temperature=temperature, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="output folders of `invnet demo`")
    p.add_argument("--observations", type=int, default=300)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0], help="sampling temperatures, a row each")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print("| folder | T | 50% | 90% | 95% | ratio | z std | RMSE | SBC / TARP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for folder in a.folders:
        for t in a.temperatures:
            r = evaluate(folder, a.observations, a.samples, a.seed, t)
            cov = r["coverage"]
            print(f"| {folder} | {t:g} | " + " | ".join(f"{cov[k]['empirical']:.3f}" for k in ("0.5", "0.9", "0.95"))
                  + f" | {r['ratio_sample_to_mean_sq_error']:.3f} | {r['z_std']:.3f} | {r['rmse_mean']:.4f} | "
                  f"{diagnostics_summary(r)} |", flush=True)


if __name__ == "__main__":
    main()
