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
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from ..data import ArraySource, ZarrResultWriter, chunk_aligned_range, open_array
from ..data.atomic import atomic_dir, atomic_file, check_creatable, remove_leftovers
from ..distributed.comm import Communicator, SerialComm, agree_on_errors
from ..distributed.strategy import ParallelStrategy
from .calibration import Calibration
from .diagnostics import PosteriorDiagnostics
from .noise import TILE, TiledNoise
from .sampler import PosteriorSampler, summarize_posterior

if TYPE_CHECKING:  # zarr is imported where the store is read
    import zarr

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


# The checks below name the keyword argument of sample_job and, in parentheses, the flag of
# `invnet sample` that sets it: the same message serves a caller of the function and a user of the
# command.
def _check_arguments(n_samples: int, batch_size: int, temperature: float, keep: int, n_plots: int) -> None:
    if n_samples < 2:
        raise ValueError(f"n_samples (--n, samples per observation) must be at least 2, got {n_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size (--batch-size) must be a positive integer, got {batch_size}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature (--temperature) must be a positive number (1 samples the learned "
                         f"posterior), got {temperature}")
    if keep < 0 or keep > n_samples:
        raise ValueError(f"keep (--keep) must lie in [0, n_samples={n_samples}], got {keep}")
    if n_plots < 0:
        raise ValueError(f"n_plots must be non-negative, got {n_plots}")


def _check_outputs(out: str, plots: Optional[str], figures: list[str], overwrite: bool) -> None:
    """Refuse, before anything is written, outputs that exist and may not be replaced."""
    if not str(out).strip():
        raise ValueError("out (--out) must name a Zarr store to create, e.g. results.zarr")
    if os.path.lexists(out):
        if not overwrite:
            raise ValueError(f"{out!r} already exists; choose another out (--out), or pass overwrite (--overwrite) "
                             "to replace a store that invnet sample wrote")
        if not is_sample_store(out):
            kind = "a folder" if os.path.isdir(out) else "a file"
            raise ValueError(f"overwrite (--overwrite) replaces only a store written by invnet sample, and {out!r} "
                             f"is {kind} that is not one; nothing was changed. Choose another out (--out)")
    report = report_path(out)
    if os.path.lexists(report) and not overwrite:
        raise ValueError(f"{report!r} (where the calibration report goes) already exists; choose another out "
                         "(--out), or pass overwrite (--overwrite) to replace an earlier report")
    if os.path.lexists(report) and not _is_report(report):
        raise ValueError(f"{report!r} (where the calibration report goes) is not a report invnet sample wrote; "
                         "overwrite (--overwrite) does not replace it. Choose another out (--out)")
    if plots:
        if os.path.lexists(plots) and not os.path.isdir(plots):
            raise ValueError(f"plots (--plots) {plots!r} exists and is not a folder")
        taken = [f for f in figures if os.path.lexists(os.path.join(plots, f))]
        if taken and not overwrite:
            raise ValueError(f"plots (--plots) {plots!r} already holds {taken[:3]}{' ...' if len(taken) > 3 else ''}; "
                             "choose another folder or pass overwrite (--overwrite)")
    check_creatable(out, "out (--out)")


class _Rows:
    """What this rank reads of one row of the observations and truths: its subdomain of arrays on
    the grid of ``x`` when space is split, whole rows otherwise (vectors: replicated)."""

    def __init__(self, strategy: ParallelStrategy, x_space: tuple[int, ...]) -> None:
        self.x_space = x_space
        self.region = strategy.shard().region(x_space) if strategy.decomposed else None

    def of(self, src: ArraySource) -> tuple:
        if self.region is not None and tuple(src.shape[2:]) == self.x_space:
            return self.region
        return ()

    def read(self, src: ArraySource, i: int) -> torch.Tensor:
        block = src.read((slice(i, i + 1), slice(None)) + self.of(src))[0]
        return torch.from_numpy(np.ascontiguousarray(block).astype(np.float64))


def _check_observations(ys: ArraySource, xs: Optional[ArraySource], rows: np.ndarray, reader: _Rows) -> None:
    """Every chosen observation (and truth) must be finite: name the first row that is not."""
    for i in rows:
        for src in (ys, xs):
            if src is not None and not bool(torch.isfinite(reader.read(src, int(i))).all()):
                raise ValueError(
                    f"{src.name} holds NaN or Inf in row {int(i)}; drop it (indices, --indices) or clean the data"
                )


def _sampling_strategy(
    ckpt_meta: dict, ys: ArraySource, comm: Communicator, grid: Optional[Sequence[int]]
) -> ParallelStrategy:
    """The grid of a sampling job: ``grid`` when given, else the run's split of space with the
    rest of the ranks as observation groups when the job's ranks are a multiple of it (else no
    split: every rank samples whole volumes of its observations); on the grid the unknown is
    drawn on (the observation's, for a fully convolutional network; the training data's otherwise)."""
    data = ckpt_meta.get("data") or {}
    spec = ckpt_meta.get("spec") or {}
    x_shape = tuple(data.get("x_shape") or ())
    on_grid = len(ys.shape) > 2 and len(x_shape) == len(ys.shape) - 1 and spec.get("summary") is None
    space = tuple(ys.shape[2:]) if on_grid else x_shape[1:]
    if grid is None:
        run_grid = (ckpt_meta.get("run") or {}).get("grid") or []
        split = tuple(run_grid[1:]) if len(run_grid) == len(space) + 1 else (1,) * len(space)
        if comm.size % math.prod(split):  # e.g. a run trained on a split volume, sampled serially
            split = (1,) * len(space)
        grid = (comm.size // math.prod(split),) + split
    try:
        strategy = ParallelStrategy(space, grid, comm)
    except ValueError as err:
        raise ValueError(f"grid (--grid): {err}") from None
    strategy.check_data((x_shape[0] if x_shape else 1,) + space, ys.shape[1:])
    return strategy


def sample_job(
    checkpoint: str, data: str, out: str, n_samples: int = 100, batch_size: int = 50, temperature: float = 1.0,
    keep: int = 4, indices: Optional[Sequence[int]] = None, x_name: Optional[str] = "x", y_name: str = "y",
    plots: Optional[str] = None, n_plots: int = 3, seed: int = 0, comm: Optional[Communicator] = None,
    overwrite: bool = False, progress: bool = False, grid: Optional[Sequence[int]] = None,
    device: Optional[str] = None, notes: Optional[dict] = None,
) -> dict:
    r"""Draw ``n_samples`` posterior samples for each observation ``y[i]`` (``i`` in ``indices``,
    all by default) of the HDF5/Zarr file ``data`` and write, per observation, the posterior
    ``mean``, ``std`` and the first ``keep`` ``samples`` to the Zarr store ``out`` (``index``
    holds the source rows; layout in docs/config.md). When the file also holds the truth
    ``x_name``, calibration (see :class:`~invnet.inference.Calibration`) is measured, stored in
    the store's attributes and in :func:`report_path` next to it, and ``plots`` (a folder) gets
    figures. ``progress`` shows a bar over the observations. ``device``: ``"auto"``, ``"cpu"``
    (default), ``"cuda"`` (each rank the GPU of its node-local rank) or ``"cuda:N"``; the
    arithmetic is the run's precision.

    Everything is checked first (arguments, outputs, the grid, the checkpoint, every chosen
    observation); then the store is written under a temporary name and renamed to ``out`` when
    complete, so an error or an interruption leaves no partial output. ``overwrite`` replaces an
    existing store only if this job wrote it (:func:`is_sample_store`), with its report and figures.

    Parallel jobs (``comm`` over several ranks) run on a grid ``(groups, p_1, ..., p_d)``
    (``grid``; default: the run's split of space, the other ranks as groups): observation group
    ``g`` samples the chunk-aligned block of observations :func:`~invnet.data.chunk_aligned_range`
    gives it, and each volume is split over the ``p`` ranks of the group (the network decomposed
    as in training): each rank reads only its subdomain of the observation and the truth, and
    writes its own chunks (the arrays are chunked by subdomain). The latents come from
    :class:`~invnet.inference.noise.TiledNoise` seeded by ``(seed, row, sample, tile)``, so the
    store is the same whatever the grid, serial included. Rank 0 creates the temporary store and
    renames it after every rank's part is in; a bad observation found by one rank stops every rank
    with its message before any collective. Calibration is summed over the ranks (every rank
    returns the report of all observations; rank 0 writes it). Returns the calibration report
    (or ``{}``).
    """
    from ..training.checkpoint import read_checkpoint

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
    meta = read_checkpoint(checkpoint).meta  # a damaged checkpoint: CheckpointError naming the file
    strategy = _sampling_strategy(meta, ys, comm, grid)
    m = len(rows)
    blocks = [chunk_aligned_range(m, 1, g, strategy.batch_ranks) for g in range(strategy.batch_ranks)]
    plotted = [int(rows[k]) for lo, hi in blocks for k in range(lo, min(hi, lo + n_plots))] if plots else []
    figures = [f"posterior_{i:05d}.png" for i in plotted]
    if plots and xs is not None:
        figures += ["error_vs_std.png", "coverage.png"]
        if not strategy.decomposed:
            figures += ["sbc_ranks.png", "tarp.png"]
    _check_outputs(out, plots, figures, overwrite)
    sampler = PosteriorSampler.from_checkpoint(checkpoint, device, strategy)
    reader = _Rows(strategy, strategy.partition.space_shape)
    first = reader.read(ys, int(rows[0]))
    local_shape = tuple(sampler.sample(2, first, generator=torch.Generator().manual_seed(seed)).shape[1:])  # it fits
    x_shape = local_shape[:1] + strategy.partition.space_shape
    if xs is not None and tuple(xs.shape[1:]) != x_shape:
        raise ValueError(f"{xs.name} has samples of shape {tuple(xs.shape[1:])}, the network draws {x_shape}")
    lo, hi = blocks[strategy.batch_group]
    agree_on_errors(comm, lambda: _check_observations(ys, xs, rows[lo:hi], reader))  # each rank reads its part
    # ---- everything checked: write
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if comm.rank == 0:  # the temporary store of a job that was killed (e.g. an MPI abort) goes
        remove_leftovers(os.path.dirname(os.path.abspath(out)), of=os.path.basename(os.path.abspath(out)))
    attrs = dict(STORE_MARK, checkpoint=os.path.abspath(checkpoint), data=os.path.abspath(data), y=y_name,
                 n_samples=n_samples, temperature=temperature, seed=seed, grid=list(strategy.grid),
                 noise={"kind": "tiles", "tile": TILE}, **(notes or {}))
    cal = Calibration() if xs is not None else None
    # SBC and TARP summarise whole unknowns (random projections of the full volume), which no rank
    # of a split volume holds: they are computed when each observation is on one rank
    diag = (PosteriorDiagnostics.for_sampler(sampler, x_shape, seed=seed)
            if xs is not None and not strategy.decomposed else None)
    shown: list[tuple] = []  # what the figures need, for the first n_plots observations of this group
    offsets = tuple(sl.start for sl in reader.region) if reader.region is not None else (0,) * len(x_shape[1:])
    chunk = local_shape
    draws = strategy.decomposed  # figures of split volumes: drawn from sections read back from the store
    builder = atomic_dir(out, replace=overwrite) if comm.rank == 0 else contextlib.nullcontext(None)
    with builder as tmp:
        tmp = comm.bcast(tmp)  # rank 0's temporary store
        if comm.rank == 0:
            ZarrResultWriter.create(tmp, {
                "mean": ((m,) + x_shape, (1,) + chunk, "f4"),
                "std": ((m,) + x_shape, (1,) + chunk, "f4"),
                "samples": ((m, keep) + x_shape, (1, max(keep, 1)) + chunk, "f4"),
                "index": ((m,), (1,), "i8"),
            }, attrs=attrs, overwrite=True)
        comm.barrier()
        writer = ZarrResultWriter.open(tmp)
        from tqdm import tqdm

        for k in tqdm(range(lo, hi), desc="sample", unit="obs", dynamic_ncols=True,
                      disable=not (progress and comm.rank == 0)):
            i = int(rows[k])
            y = reader.read(ys, i)
            truth = None if xs is None else reader.read(xs, i)
            watched = sampler if diag is None else diag.watch(sampler, truth)
            s = summarize_posterior(watched, y, n_samples, batch_size, temperature, keep, truth, TiledNoise(seed, i))
            writer.write("mean", (k, 0) + offsets, s.mean[None].numpy())
            writer.write("std", (k, 0) + offsets, s.std[None].numpy())
            writer.write("samples", (k, 0, 0) + offsets, s.samples[None].numpy())
            if strategy.partition.spatial_index == 0:  # one rank per observation writes its row number
                writer.write("index", k, np.array([i]))
            if cal is not None:
                cal.add(s, truth)
            if diag is not None:
                diag.add(s)
            if plots and k - lo < n_plots and not draws:
                shown.append((i, truth, y, s.mean, s.std, s.samples))
        if cal is not None and comm.size > 1:
            cal.sum_over_ranks(comm, shared_by=strategy.spatial_size)  # the report covers every rank's observations
        if diag is not None and comm.size > 1:
            diag.sum_over_ranks(comm, lo, m)
        report = {**cal.report(), **(diag.report() if diag is not None else {}), **(notes or {})} \
            if cal is not None else {}
        comm.barrier()  # every rank's part is in before rank 0 renames the store into place
        if comm.rank == 0 and report:
            writer.group.attrs["calibration"] = report
    if comm.rank == 0 and report:
        with atomic_file(report_path(out)) as f:
            json.dump(report, f, indent=1)
    if plots:
        if draws:
            comm.barrier()  # the store is in place
            if strategy.partition.spatial_index == 0:
                shown = [_sections(out, ys, xs, rows, k) for k in range(lo, min(hi, lo + n_plots))]
        _draw(plots, shown, cal if comm.rank == 0 else None, report, n_samples, temperature)
    return report


def _sections(out: str, ys: ArraySource, xs: Optional[ArraySource], rows: np.ndarray, k: int) -> tuple:
    """What the figure of observation ``k`` of the store shows, read as sections (the middle along
    the last axis of a volume; a 2D field or a vector whole), so no rank holds a whole volume."""
    import zarr

    group = zarr.open_group(out, mode="r")
    i = int(rows[k])

    def section(arr: zarr.Array, lead: tuple) -> torch.Tensor:
        shape = arr.shape[len(lead):]
        if len(shape) == 4:  # (channels, *space3d): the middle plane
            mid = shape[-1] // 2
            plane = arr[lead + (slice(None),) * 3 + (slice(mid, mid + 1),)]
            return torch.from_numpy(np.asarray(plane)[..., 0])
        return torch.from_numpy(np.asarray(arr[lead]))

    def from_file(src: Optional[ArraySource]) -> Optional[torch.Tensor]:
        if src is None:
            return None
        shape = src.shape[1:]
        if len(shape) == 4:
            mid = shape[-1] // 2
            plane = src.read((slice(i, i + 1), slice(None), slice(None), slice(None), slice(mid, mid + 1)))
            return torch.from_numpy(plane[0, ..., 0])
        return torch.from_numpy(src.read((slice(i, i + 1),))[0])

    samples = torch.stack([section(group["samples"], (k, j)) for j in range(group["samples"].shape[1])]) \
        if group["samples"].shape[1] else torch.zeros(0)
    return i, from_file(xs), from_file(ys), section(group["mean"], (k,)), section(group["std"], (k,)), samples


def _draw(plots: str, shown: list[tuple], cal: Optional[Calibration], report: dict, n_samples: int,
          temperature: float) -> None:
    from ..plotting import plot_coverage, plot_error_vs_std, plot_posterior, plot_rank_histograms, plot_tarp

    os.makedirs(plots, exist_ok=True)
    for i, truth, y, mean, std, samples in shown:
        plot_posterior(os.path.join(plots, f"posterior_{i:05d}.png"), truth, y, mean, std, samples,
                       f"observation {i}: {n_samples} samples, T={temperature:.4g}")
    if cal is not None and report:
        plot_error_vs_std(os.path.join(plots, "error_vs_std.png"), cal)
        plot_coverage(os.path.join(plots, "coverage.png"), report)
        if "sbc" in report:  # not for split volumes
            plot_rank_histograms(os.path.join(plots, "sbc_ranks.png"), report["sbc"])
            plot_tarp(os.path.join(plots, "tarp.png"), report["tarp"])
