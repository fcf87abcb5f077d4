"""The ``invnet`` command. Subcommands register themselves in ``_build_parser``.

Exit codes: 0 success; 2 bad command line, configuration, data or checkpoint (nothing written);
65 the loss became NaN/Inf (last good checkpoint kept); 70 the reconstruction drift of the
memory-free backward rose above ``drift_fail_above`` (last good checkpoint kept); 74 an
input/output error (disk full, ...; files are written atomically, so nothing is half-written);
75 stopped by SIGTERM/SIGUSR1 after writing a checkpoint (rerun the same command to resume);
130 Ctrl-C (training writes a checkpoint first; a second Ctrl-C stops at once). See
:mod:`invnet.training.signals`. Errors are one line on stderr, ``invnet COMMAND: error: ...``;
warnings ``invnet COMMAND: warning: ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any, Callable, Optional, Sequence, TextIO, Union

__all__ = ["main"]

#: an input/output error other than a missing or misnamed path (EX_IOERR of sysexits.h)
EXIT_IO = 74


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .training.signals import PreemptionFlag, exit_code_for_signal

    with PreemptionFlag(raise_on_signal=True):  # a signal outside training stops at once (training checkpoints first)
        report = run_demo(out_dir=args.out, steps=args.steps, seed=args.seed, size=args.size, threads=args.threads,
                          device=_device_option(args.device), precision=args.precision)
    return 0 if report.get("status") == "finished" else exit_code_for_signal(report.get("signal") or "")


def _train(args: argparse.Namespace) -> int:
    from .distributed import default_comm
    from .training import EXIT_OK, load_config, train_from_config
    from .training.signals import exit_code_for_signal

    cfg = load_config(args.config)
    if args.device is not None:
        cfg["training"]["device"] = _device_option(args.device)
    comm = default_comm(cfg["distributed"]["backend"])  # MPI under `mpiexec ... -m invnet train`, serial otherwise
    result = train_from_config(cfg, comm=comm, resume=not args.restart, config_path=args.config)
    if comm.rank == 0:
        print(f"{result.status} at step {result.step}; checkpoint: {result.checkpoint}; metrics: {result.metrics_path}",
              flush=True)
    comm.barrier()  # a non-zero exit ends an MPI job by MPI_Abort: no rank may end it before rank 0 has spoken
    return EXIT_OK if result.status == "finished" else exit_code_for_signal(result.signal or "")


def _device_option(name: str) -> str:
    """Check a ``--device`` value (before anything is read).

    >>> _device_option("cuda:0")
    'cuda:0'
    """
    from .training.device import check_device_name

    complaint = check_device_name(name)
    if complaint:
        raise ValueError(f"--device must be {complaint}, got {name!r}")
    return name


def _parse_indices(text: Optional[str]) -> Optional[Sequence[int]]:
    """``'a:b'`` or ``'i,j,k'`` as row indices.

    >>> list(_parse_indices("2:5")), _parse_indices("1, 4")
    ([2, 3, 4], [1, 4])
    """
    if text is None:
        return None
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            return range(int(a or 0), int(b))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--indices must be 'a:b' or 'i,j,k' with integers, got {text!r}") from None


def _sample(args: argparse.Namespace) -> int:
    from .distributed import default_comm
    from .inference import report_path, sample_job
    from .inference.temperature import parse_temperature
    from .training.signals import PreemptionFlag

    device = _device_option(args.device)
    temperature = parse_temperature(args.temperature)
    comm = default_comm()  # MPI under `mpiexec ... -m invnet sample`: the run's grid, each rank its own chunks
    if temperature is None and not args.calibration_data:
        raise ValueError("--temperature auto needs --calibration-data: held-out pairs (truth --x and observation "
                         "--y) that are neither training pairs nor the --data to be sampled")
    if temperature is None and comm.size > 1:
        raise ValueError("--temperature auto runs in one process: choose the temperature with a serial "
                         "`invnet sample`, then pass the number to the parallel job")
    checkpoint = _chosen_checkpoint(args, comm.rank == 0)
    notes = None
    if temperature is None:
        fit = _fit_temperature(checkpoint, args, device)
        temperature = fit.temperature
        notes = {"temperature_fit": dict(fit.as_dict(), data=os.path.abspath(args.calibration_data))}
        print(f"temperature {fit.temperature:.4f}: held-out ratio {fit.ratio:.4f} (target {fit.target:.4f}; "
              f"{fit.ratio_at_1:.4f} at T = 1) on {fit.n_observations} pairs of {args.calibration_data}")
    with PreemptionFlag(raise_on_signal=True):  # SIGTERM/SIGUSR1/Ctrl-C: stop now, the partial store is removed
        report = sample_job(checkpoint, args.data, args.out, n_samples=args.n, batch_size=args.batch_size,
                            temperature=temperature, notes=notes, keep=args.keep, indices=_parse_indices(args.indices),
                            x_name=args.x, y_name=args.y, plots=args.plots, seed=args.seed, overwrite=args.overwrite,
                            progress=not args.no_progress, comm=comm, grid=args.grid, device=device)
    if comm.rank != 0:
        return 0
    print(f"posterior mean, std and samples: {args.out}")
    if report:
        cov = report["coverage"]
        covered = ", ".join(
            f"{float(level):.0%} interval covers {entry['empirical']:.3f}"
            for level, entry in cov.items()
            if level in ("0.5", "0.9", "0.95")
        )
        ratio = report["ratio_sample_to_mean_sq_error"]
        print(f"calibration ({report['observations']} observations): {covered}; "
              f"ratio E|s-x|^2/E|mean-x|^2 = {ratio:.3f} (2 if calibrated)")
        print(f"report: {report_path(args.out)}")
    if args.plots:
        print(f"plots: {args.plots}")
    return 0


def _fit_temperature(checkpoint: str, args: argparse.Namespace, device: Optional[str]) -> Any:
    """``--temperature auto``: the temperature whose spread-to-error ratio on the pairs of
    ``--calibration-data`` is a calibrated posterior's (:mod:`invnet.inference.temperature`)."""
    import numpy as np
    import torch

    from .data.arrays import open_array
    from .inference import PosteriorSampler
    from .inference.temperature import calibrate_temperature

    xs, ys = (open_array(args.calibration_data, name) for name in (args.x, args.y))
    if xs.shape[0] != ys.shape[0]:
        raise ValueError(f"{args.calibration_data}: {args.x} and {args.y} hold different numbers of pairs "
                         f"({xs.shape[0]} vs {ys.shape[0]})")
    x = torch.from_numpy(np.asarray(xs.read(tuple(slice(None) for _ in xs.shape))))
    y = torch.from_numpy(np.asarray(ys.read(tuple(slice(None) for _ in ys.shape))))
    sampler = PosteriorSampler.from_checkpoint(checkpoint, device)
    return calibrate_temperature(sampler, list(x), list(y), n_samples=args.calibration_n,
                                 batch_size=min(args.batch_size, args.calibration_n), seed=args.seed)


def _chosen_checkpoint(args: argparse.Namespace, say: bool) -> str:
    """The checkpoint ``--checkpoint`` picks in the run folder (best by default); ``say``: print
    which (on stdout; on stderr for ``info``, whose stdout is JSON)."""
    from .training.checkpoint_choice import choose_checkpoint

    path, note = choose_checkpoint(args.checkpoint, args.which)
    if say:
        print(f"using the {note}: {path}" if not note.startswith("checkpoint ") else f"using {note}",
              file=sys.stderr if args.command == "info" else sys.stdout, flush=True)
    return path


def _info(args: argparse.Namespace) -> int:
    from .training.checkpoint import read_checkpoint

    ckpt = read_checkpoint(_chosen_checkpoint(args, True))
    n_params = sum(int(t.numel()) for t in ckpt.weights.values() if t.is_floating_point())
    info = {"checkpoint": ckpt.path, "step": ckpt.step, "saved_at": ckpt.meta.get("saved_at"),
            "network": ckpt.meta.get("spec"), "parameters_and_buffers": n_params, "data": ckpt.meta.get("data"),
            "normalization": ckpt.meta.get("normalization"), "run": ckpt.meta.get("run"),
            "loss_name": ckpt.meta.get("loss_name", "bpd"),
            "last_train_loss": ckpt.meta.get("last_train_loss", ckpt.meta.get("last_train_bpd")),
            "last_val_loss": ckpt.meta.get("last_val_loss", ckpt.meta.get("last_val_bpd")),
            "best": ckpt.meta.get("best"),
            "data_position": ckpt.state.get("loader")}
    print(json.dumps(info, indent=1))
    return 0


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except an unset one (None) or an off switch (False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def _checkpoint_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", dest="which", default=None, metavar="best|last|step-N",
                        help="which checkpoint of the run folder: best (lowest validation loss; the default, or the "
                             "last when the run had no validation), last, or step-N")


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    fmt = _HelpWithDefaults
    parser = argparse.ArgumentParser(
        prog="invnet", description="Memory-efficient invertible networks: train conditional flows, sample posteriors.",
        epilog="exit codes: 0 ok, 2 bad input (nothing written), 65 non-finite loss, 70 reconstruction drift, "
               "74 I/O error, "
               "75 preempted (rerun to resume), 130 Ctrl-C", formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"invnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", formatter_class=fmt,
                          help="train a conditional flow on a built-in posterior problem; plots, Zarr, report",
                          description="Simulate a deblurring problem, train a conditional flow, sample held-out "
                                      "posteriors and report calibration. The default size takes about two minutes on "
                                      "2 idle CPU cores.")
    demo.add_argument("--out", default="invnet_demo_output", help="output folder (created; the demo's own)")
    demo.add_argument("--size", choices=["tiny", "small", "large"], default="small",
                      help="tiny: seconds (tests); small: about a minute; large: a deeper flow, ~2.5x longer")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the size's own)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data, weights and samples")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads (the demo's tensors are small; on a busy machine more threads wait "
                           "for each other and the demo takes many times longer)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    demo.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                      help="arithmetic of training and sampling (bfloat16/float16: autocast for the conditioners)")
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", formatter_class=fmt,
                           help="train a conditional flow from a TOML config (docs/config.md)",
                           description="Train, or resume the run in out_dir (rerun the same command after a stop).")
    train.add_argument("config", help="TOML configuration (docs/config.md)")
    train.add_argument("--device", default=None,
                       help="auto, cpu, cuda (each MPI rank: the GPU of its node-local rank) or cuda:N; "
                            "overrides [training] device")
    train.add_argument("--restart", action="store_true",
                       help="start over: a previous run in out_dir is moved aside to OUT_DIR.previous-DATE-TIME")
    train.set_defaults(func=_train)

    sample = sub.add_parser("sample", formatter_class=fmt,
                            help="posterior samples, mean and std for observations, into Zarr",
                            description="Posterior mean, std and samples per observation into a new Zarr store "
                                        "(layout: docs/config.md); calibration when the file holds the truth.")
    sample.add_argument("checkpoint",
                        help="a run folder (its checkpoint chosen by --checkpoint) or one checkpoint folder")
    _checkpoint_option(sample)
    sample.add_argument("--data", required=True, help="HDF5 file or Zarr store with the observations")
    sample.add_argument("--out", required=True, help="Zarr store to create (e.g. results.zarr)")
    sample.add_argument("--n", type=int, default=100, help="samples per observation")
    sample.add_argument("--batch-size", type=int, default=50, help="samples drawn at once")
    sample.add_argument("--temperature", default="1.0",
                        help="latent scale (1: the learned posterior), or auto: chosen on --calibration-data so that "
                             "the samples' spread matches their error there (docs/config.md)")
    sample.add_argument("--calibration-data", default=None,
                        help="held-out pairs (HDF5/Zarr with --x and --y) for --temperature auto")
    sample.add_argument("--calibration-n", type=int, default=32, help="samples per pair for --temperature auto")
    sample.add_argument("--keep", type=int, default=4, help="samples stored per observation")
    sample.add_argument("--indices", default=None, help="rows to use: 'a:b' or 'i,j,k' (default: all)")
    sample.add_argument("--y", default="y", help="observation array name")
    sample.add_argument("--x", default="x", help="truth array name (calibration when present)")
    sample.add_argument("--plots", default=None, help="folder for figures")
    sample.add_argument("--seed", type=int, default=0, help="seed of the latent draws")
    sample.add_argument("--device", default="auto",
                        help="auto, cpu, cuda (each MPI rank: the GPU of its node-local rank) or cuda:N")
    sample.add_argument("--grid", type=int, nargs="+", default=None, metavar="N",
                        help="parallel grid under mpiexec: observation groups, then ranks per space axis (default: "
                             "the run's split of space, the other ranks as groups)")
    sample.add_argument("--overwrite", action="store_true",
                        help="replace --out if it is a store invnet sample wrote (never anything else)")
    sample.add_argument("--no-progress", action="store_true", help="no progress bar")
    sample.set_defaults(func=_sample)

    info = sub.add_parser("info", formatter_class=fmt, help="describe a checkpoint")
    info.add_argument("checkpoint",
                      help="a run folder (its checkpoint chosen by --checkpoint) or one checkpoint folder")
    _checkpoint_option(info)
    info.set_defaults(func=_info)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run the ``invnet`` command; returns the exit code (see the module docstring)."""
    from .core import ReconstructionDriftError
    from .training.signals import (
        EXIT_DRIFT,
        EXIT_INTERRUPTED,
        EXIT_NONFINITE,
        EXIT_USAGE,
        NonFiniteLossError,
        PreemptedError,
        exit_code_for_signal,
    )

    args = _build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    name = f"invnet {args.command}"

    def one_line_warning(message: Union[Warning, str], category: type[Warning], filename: str, lineno: int,
                         file: Optional[TextIO] = None, line: Optional[str] = None) -> None:
        print(f"{name}: warning: {message}", file=sys.stderr)

    previous = warnings.showwarning
    warnings.showwarning = one_line_warning
    try:
        if argv is None and args.command in ("train", "sample"):
            # jemalloc where installed: glibc re-faults a large step's memory at every step (the
            # module says why); from the command line only, never when called as a function
            from .host_allocator import relaunch_under_jemalloc

            relaunch_under_jemalloc()
        return func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except ReconstructionDriftError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return EXIT_DRIFT
    except OSError as err:
        print(f"{name}: error: {err} (files are written atomically: nothing was left half-written)", file=sys.stderr)
        return EXIT_IO
    except PreemptedError as err:  # a signal where nothing can be saved (sample; the demo outside training)
        print(f"{name}: stopped by {err.signal}; nothing was left half-written (rerun the same command)",
              file=sys.stderr)
        return exit_code_for_signal(err.signal)
    except KeyboardInterrupt:
        resume = " (a rerun resumes from the last checkpoint)" if args.command == "train" else ""
        print(f"{name}: interrupted (Ctrl-C) at once; every file is written atomically, so nothing is "
              f"half-written{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        warnings.showwarning = previous
        # under `python -m mpi4py` a non-zero exit ends the job through MPI_Abort, which does not
        # flush Python's buffers: the last lines must be out before
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
