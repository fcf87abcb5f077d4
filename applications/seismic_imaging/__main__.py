"""Seismic imaging with uncertainty: learn p(log-impedance | post-stack data), then sample it.

    python -m applications.seismic_imaging                                   # 2D: config_2d.toml
    python -m applications.seismic_imaging --config applications/seismic_imaging/config_3d.toml
    python -m applications.seismic_imaging --steps 20 --out /tmp/seis --n-test 4 --samples 20   # smoke test

Trains the network of the config through invnet's trainer on pairs simulated afresh for every
batch (rerunning the command resumes a stopped run; a finished one is only evaluated again),
chooses the sampling temperature on other held-out simulations (--temperature auto, the
default; calibrate.py), then draws posterior samples for held-out test simulations (RUN/test.h5,
another seed) into RUN/posterior.zarr and writes the calibration numbers (at the chosen
temperature, and at T = 1 under "uncalibrated") to RUN/results.json (or --results) and figures
to RUN/figures (or --plots; none with --no-plots).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from typing import Optional

import h5py
import numpy as np
import torch

from invnet.data.atomic import atomic_file, atomic_path
from invnet.inference import sample_job
from invnet.inference.temperature import parse_temperature

from ..common import app_parser, load_app_config, require_source, run_main, train
from .calibrate import CALIBRATION_SEED, choose_temperature
from .forward import simulate, standardization

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = "applications.seismic_imaging:simulate"
#: seed of the held-out pairs: a plain torch seed, unrelated to the trainer's SeedSequence streams
TEST_SEED = 2


def write_test_set(path: str, n: int, arguments: dict) -> None:
    """``n`` held-out pairs (standardised, as the network sees them) to the HDF5 file ``path``
    (datasets ``x``, ``y``), written atomically; kept when it exists with the same arguments."""
    if os.path.exists(path):
        with h5py.File(path, "r") as f:
            if json.loads(f.attrs.get("arguments", "null")) == arguments and len(f["x"]) == n:
                return
    x, y = simulate(n, torch.Generator().manual_seed(TEST_SEED), **arguments)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("x", data=x, chunks=(1,) + x.shape[1:])
        f.create_dataset("y", data=y, chunks=(1,) + y.shape[1:])
        f.attrs["arguments"] = json.dumps(arguments)
        f.attrs["forward"] = "pylops PoststackLinearModelling, Ricker 30 Hz, dt 4 ms; standardised"


def main(argv: Optional[list[str]] = None) -> int:
    parser = app_parser("seismic_imaging", __doc__, os.path.join(HERE, "config_2d.toml"))
    parser.add_argument("--n-test", type=int, default=64, help="held-out simulations sampled (default 64)")
    parser.add_argument("--samples", type=int, default=200, help="posterior samples per held-out observation")
    parser.add_argument("--results", default=None, help="where to write the metrics JSON (default RUN/results.json)")
    parser.add_argument("--plots", default=None, help="folder for the figures (default RUN/figures)")
    parser.add_argument("--no-plots", action="store_true", help="draw no figures")
    parser.add_argument("--temperature", default="auto",
                        help="sampling temperature: a positive number, or auto (default): chosen on "
                             "--calibration-pairs held-out simulations so that their spread-to-error ratio is "
                             "a calibrated posterior's")
    parser.add_argument("--calibration-pairs", type=int, default=256, help="held-out simulations for auto")
    parser.add_argument("--calibration-samples", type=int, default=32, help="samples per calibration pair")
    args = parser.parse_args(argv)
    if args.n_test < 1 or args.samples < 2:
        parser.error("--n-test must be positive and --samples at least 2")
    if args.calibration_pairs < 8 or args.calibration_samples < 2:
        parser.error("--calibration-pairs must be at least 8 and --calibration-samples at least 2")
    try:
        fixed_temperature = parse_temperature(args.temperature)
    except ValueError as err:
        parser.error(str(err))
    cfg = load_app_config(args)
    arguments = require_source(cfg, SOURCE)
    simulate(1, torch.Generator(), **arguments)  # checks the arguments (and builds the operator) before training
    t0 = time.time()
    result = train(cfg, args)
    t_train = time.time() - t0
    run = cfg["training"]["out_dir"]
    test = os.path.join(run, "test.h5")
    write_test_set(test, args.n_test, arguments)
    t1 = time.time()
    fit = None
    temperature = fixed_temperature
    if temperature is None:
        fit = choose_temperature(result.sampling_checkpoint, arguments, args.calibration_pairs,
                                 args.calibration_samples, log=print)
        temperature = fit.temperature
    t_calibrate = time.time() - t1
    plots = None if args.no_plots else args.plots or os.path.join(run, "figures")
    uncalibrated = None
    if temperature != 1.0:  # the raw posterior's figures too, so what the temperature changed stays visible
        raw = sample_job(result.sampling_checkpoint, test, os.path.join(run, "posterior_T1.zarr"),
                         n_samples=args.samples, batch_size=min(100, args.samples), overwrite=True)
        uncalibrated = _headline(raw, 1.0)
    report = sample_job(result.sampling_checkpoint, test, os.path.join(run, "posterior.zarr"), n_samples=args.samples,
                        batch_size=min(100, args.samples), temperature=temperature, plots=plots, n_plots=3,
                        overwrite=True)
    t_sample = time.time() - t1 - t_calibrate
    defaults = {k: p.default for k, p in inspect.signature(simulate).parameters.items()}
    shape = [int(s) for s in arguments.get("shape", defaults["shape"])]
    noise = arguments.get("noise", defaults["noise"])
    _, x_std, _ = standardization(tuple(shape), float(noise))
    with h5py.File(test, "r") as f:  # the prior mean (zero in standardised units) as the estimate
        rmse_prior = float(np.sqrt((f["x"][...].astype(np.float64) ** 2).mean()))
    report.update(
        rmse_mean_log_impedance=report["rmse_mean"] * x_std,
        mean_posterior_std_log_impedance=report["mean_posterior_std"] * x_std,
        rmse_prior_mean_log_impedance=rmse_prior * x_std,
        units="rmse_mean and mean_posterior_std in standardised units (log-impedance / x_std); *_log_impedance "
              "in log-impedance",
        x_std=x_std, shape=shape, noise=noise, n_test=args.n_test, network=cfg["model"],
        temperature=temperature,
        temperature_fit=None if fit is None else dict(fit.as_dict(), seed=CALIBRATION_SEED),
        uncalibrated=uncalibrated or _headline(report, temperature),
        steps=result.step, batch_size=cfg["training"]["batch_size"],
        pairs_seen=result.step * cfg["training"]["batch_size"],
        validation_size=cfg["data"]["validation_size"], final_train_bpd=result.last_train_loss,
        final_val_bpd=result.last_val_loss, checkpoint=result.sampling_checkpoint,
        seconds={"train": round(t_train, 1), "calibrate": round(t_calibrate, 1), "sample": round(t_sample, 1)},
        command=" ".join(["python -m applications.seismic_imaging", *(argv if argv is not None else sys.argv[1:])]),
    )
    out = args.results or os.path.join(run, "results.json")
    with atomic_file(out) as f:
        f.write(json.dumps(report, indent=1) + "\n")
    cov = report["coverage"]
    print(f"{len(shape)}D seismic imaging, {cfg['model']['type']}, {result.step} steps, temperature "
          f"{temperature:.4g}" + (" (chosen on held-out simulations)" if fit is not None else ""))
    print(f"RMSE posterior mean {report['rmse_mean_log_impedance']:.4f} (prior mean "
          f"{report['rmse_prior_mean_log_impedance']:.4f}) log-impedance; mean std "
          f"{report['mean_posterior_std_log_impedance']:.4f}; coverage 50/90/95%: "
          + "/".join(f"{cov[k]['empirical']:.3f}" for k in ("0.5", "0.9", "0.95"))
          + f"; ratio {report['ratio_sample_to_mean_sq_error']:.3f} (2 if calibrated); z std {report['z_std']:.3f}")
    if uncalibrated is not None:
        print("at T = 1: coverage 50/90/95%: " + "/".join(f"{v:.3f}" for v in uncalibrated["coverage"])
              + f"; ratio {uncalibrated['ratio']:.3f}; RMSE {uncalibrated['rmse_mean']:.4f} (standardised)")
    print(f"results: {out}; posterior: {os.path.join(run, 'posterior.zarr')}; figures: {plots}")
    return 0 if math.isfinite(report["rmse_mean"]) else 1


def _headline(report: dict, temperature: float) -> dict:
    """The figures the README compares, from a sampling report at ``temperature``."""
    return {"temperature": temperature, "rmse_mean": report["rmse_mean"],
            "mean_posterior_std": report["mean_posterior_std"],
            "coverage": [report["coverage"][k]["empirical"] for k in ("0.5", "0.9", "0.95")],
            "ratio": report["ratio_sample_to_mean_sq_error"], "z_std": report["z_std"]}


if __name__ == "__main__":
    sys.exit(run_main(main))
