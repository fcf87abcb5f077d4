"""Seismic imaging with uncertainty: learn p(log-impedance | post-stack data), then sample it.

    PYTHONPATH=$PWD python applications/seismic_imaging/run.py --dims 2     # minutes on 2 cores
    PYTHONPATH=$PWD python applications/seismic_imaging/run.py --dims 3     # the small 3D variant

Generates (model, data) pairs with pylops post-stack modelling into HDF5, trains the network of
config_<d>d.toml with invnet's trainer (rerunning resumes), draws posterior samples for held-out
data into Zarr, and writes calibration numbers (results_<d>d.json) and figures (figures_<d>d/).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SIZES = {2: {"shape": (32, 32), "n_train": 6000, "n_test": 64},
         3: {"shape": (16, 16, 16), "n_train": 800, "n_test": 16}}
NOISE = 0.02  # absolute noise on data of standard deviation ~0.2 (SNR ~ 10)


def main(argv=None) -> dict:
    import numpy as np

    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib

    from forward import write_pairs

    from invnet.inference import sample_job
    from invnet.training import train_from_config, validate_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, choices=[2, 3], default=2)
    p.add_argument("--out", default=HERE, help="folder for data/, runs/, results and figures (default: here)")
    p.add_argument("--steps", type=int, default=None, help="override the config's steps")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--samples", type=int, default=200, help="posterior samples per test observation")
    p.add_argument("--model", default=None, help="override the network type (e.g. ConditionalCouplingFlow)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override a network argument, e.g. --model-arg levels=3 (numbers are parsed)")
    args = p.parse_args(argv)
    size = dict(SIZES[args.dims])
    n_train = args.n_train or size["n_train"]
    n_test = args.n_test or size["n_test"]
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    t0 = time.time()
    train = os.path.join(out, "data", f"train_{args.dims}d.h5")
    test = os.path.join(out, "data", f"test_{args.dims}d.h5")
    if not os.path.exists(train):
        write_pairs(train, n_train, size["shape"], NOISE, seed=1)
    if not os.path.exists(test):
        write_pairs(test, n_test, size["shape"], NOISE, seed=2)  # another seed: held out
    t_data = time.time() - t0
    with open(os.path.join(HERE, f"config_{args.dims}d.toml"), "rb") as f:
        raw = tomllib.load(f)
    if args.steps:
        raw["training"]["steps"] = args.steps
        raw["scheduler"]["T_max"] = args.steps
    if args.model:
        raw["model"] = {"type": args.model}
    for item in args.model_arg:
        key, _, value = item.partition("=")
        try:
            raw["model"][key] = json.loads(value)
        except json.JSONDecodeError:
            raw["model"][key] = value
    cfg = validate_config(raw, out)
    t1 = time.time()
    result = train_from_config(cfg)
    t_train = time.time() - t1
    if result.status != "finished":  # SIGTERM/SIGUSR1 or Ctrl-C: a checkpoint was written; rerunning resumes
        from invnet.training.signals import exit_code_for_signal

        raise SystemExit(exit_code_for_signal(result.signal or ""))
    figures = os.path.join(out, f"figures_{args.dims}d")
    store = os.path.join(out, f"results_{args.dims}d.zarr")
    t2 = time.time()
    report = sample_job(result.checkpoint, test, store, n_samples=args.samples, batch_size=min(100, args.samples),
                        plots=figures, n_plots=3, overwrite=True)
    t_sample = time.time() - t2
    # baseline: the prior mean (training mean per channel) as the estimate
    import h5py

    from invnet.training import read_checkpoint

    norm = read_checkpoint(result.checkpoint).meta["normalization"]
    with h5py.File(test, "r") as f:
        truth = f["x"][...]
    prior_rmse = float(np.sqrt(((truth - norm["x_mean"][0]) ** 2).mean()))
    report.update(dims=args.dims, shape=list(size["shape"]), n_train=n_train, n_test=n_test, noise=NOISE,
                  network=cfg["model"]["type"], steps=result.step, final_train_bpd=result.last_train_loss,
                  final_val_bpd=result.last_val_loss, rmse_prior_mean=prior_rmse,
                  seconds={"data": round(t_data, 1), "train": round(t_train, 1), "sample": round(t_sample, 1)})
    with open(os.path.join(out, f"results_{args.dims}d.json"), "w") as f:
        json.dump(report, f, indent=1)
    cov = report["coverage"]
    print(f"{args.dims}D seismic imaging, {cfg['model']['type']}, {result.step} steps in {t_train:.0f} s")
    print(f"RMSE posterior mean {report['rmse_mean']:.4f} (prior mean {prior_rmse:.4f}); mean std "
          f"{report['mean_posterior_std']:.4f}; coverage 50/90/95%: "
          + "/".join(f"{cov[k]['empirical']:.3f}" for k in ("0.5", "0.9", "0.95"))
          + f"; ratio {report['ratio_sample_to_mean_sq_error']:.3f} (2 if calibrated); z std {report['z_std']:.3f}")
    print(f"results: {store}, {os.path.join(out, f'results_{args.dims}d.json')}, figures: {figures}")
    if not math.isfinite(report["rmse_mean"]):
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
