"""The ``invnet`` command. Subcommands register themselves in ``_build_parser``.

Exit codes: 0 success; 2 bad command line, configuration or data (nothing trained); 65 the loss
became NaN/Inf (last good checkpoint kept); 75 stopped by SIGTERM/SIGUSR1 after writing a
checkpoint (rerun the same command to resume). See :mod:`invnet.training.signals`.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps, seed=args.seed, size=args.size)
    return 0


def _train(args: argparse.Namespace) -> int:
    from .training import EXIT_OK, EXIT_PREEMPTED, load_config, train_from_config

    from .distributed import default_comm

    cfg = load_config(args.config)
    comm = default_comm()  # MPI under `mpiexec ... python -m mpi4py -m invnet train`, serial otherwise
    result = train_from_config(cfg, comm=comm, resume=not args.restart)
    if comm.rank == 0:
        print(f"{result.status} at step {result.step}; checkpoint: {result.checkpoint}; metrics: {result.metrics_path}")
    return EXIT_PREEMPTED if result.status == "preempted" else EXIT_OK


def _parse_indices(text: Optional[str]):
    if text is None:
        return None
    if ":" in text:
        a, b = text.split(":", 1)
        return range(int(a or 0), int(b))
    return [int(v) for v in text.split(",") if v.strip()]


def _sample(args: argparse.Namespace) -> int:
    from .inference import report_path, sample_job

    report = sample_job(args.checkpoint, args.data, args.out, n_samples=args.n, batch_size=args.batch_size,
                        temperature=args.temperature, keep=args.keep, indices=_parse_indices(args.indices),
                        x_name=args.x, y_name=args.y, plots=args.plots, seed=args.seed, overwrite=args.overwrite)
    print(f"posterior mean, std and samples: {args.out}")
    if report:
        cov = report["coverage"]
        print(f"calibration ({report['observations']} observations): " + ", ".join(
            f"{float(k):.0%} interval covers {v['empirical']:.3f}" for k, v in cov.items() if k in ("0.5", "0.9", "0.95")
        ) + f"; ratio E|s-x|^2/E|mean-x|^2 = {report['ratio_sample_to_mean_sq_error']:.3f} (2 if calibrated)")
        print(f"report: {report_path(args.out)}")
    if args.plots:
        print(f"plots: {args.plots}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .training.checkpoint import read_checkpoint

    ckpt = read_checkpoint(args.checkpoint)
    n_params = sum(int(t.numel()) for t in ckpt.weights.values() if t.is_floating_point())
    info = {"checkpoint": ckpt.path, "step": ckpt.step, "saved_at": ckpt.meta.get("saved_at"),
            "network": ckpt.meta.get("spec"), "parameters_and_buffers": n_params, "data": ckpt.meta.get("data"),
            "normalization": ckpt.meta.get("normalization"), "last_train_bpd": ckpt.meta.get("last_train_bpd"),
            "last_val_bpd": ckpt.meta.get("last_val_bpd"), "data_position": ckpt.state.get("loader")}
    print(json.dumps(info, indent=1))
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="invnet", description="Memory-efficient invertible networks.",
                                     epilog="exit codes: 0 ok, 2 bad input, 65 non-finite loss, 75 preempted (resume by rerunning)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a conditional flow on a built-in posterior problem; plots, Zarr, report")
    demo.add_argument("--out", default="invnet_demo", help="output folder (default: ./invnet_demo)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the size's own)")
    demo.add_argument("--size", choices=["default", "tiny"], default="default", help="'tiny' runs in seconds")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", help="train a conditional flow from a TOML config (docs/config.md)")
    train.add_argument("config")
    train.add_argument("--restart", action="store_true", help="ignore existing checkpoints in out_dir")
    train.set_defaults(func=_train)

    sample = sub.add_parser("sample", help="posterior samples, mean and std for observations, into Zarr")
    sample.add_argument("checkpoint", help="a checkpoint folder or a run folder (latest checkpoint)")
    sample.add_argument("--data", required=True, help="HDF5 file or Zarr store with the observations")
    sample.add_argument("--out", required=True, help="Zarr store to create (e.g. results.zarr)")
    sample.add_argument("--n", type=int, default=100, help="samples per observation")
    sample.add_argument("--batch-size", type=int, default=50)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--keep", type=int, default=4, help="samples stored per observation")
    sample.add_argument("--indices", default=None, help="rows to use: 'a:b' or 'i,j,k' (default all)")
    sample.add_argument("--y", default="y", help="observation array name")
    sample.add_argument("--x", default="x", help="truth array name (calibration when present)")
    sample.add_argument("--plots", default=None, help="folder for figures")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--overwrite", action="store_true")
    sample.set_defaults(func=_sample)

    info = sub.add_parser("info", help="describe a checkpoint")
    info.add_argument("checkpoint")
    info.set_defaults(func=_info)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run the ``invnet`` command; returns the exit code (see the module docstring)."""
    from .training.signals import EXIT_NONFINITE, EXIT_USAGE, NonFiniteLossError

    args = _build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"invnet {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as err:
        print(f"invnet {args.command}: {err}", file=sys.stderr)
        return EXIT_NONFINITE


if __name__ == "__main__":
    sys.exit(main())
