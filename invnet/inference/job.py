"""The sampling job: posterior statistics of many observations, written chunk by chunk to Zarr.

Nothing is half-written: every argument and every chosen observation is checked before anything
is created; the store is assembled under a hidden temporary name next to ``out`` and renamed into
place when complete (:func:`invnet.data.atomic.atomic_dir`); the report and the figures follow it.
``overwrite`` replaces only a store this job wrote (recognised by its ``written_by`` attribute),
never anything else.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Optional, Sequence

import numpy as np
import torch

from ..data import ZarrResultWriter, chunk_aligned_range, open_array
from ..data.atomic import atomic_dir, atomic_file, check_creatable
from ..training.comm import Comm, SerialComm
from .calibration import Calibration
from .diagnostics import PosteriorDiagnostics
from .sampler import PosteriorSampler, summarize_posterior

__all__ = ["sample_job", "report_path", "is_sample_store", "STORE_MARK"]

#: the attribute by which a store written by :func:`sample_job` is recognised
STORE_MARK = {"written_by": "invnet sample", "format": 1}
_ARRAYS = ("mean", "std", "samples", "index")


def report_path(out: str) -> str:
    """Where the calibration report of the store ``out`` goes: ``results.zarr -> results_report.json``.

    >>> report_path("runs/results.zarr")
    'runs/results_report.json'
    """
    return os.path.splitext(out.rstrip("/"))[0] + "_report.json"


def is_sample_store(path: str) -> bool:
    """Whether ``path`` is a Zarr store written by :func:`sample_job` (its ``written_by``
    attribute; a store of an earlier invnet is known by its four arrays and attributes).

    >>> import tempfile
    >>> is_sample_store(tempfile.mkdtemp())
    False
    """
    if not os.path.isdir(path):
        return False
    try:
        import zarr

        group = zarr.open_group(path, mode="r")
        attrs = dict(group.attrs)
        arrays = set(group.array_keys())
    except Exception:  # not a Zarr group at all
        return False
    if attrs.get("written_by") == STORE_MARK["written_by"]:
        return True
    return set(_ARRAYS) <= arrays and {"checkpoint", "n_samples", "temperature"} <= set(attrs)


def _is_report(path: str) -> bool:
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and "coverage" in report and "observations" in report


def _check_arguments(n_samples: int, batch_size: int, temperature: float, keep: int, n_plots: int) -> None:
    if n_samples < 2:
        raise ValueError(f"--n (samples per observation) must be at least 2, got {n_samples}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature must be a positive number (1 samples the learned posterior), got {temperature}")
    if keep < 0 or keep > n_samples:
        raise ValueError(f"--keep must lie in [0, --n={n_samples}], got {keep}")
    if n_plots < 0:
        raise ValueError(f"n_plots must be non-negative, got {n_plots}")


def _check_outputs(out: str, plots: Optional[str], figures: list[str], overwrite: bool) -> None:
    """Refuse, before anything is written, outputs that exist and may not be replaced."""
    if not str(out).strip():
        raise ValueError("--out must name a Zarr store to create, e.g. results.zarr")
    if os.path.lexists(out):
        if not overwrite:
            raise ValueError(f"{out!r} already exists; choose another --out, or pass --overwrite to replace a store "
                             "that invnet sample wrote")
        if not is_sample_store(out):
            kind = "a folder" if os.path.isdir(out) else "a file"
            raise ValueError(f"--overwrite replaces only a store written by invnet sample, and {out!r} is {kind} that "
                             "is not one; nothing was changed. Choose another --out")
    report = report_path(out)
    if os.path.lexists(report) and not overwrite:
        raise ValueError(f"{report!r} (where the calibration report goes) already exists; choose another --out, or "
                         "pass --overwrite to replace an earlier report")
    if os.path.lexists(report) and not _is_report(report):
        raise ValueError(f"{report!r} (where the calibration report goes) is not a report invnet sample wrote; "
                         "--overwrite does not replace it. Choose another --out")
    if plots:
        if os.path.lexists(plots) and not os.path.isdir(plots):
            raise ValueError(f"--plots {plots!r} exists and is not a folder")
        taken = [f for f in figures if os.path.lexists(os.path.join(plots, f))]
        if taken and not overwrite:
            raise ValueError(f"--plots {plots!r} already holds {taken[:3]}{' ...' if len(taken) > 3 else ''}; "
                             "choose another folder or pass --overwrite")
    check_creatable(out, "--out")


def _check_observations(ys, xs, rows: np.ndarray) -> None:
    """Every chosen observation (and truth) must be finite: name the first row that is not."""
    for i in rows:
        for src in (ys, xs):
            if src is not None and not np.isfinite(src.read((slice(int(i), int(i) + 1),))).all():
                raise ValueError(f"{src.name} holds NaN or Inf in row {int(i)}; drop it (--indices) or clean the data")


def _agree_on_errors(comm: Comm, check) -> None:
    """Run ``check`` on every rank; if it fails on any, every rank raises (none waits for the others
    in a collective that never comes)."""
    problem = None
    try:
        check()
    except ValueError as err:
        problem = err
    if comm.size > 1:
        failed = float(comm.allreduce(torch.tensor([0.0 if problem is None else 1.0], dtype=torch.float64))[0])
        if failed > 0 and problem is None:
            problem = ValueError("another rank found a bad observation (its message says which); nothing was written")
    if problem is not None:
        raise problem


def _read(src, i: int) -> torch.Tensor:
    return torch.from_numpy(src.read((slice(i, i + 1),))[0].astype(np.float64))


def sample_job(
    checkpoint: str, data: str, out: str, n_samples: int = 100, batch_size: int = 50, temperature: float = 1.0,
    keep: int = 4, indices: Optional[Sequence[int]] = None, x_name: Optional[str] = "x", y_name: str = "y",
    plots: Optional[str] = None, n_plots: int = 3, seed: int = 0, comm: Optional[Comm] = None,
    overwrite: bool = False, progress: bool = False,
) -> dict:
    r"""Draw ``n_samples`` posterior samples for each observation ``y[i]`` (``i`` in ``indices``,
    all by default) of the HDF5/Zarr file ``data`` and write, per observation, the posterior
    ``mean``, ``std`` and the first ``keep`` ``samples`` to the Zarr store ``out`` (one chunk per
    observation; ``index`` holds the source rows; layout in docs/config.md). When the file also
    holds the truth ``x_name``, calibration (see :class:`~invnet.inference.Calibration`) is
    measured, stored in the store's attributes and in :func:`report_path` next to it, and
    ``plots`` (a folder) gets figures. ``progress`` shows a bar over the observations.

    Everything is checked first (arguments, outputs, the checkpoint, every chosen observation);
    then the store is written under a temporary name and renamed to ``out`` when complete, so an
    error or an interruption leaves no partial output. ``overwrite`` replaces an existing store
    only if this job wrote it (:func:`is_sample_store`), with its report and figures.

    Distributed hook: rank ``r`` of ``comm`` handles the chunk-aligned block of observations
    :func:`~invnet.data.chunk_aligned_range` gives it; rank 0 creates the store and renames it.
    Calibration is summed over the ranks (every rank returns the report of all observations;
    rank 0 writes it; the error-vs-std figure shows rank 0's observations). Returns the
    calibration report (or ``{}``).
    """
    comm = comm or SerialComm()
    _check_arguments(n_samples, batch_size, temperature, keep, n_plots)
    ys = open_array(data, y_name)
    xs = None
    if x_name:
        try:
            xs = open_array(data, x_name)
        except ValueError:
            xs = None  # observations without truth: no calibration
    rows = np.arange(ys.shape[0]) if indices is None else np.asarray(list(indices), dtype=np.int64)
    if rows.size == 0 or rows.min() < 0 or rows.max() >= ys.shape[0]:
        raise ValueError(f"indices must lie in [0, {ys.shape[0]}) and not be empty")
    if xs is not None and xs.shape[0] != ys.shape[0]:
        raise ValueError(f"{xs.name} and {ys.name} hold different numbers of samples ({xs.shape[0]} vs {ys.shape[0]})")
    m = len(rows)
    blocks = [chunk_aligned_range(m, 1, r, comm.size) for r in range(comm.size)]
    plotted = [int(rows[k]) for lo, hi in blocks for k in range(lo, min(hi, lo + n_plots))] if plots else []
    figures = [f"posterior_{i:05d}.png" for i in plotted]
    if plots and xs is not None:
        figures += ["error_vs_std.png", "coverage.png", "sbc_ranks.png", "tarp.png"]
    _check_outputs(out, plots, figures, overwrite)
    sampler = PosteriorSampler.from_checkpoint(checkpoint)
    x_shape = tuple(sampler.sample(2, _read(ys, int(rows[0]))).shape[1:])  # the observation fits the network
    if xs is not None and tuple(xs.shape[1:]) != x_shape:
        raise ValueError(f"{xs.name} has samples of shape {tuple(xs.shape[1:])}, the network draws {x_shape}")
    lo, hi = blocks[comm.rank]
    _agree_on_errors(comm, lambda: _check_observations(ys, xs, rows[lo:hi]))  # each rank reads its own block
    # ---- everything checked: write
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    attrs = dict(STORE_MARK, checkpoint=os.path.abspath(checkpoint), data=os.path.abspath(data), y=y_name,
                 n_samples=n_samples, temperature=temperature, seed=seed)
    cal = Calibration() if xs is not None else None
    diag = PosteriorDiagnostics.for_sampler(sampler, x_shape, seed=seed) if xs is not None else None  # SBC, TARP
    shown: list[tuple] = []  # what the figures need, for the first n_plots observations of this rank
    builder = atomic_dir(out, replace=overwrite) if comm.rank == 0 else contextlib.nullcontext(None)
    with builder as tmp:
        tmp = comm.bcast(tmp)  # rank 0's temporary store
        if comm.rank == 0:
            ZarrResultWriter.create(tmp, {
                "mean": ((m,) + x_shape, (1,) + x_shape, "f4"),
                "std": ((m,) + x_shape, (1,) + x_shape, "f4"),
                "samples": ((m, keep) + x_shape, (1, max(keep, 1)) + x_shape, "f4"),
                "index": ((m,), (1,), "i8"),
            }, attrs=attrs, overwrite=True)
        comm.barrier()
        writer = ZarrResultWriter.open(tmp)
        gen = torch.Generator().manual_seed(seed * 1000003 + comm.rank)
        from tqdm import tqdm

        for k in tqdm(range(lo, hi), desc="sample", unit="obs", dynamic_ncols=True,
                      disable=not (progress and comm.rank == 0)):
            i = int(rows[k])
            y = _read(ys, i)
            truth = None if xs is None else _read(xs, i)
            watched = sampler if diag is None else diag.watch(sampler, truth)
            s = summarize_posterior(watched, y, n_samples, batch_size, temperature, keep, truth, gen)
            writer.write("mean", k, s.mean[None].numpy())
            writer.write("std", k, s.std[None].numpy())
            writer.write("samples", k, s.samples[None].numpy())
            writer.write("index", k, np.array([i]))
            if cal is not None:
                cal.add(s, truth)
                diag.add(s)
            if plots and k - lo < n_plots:
                shown.append((i, truth, y, s))
        if cal is not None and comm.size > 1:
            cal.sum_over_ranks(comm)  # the report covers every rank's observations
            diag.sum_over_ranks(comm, lo, m)
        report = {**cal.report(), **diag.report()} if cal is not None else {}
        comm.barrier()  # every rank's part is in before rank 0 renames the store into place
        if comm.rank == 0 and report:
            writer.group.attrs["calibration"] = report
    if comm.rank == 0 and report:
        with atomic_file(report_path(out)) as f:
            json.dump(report, f, indent=1)
    if plots:
        _draw(plots, shown, cal if comm.rank == 0 else None, report, n_samples, temperature)
    return report


def _draw(plots: str, shown: list[tuple], cal: Optional[Calibration], report: dict, n_samples: int,
          temperature: float) -> None:
    from ..plotting import plot_coverage, plot_error_vs_std, plot_posterior, plot_rank_histograms, plot_tarp

    os.makedirs(plots, exist_ok=True)
    for i, truth, y, s in shown:
        plot_posterior(os.path.join(plots, f"posterior_{i:05d}.png"), truth, y, s.mean, s.std, s.samples,
                       f"observation {i}: {n_samples} samples, T={temperature}")
    if cal is not None and report:
        plot_error_vs_std(os.path.join(plots, "error_vs_std.png"), cal)
        plot_coverage(os.path.join(plots, "coverage.png"), report)
        plot_rank_histograms(os.path.join(plots, "sbc_ranks.png"), report["sbc"])
        plot_tarp(os.path.join(plots, "tarp.png"), report["tarp"])
