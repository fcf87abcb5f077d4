"""Reconstruction error of the memory-free backward against depth, in float32 and under bfloat16
and float16 autocast, for untrained and briefly trained Glow and HINT (docs/precision.md).

What is measured: ``invnet.core.drift.reconstruction_drift`` on a held-out batch, i.e. the
relative 2-norm error of the input the memory-free backward rebuilds from the network's output
(and the worst block's own round-trip error). Error figures, not timings: they do not depend on
the machine's load.

Problems (no download: data made here or shipped with scikit-image):

* Glow on images: 16 x 16 patches of scikit-image's ``camera`` picture (1 channel, scaled to
  [-1, 1] plus uniform dequantisation noise), 2 scales, hidden 32, K steps per scale;
* HINT on vectors: two moons (2 channels, noise 0.05), hidden 64, K steps.

"Trained": Adam (lr 1e-4 after a 100-step linear warm-up, gradient norm clipped at 1, float32,
memory saving on) for ``--steps`` steps of maximum likelihood, batch 64 (with lr 1e-3 both 64-step
flows diverged, with 3e-4 the 64-step Glow did). "Untrained": as constructed, ActNorm initialised
on the first batch; couplings start as the identity (zero last layer), so their conditioners'
precision cannot matter yet. The extra column "bf16 weights" runs the whole network in bfloat16
(``model.bfloat16()``), invertible arithmetic included: what the engine's float32 regions prevent.

Run (about 30 minutes on one core of a loaded machine):

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/measure_drift.py --out docs/benchmarks/drift.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
import time

import numpy as np
import torch

from invnet.core.drift import reconstruction_drift
from invnet.networks import HINT, Glow

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def two_moons(n: int, rng: np.random.Generator, noise: float = 0.05) -> torch.Tensor:
    """Two interleaved half circles, standardised, ``(n, 2)``."""
    t = rng.uniform(0.0, math.pi, n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(t), 1.0 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    pts = np.stack([x, y], 1) + noise * rng.standard_normal((n, 2))
    return torch.from_numpy((pts - np.array([0.5, 0.25])) / np.array([0.87, 0.5])).float()


def camera_patches(n: int, rng: np.random.Generator, size: int = 16) -> torch.Tensor:
    """Random ``size x size`` patches of scikit-image's camera picture in [-1, 1], dequantised."""
    from skimage import data

    image = data.camera().astype(np.float32)
    rows = rng.integers(0, image.shape[0] - size, n)
    cols = rng.integers(0, image.shape[1] - size, n)
    patches = np.stack([image[r : r + size, c : c + size] for r, c in zip(rows, cols)])
    patches = (patches + rng.random(patches.shape, dtype=np.float32)) / 128.0 - 1.0
    return torch.from_numpy(patches[:, None])


def make(kind: str, depth: int) -> tuple[torch.nn.Module, callable]:
    if kind == "glow":
        return Glow(1, hidden=32, levels=2, depth=depth, ndim=2), camera_patches
    return HINT(2, hidden=64, depth=depth, ndim=0), two_moons


def train(net, sample, steps: int, rng: np.random.Generator, lr: float, batch: int = 64) -> tuple[float, int]:
    """Maximum likelihood with Adam (linear warm-up over 100 steps, gradient norm clipped at 1).
    Returns the mean NLL (nats per dimension) of the last 20 steps, and the step at which the
    loss became non-finite (-1 if it never did; training stops there)."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 100))
    losses = []
    for step in range(steps):
        x = sample(batch, rng)
        loss = -net.log_prob(x).mean() / x[0].numel()
        if not bool(torch.isfinite(loss)):
            return float("nan"), step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        warmup.step()
        losses.append(loss.item())
    return (float(np.mean(losses[-20:])) if losses else float("nan")), -1


def measure(net, x) -> dict:
    row = {}
    for name, dtype in PRECISIONS.items():
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            report = reconstruction_drift(net, x)
        row[name] = report.error
        row[f"{name}_worst_block"] = report.worst.error
        row[f"{name}_worst_path"] = report.worst.path
    low = copy.deepcopy(net).bfloat16()
    row["bf16_weights"] = reconstruction_drift(low, x.bfloat16()).error
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--models", nargs="+", default=["glow", "hint"], choices=["glow", "hint"])
    p.add_argument("--steps", type=int, default=250, help="training steps per model")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate after the warm-up")
    p.add_argument("--batch", type=int, default=64, help="size of the measured batch")
    p.add_argument("--out", default="drift.json")
    a = p.parse_args()
    results = []
    started = time.time()
    for kind in a.models:
        for depth in a.depths:
            torch.manual_seed(0)
            rng = np.random.default_rng(0)
            net, sample = make(kind, depth)
            x_eval = sample(a.batch, np.random.default_rng(12345))
            with torch.no_grad():
                net(sample(256, rng))  # ActNorm's data-dependent initialisation
            untrained = measure(net, x_eval)
            t0 = time.time()
            nll, diverged_at = train(net, sample, a.steps, rng, a.lr)
            trained = measure(net, x_eval) if diverged_at < 0 else None
            results.append({"model": kind, "depth": depth, "steps": a.steps, "lr": a.lr, "final_nll": nll,
                            "diverged_at": diverged_at, "train_s": time.time() - t0, "untrained": untrained,
                            "trained": trained})
            if trained is None:
                print(f"{kind} K={depth}: training diverged at step {diverged_at}", flush=True)
                continue
            print(f"{kind} K={depth}: nll {nll:.3f}; untrained f32 {untrained['float32']:.1e}; trained "
                  + ", ".join(f"{k} {trained[k]:.1e}" for k in (*PRECISIONS, "bf16_weights")), flush=True)
    record = {"command": "python scripts/measure_drift.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(a).items()),
        "torch": torch.__version__, "wall_s": time.time() - started, "results": results}
    folder = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
        json.dump(record, f, indent=1)
    os.replace(f.name, a.out)
    print(table(results))


def table(results: list[dict]) -> str:
    """The Markdown table of docs/precision.md."""
    lines = [
        "| model | K | untrained f32 | untrained bf16 | untrained f16 | trained f32 | trained bf16 | "
        "trained f16 | trained, bf16 weights | NLL/dim |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        u, t = r["untrained"], r["trained"]
        if t is None:
            lines.append(
                f"| {r['model']} | {r['depth']} | {u['float32']:.1e} | {u['bfloat16']:.1e} | {u['float16']:.1e} | "
                f"training diverged at step {r['diverged_at']} | | | | |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['depth']} | {u['float32']:.1e} | {u['bfloat16']:.1e} | {u['float16']:.1e} | "
            f"{t['float32']:.1e} | {t['bfloat16']:.1e} | {t['float16']:.1e} | {t['bf16_weights']:.1e} | "
            f"{r['final_nll']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
