"""The sampling job: posterior statistics of many observations, written chunk by chunk to Zarr."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np
import torch

from ..data import ZarrResultWriter, chunk_aligned_range, open_array
from ..plotting import plot_coverage, plot_error_vs_std, plot_posterior, plot_rank_histograms, plot_tarp
from ..training.comm import Comm, SerialComm
from .calibration import Calibration
from .diagnostics import PosteriorDiagnostics
from .sampler import PosteriorSampler, summarize_posterior

__all__ = ["sample_job", "report_path"]


def report_path(out: str) -> str:
    """Where the calibration report of the store ``out`` goes: ``results.zarr -> results_report.json``.

    >>> report_path("runs/results.zarr")
    'runs/results_report.json'
    """
    return os.path.splitext(out.rstrip("/"))[0] + "_report.json"


def sample_job(
    checkpoint: str, data: str, out: str, n_samples: int = 100, batch_size: int = 50, temperature: float = 1.0,
    keep: int = 4, indices: Optional[Sequence[int]] = None, x_name: Optional[str] = "x", y_name: str = "y",
    plots: Optional[str] = None, n_plots: int = 3, seed: int = 0, comm: Optional[Comm] = None,
    overwrite: bool = False,
) -> dict:
    r"""Draw ``n_samples`` posterior samples for each observation ``y[i]`` (``i`` in ``indices``,
    all by default) of the HDF5/Zarr file ``data`` and write, per observation, the posterior
    ``mean``, ``std`` and the first ``keep`` ``samples`` to the Zarr store ``out`` (one chunk per
    observation; ``index`` holds the source rows). When the file also holds the truth ``x_name``,
    calibration (see :class:`~invnet.inference.Calibration`) is measured, stored in the store's
    attributes and in :func:`report_path` next to it, and ``plots`` (a folder) gets figures.

    Distributed hook: rank ``r`` of ``comm`` handles the chunk-aligned block of observations
    :func:`~invnet.data.chunk_aligned_range` gives it; rank 0 creates the store. (Calibration is
    then per rank; the MPI helper reduces it.) Returns the calibration report (or ``{}``).
    """
    comm = comm or SerialComm()
    if n_samples < 2:
        raise ValueError(f"--n must be at least 2, got {n_samples}")
    if keep < 0 or keep > n_samples:
        raise ValueError(f"keep must lie in [0, n={n_samples}], got {keep}")
    sampler = PosteriorSampler.from_checkpoint(checkpoint)
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
    y0 = torch.from_numpy(ys.read((slice(int(rows[0]), int(rows[0]) + 1),))[0].astype(np.float64))
    x_shape = tuple(sampler.sample(2, y0).shape[1:])
    m = len(rows)
    if comm.rank == 0:
        if os.path.exists(out) and overwrite:
            import shutil

            shutil.rmtree(out)
        ZarrResultWriter.create(out, {
            "mean": ((m,) + x_shape, (1,) + x_shape, "f4"),
            "std": ((m,) + x_shape, (1,) + x_shape, "f4"),
            "samples": ((m, keep) + x_shape, (1, max(keep, 1)) + x_shape, "f4"),
            "index": ((m,), (1,), "i8"),
        }, attrs={"checkpoint": os.path.abspath(checkpoint), "data": os.path.abspath(data), "y": y_name,
                  "n_samples": n_samples, "temperature": temperature, "seed": seed})
    comm.barrier()
    writer = ZarrResultWriter.open(out)
    lo, hi = chunk_aligned_range(m, 1, comm.rank, comm.size)
    gen = torch.Generator().manual_seed(seed * 1000003 + comm.rank)
    cal = Calibration() if xs is not None else None
    diag = PosteriorDiagnostics.for_sampler(sampler, x_shape, seed=seed) if xs is not None else None  # SBC, TARP
    if plots and comm.rank == 0:
        os.makedirs(plots, exist_ok=True)
    for k in range(lo, hi):
        i = int(rows[k])
        y = torch.from_numpy(ys.read((slice(i, i + 1),))[0].astype(np.float64))
        truth = None if xs is None else torch.from_numpy(xs.read((slice(i, i + 1),))[0].astype(np.float64))
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
            plot_posterior(os.path.join(plots, f"posterior_{i:05d}.png"), truth, y, s.mean, s.std, s.samples,
                           f"observation {i}: {n_samples} samples, T={temperature}")
    report: dict = {}
    if cal is not None:
        report = {**cal.report(), **diag.report()}
        if comm.rank == 0 and comm.size == 1:
            writer.group.attrs["calibration"] = report
            with open(report_path(out), "w") as f:
                json.dump(report, f, indent=1)
            if plots:
                plot_error_vs_std(os.path.join(plots, "error_vs_std.png"), cal)
                plot_coverage(os.path.join(plots, "coverage.png"), report)
                plot_rank_histograms(os.path.join(plots, "sbc_ranks.png"), report["sbc"])
                plot_tarp(os.path.join(plots, "tarp.png"), report["tarp"])
    return report
