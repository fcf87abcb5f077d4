"""Train a conditional flow on the linear-Gaussian problem and compare it with the exact posterior.

    PYTHONPATH=$PWD python applications/linear_gaussian/train.py --network glow --steps 3000

Prints the metrics as JSON and writes them to ``--out`` (atomically) when given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lingauss import NETWORKS, LinearGaussianProblem, build_network, evaluate, train  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", default="glow", choices=sorted(NETWORKS))
    p.add_argument("--dim-x", type=int, default=8)
    p.add_argument("--dim-y", type=int, default=6)
    p.add_argument("--noise", type=float, default=None, help="noise std (default 0.3 vectors, 0.1 field)")
    p.add_argument("--field", action="store_true",
                   help="1D field variant: x on --dim-x points, y = --dim-y blurred samples")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--summary", type=int, default=0, help="outputs of a learned vector summary of y (0: none)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-y", type=int, default=50)
    p.add_argument("--eval-samples", type=int, default=20000)
    p.add_argument("--out", default=None, help="write the metrics JSON here")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be positive")
    torch.manual_seed(a.seed)
    if a.field:
        problem = LinearGaussianProblem.field(a.dim_x, a.dim_y, 0.1 if a.noise is None else a.noise, seed=a.seed)
    else:
        problem = LinearGaussianProblem.random(a.dim_x, a.dim_y, 0.3 if a.noise is None else a.noise, seed=a.seed)
    net = build_network(a.network, a.dim_x, a.dim_y, a.hidden, a.depth, a.summary, field=a.field)
    t0 = time.time()
    train(net, problem, a.steps, a.batch, a.lr, seed=a.seed + 1, log_every=max(1, a.steps // 10))
    seconds = time.time() - t0
    metrics = evaluate(net, problem, n_y=a.eval_y, n_samples=a.eval_samples)
    metrics["train_seconds"] = round(seconds, 1)
    metrics["args"] = vars(a)
    text = json.dumps(metrics, indent=2)
    print(text)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, a.out)
    return metrics


if __name__ == "__main__":
    main()
