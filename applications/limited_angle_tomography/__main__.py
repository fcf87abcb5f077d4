"""Limited-angle tomography with an invertible learned iterative reconstruction (i-RIM).

    python -m applications.limited_angle_tomography                               # config.toml
    python -m applications.limited_angle_tomography --steps 50 --out /tmp/tomo    # smoke test
    python -m applications.limited_angle_tomography --help

Trains :class:`invnet.networks.LearnedLoop` through invnet's trainer on random-ellipse phantoms
simulated every step, seen through a 120-degree arc of a parallel-beam Radon transform (a sparse
matrix as a pylops operator; ``problem.py``), with the mean squared error of the reconstruction
as the loss. Rerunning the command resumes a stopped run (a finished one is only evaluated again).
Then compares the loop on held-out phantoms and on the Shepp-Logan phantom with Tikhonov-CG
(``evaluation.py``) and writes ``results.json`` and ``reconstructions.png`` into the run folder
(or ``--results DIR``), atomically.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import torch

from invnet.data.atomic import atomic_file
from invnet.inference import PosteriorSampler

from ..common import app_parser, load_app_config, run_main, train
from .evaluation import evaluate, save_reconstructions
from .problem import check_geometry

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "applications.limited_angle_tomography.problem"
GEOMETRY = ("size", "angles", "arc")
DEFAULT_GEOMETRY = {"size": 32, "angles": 30, "arc": 120.0}


def check_config(cfg: dict) -> dict:
    """The simulator's arguments of a validated config, after checking that it trains this
    application's loop with its loss on its simulator, with one geometry (``ValueError``)."""
    expected = {"[data] source": (cfg["data"]["source"], f"{PACKAGE}:simulate"),
                "[model] type": (cfg["model"]["type"], f"{PACKAGE}:learned_loop"),
                "[training] loss": (cfg["training"]["loss"], f"{PACKAGE}:squared_error")}
    for what, (got, want) in expected.items():
        if got != want:
            raise ValueError(f"this application needs {what} = {want!r}, got {got!r}")
    arguments = {**DEFAULT_GEOMETRY, "noise": 0.02, **(cfg["data"]["arguments"] or {})}
    model = {**DEFAULT_GEOMETRY, **cfg["model"]}
    differ = [f"{k} ({arguments[k]} in [data] arguments, {model[k]} in [model])" for k in GEOMETRY
              if arguments[k] != model[k]]
    if differ:
        raise ValueError("the simulator and the model must share the geometry; they differ in " + ", ".join(differ))
    check_geometry(*(arguments[k] for k in GEOMETRY))
    return arguments


def main(argv: Optional[list[str]] = None) -> int:
    parser = app_parser("limited_angle_tomography", __doc__, os.path.join(HERE, "config.toml"))
    parser.add_argument("--eval-images", type=int, default=64, help="held-out phantoms compared (default 64)")
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the held-out phantoms and their noise")
    parser.add_argument("--results", default=None,
                        help="folder of results.json and reconstructions.png (default: the run folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.eval_images < 3:
        parser.error("--eval-images must be at least 3 (three appear in the figure)")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be positive")
        torch.set_num_threads(args.threads)
    cfg = load_app_config(args)
    arguments = check_config(cfg)
    result = train(cfg, args)
    loop = PosteriorSampler.from_checkpoint(result.sampling_checkpoint).model
    results, panels = evaluate(loop, images=args.eval_images, seed=args.eval_seed, **arguments)
    results["training"] = {"checkpoint": result.sampling_checkpoint, "steps": result.step,
                           "final_train_mse": result.last_train_loss, "final_val_mse": result.last_val_loss,
                           "batch_size": cfg["training"]["batch_size"], "torch_threads": torch.get_num_threads()}
    out = args.results or cfg["training"]["out_dir"]
    os.makedirs(out, exist_ok=True)
    text = json.dumps(results, indent=2)
    with atomic_file(os.path.join(out, "results.json")) as f:
        f.write(text + "\n")
    save_reconstructions(os.path.join(out, "reconstructions.png"), panels)
    print(text)
    print(f"results: {os.path.join(out, 'results.json')}, {os.path.join(out, 'reconstructions.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
