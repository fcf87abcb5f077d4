"""Train a conditional flow on the linear-Gaussian problem and compare it with the exact posterior.

    python -m applications.linear_gaussian                                   # config.toml: ConditionalGlow
    python -m applications.linear_gaussian --config applications/linear_gaussian/config_hint.toml
    python -m applications.linear_gaussian --steps 50 --out /tmp/lg --eval-y 4 --eval-samples 500   # smoke test

Trains through invnet's trainer on fresh pairs every step (rerunning the command resumes a
stopped run; a finished one is only evaluated again), then writes the comparison with the exact
posterior to RUN/results.json (or --results) and prints it.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

from invnet.data.atomic import atomic_file
from invnet.inference import PosteriorSampler

from ..common import app_parser, load_app_config, run_main, train
from .problem import evaluate, make_problem

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = "applications.linear_gaussian:simulate"


def main(argv: Optional[list[str]] = None) -> int:
    parser = app_parser("linear_gaussian", __doc__, os.path.join(HERE, "config.toml"))
    parser.add_argument("--eval-y", type=int, default=50, help="held-out observations compared")
    parser.add_argument("--eval-samples", type=int, default=20000, help="posterior samples per observation")
    parser.add_argument("--results", default=None, help="where to write the metrics JSON (default RUN/results.json)")
    args = parser.parse_args(argv)
    if args.eval_y < 1 or args.eval_samples < 2:
        parser.error("--eval-y must be positive and --eval-samples at least 2")
    cfg = load_app_config(args)
    if cfg["data"]["source"] != SOURCE:
        raise ValueError(f"this application's config draws its pairs from [data] source = {SOURCE!r}, "
                         f"got {cfg['data']['source'] or cfg['data']['path']!r}")
    problem = make_problem(**(cfg["data"]["arguments"] or {}))  # checks the arguments before training
    result = train(cfg, args)
    net = PosteriorSampler.from_checkpoint(result.sampling_checkpoint).model.eval()
    metrics = evaluate(net, problem, n_y=args.eval_y, n_samples=args.eval_samples)
    metrics.update(checkpoint=result.sampling_checkpoint, steps=result.step, final_train_bpd=result.last_train_loss,
                   final_val_bpd=result.last_val_loss, network=cfg["model"], data=cfg["data"]["arguments"],
                   batch_size=cfg["training"]["batch_size"])
    text = json.dumps(metrics, indent=2)
    print(text)
    out = args.results or os.path.join(cfg["training"]["out_dir"], "results.json")
    with atomic_file(out) as f:
        f.write(text + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
