"""2D toy example for docs/networks.md: fit Glow (vectors, 2 channels) to two moons, then plot the
data, the learned density exp(log_prob) on a grid and samples from the flow.

    PYTHONPATH=$PWD python scripts/two_moons.py --steps 1500 --out docs/figures/glow_two_moons.png
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch


def two_moons(n: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Two interleaved half circles (standardised), ``(n, 2)``."""
    t = rng.uniform(0.0, math.pi, n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(t), 1.0 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    pts = np.stack([x, y], 1) + noise * rng.standard_normal((n, 2))
    return (pts - np.array([0.5, 0.25])) / np.array([0.87, 0.5])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--out", default="docs/figures/glow_two_moons.png")
    a = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from invnet.networks import Glow

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = Glow(2, hidden=a.hidden, levels=1, depth=a.depth, ndim=0)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.steps)
    for step in range(a.steps):
        x = torch.tensor(two_moons(512, 0.05, rng), dtype=torch.float32)
        loss = -net.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, a.steps // 10) == 0:
            print(f"step {step + 1}  nll {float(loss.detach()):.3f}", flush=True)
    lim, n = 3.0, 300
    t = torch.linspace(-lim, lim, n)
    gx, gy = torch.meshgrid(t, t, indexing="ij")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    with torch.no_grad():
        dens = torch.exp(net.log_prob(grid)).reshape(n, n)
        samples = net.sample(3000).numpy()
    mass = float(dens.sum() * (t[1] - t[0]) ** 2)
    data = two_moons(3000, 0.05, rng)
    fig, ax = plt.subplots(1, 3, figsize=(12, 4))
    ax[0].scatter(data[:, 0], data[:, 1], s=2)
    ax[0].set_title("data (two moons)")
    ax[1].imshow(dens.T.numpy(), origin="lower", extent=[-lim, lim, -lim, lim], cmap="viridis")
    ax[1].set_title(f"learned density (mass on grid {mass:.3f})")
    ax[2].scatter(samples[:, 0], samples[:, 1], s=2, color="C1")
    ax[2].set_title("samples from the flow")
    for axis in ax:
        axis.set_xlim(-lim, lim)
        axis.set_ylim(-lim, lim)
        axis.set_aspect("equal")
    fig.suptitle(f"Glow(2, hidden={a.hidden}, levels=1, depth={a.depth}, ndim=0), {a.steps} steps; "
                 f"final nll {float(loss.detach()):.3f} nats")
    fig.tight_layout()
    tmp = a.out + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, a.out)
    print(f"wrote {a.out}; density mass on the grid {mass:.4f}")


if __name__ == "__main__":
    main()
