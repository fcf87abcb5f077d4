"""Every figure invnet writes, in one place; matplotlib is imported only when a figure is drawn
(``Agg`` backend, no display needed). Files are written under a temporary name and renamed, so a
crash never leaves half an image."""
from __future__ import annotations

import math
import types
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch import Tensor

from .data.atomic import atomic_path

if TYPE_CHECKING:  # imported for annotations only; plotting must not pull in the sampling job
    from matplotlib.figure import Figure

    from .inference.calibration import Calibration

__all__ = ["plot_metrics", "plot_posterior", "plot_error_vs_std", "plot_coverage", "plot_rank_histograms", "plot_tarp"]


def _plt() -> types.ModuleType:  # matplotlib.pyplot, with the Agg backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savefig(fig: Figure, path: str) -> None:
    with atomic_path(path, durable=False) as tmp:  # a figure is cheap to redraw: no fsync
        fig.savefig(tmp, dpi=110)


def _field(t: Tensor) -> np.ndarray:
    """A 2D (or 1D) view of one field (channel 0; of a 3D volume the middle section along the last
    axis, so the first axis, depth or time, stays vertical)."""
    a = np.asarray(torch.as_tensor(t, dtype=torch.float64).detach())
    if a.ndim >= 2:
        a = a[0]
    if a.ndim == 3:
        a = a[..., a.shape[-1] // 2]
    return a


def plot_posterior(path: str, truth: Optional[Tensor], observation: Tensor, mean: Tensor, std: Tensor,
                   samples: Tensor, title: str = "") -> None:
    """Panels: truth, observation, posterior mean, std, |error|, and up to 3 samples (channel 0;
    the middle section along the last axis of 3D volumes; 1D fields as curves)."""
    plt = _plt()
    panels = [("truth", truth)] if truth is not None else []
    panels += [("observation", observation), ("posterior mean", mean), ("posterior std", std)]
    if truth is not None:
        panels.append(("|mean - truth|", (torch.as_tensor(mean) - torch.as_tensor(truth)).abs()))
    panels += [(f"sample {i + 1}", s) for i, s in enumerate(samples[:3])]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8))
    ref = _field(truth if truth is not None else mean)
    lo, hi = float(np.min(ref)), float(np.max(ref))
    for ax, (name, t) in zip(np.atleast_1d(axes), panels):
        a = _field(t)
        if a.ndim == 1:
            ax.plot(a)
        else:
            same = name in ("truth", "posterior mean") or name.startswith("sample")
            im = ax.imshow(a, cmap="gray" if same else ("magma" if "std" in name or "|" in name else "seismic"),
                           vmin=lo if same else None, vmax=hi if same else None, aspect="auto")
            fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)


def plot_error_vs_std(path: str, calibration: Calibration) -> None:
    """|error| of the posterior mean against the posterior std: element pairs (binned means) and
    per-observation RMSE vs mean std; a calibrated sampler follows E|error| = sqrt(2/pi) std."""
    plt = _plt()
    e, s = (np.array(v) for v in zip(*calibration.pairs))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    ax1.scatter(s, e, s=2, alpha=0.2)
    edges = np.quantile(s, np.linspace(0, 1, 11))
    centers, means = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        sel = (s >= a) & (s <= b)
        if sel.any():
            centers.append(s[sel].mean()), means.append(e[sel].mean())
    ax1.plot(centers, means, "o-", color="C1", label="binned mean |error|")
    line = np.linspace(0, s.max(), 10)
    ax1.plot(line, math.sqrt(2 / math.pi) * line, "k--", label="calibrated: sqrt(2/pi) std")
    ax1.set_xlabel("posterior std"), ax1.set_ylabel("|mean - truth|"), ax1.legend(fontsize=8)
    r, m = (np.array(v) for v in zip(*calibration.per_obs))
    ax2.scatter(m, r, s=8)
    top = max(r.max(), m.max())
    ax2.plot([0, top], [0, top], "k--", label="RMSE = mean std")
    ax2.set_xlabel("mean posterior std (per observation)"), ax2.set_ylabel("RMSE of the mean"), ax2.legend(fontsize=8)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)


def plot_coverage(path: str, report: dict) -> None:
    """Empirical and Gaussian coverage against the nominal level (the diagonal is calibrated)."""
    plt = _plt()
    cov = report["coverage"]
    nominal = [c["nominal"] for c in cov.values()]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.plot(nominal, [c["gaussian"] for c in cov.values()], "o-", label="mean +- z std")
    if all(c["empirical"] is not None for c in cov.values()):
        ax.plot(nominal, [c["empirical"] for c in cov.values()], "s-", label="sample quantiles")
    ax.set_xlabel("nominal level"), ax.set_ylabel("coverage"), ax.legend(fontsize=8)
    ax.set_title(f"ratio E|s-x|^2 / E|mean-x|^2 = {report['ratio_sample_to_mean_sq_error']:.2f}", fontsize=9)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)


def plot_rank_histograms(path: str, sbc: dict, max_panels: int = 12) -> None:
    """SBC rank histograms (``report["sbc"]`` of :class:`~invnet.inference.PosteriorDiagnostics`):
    the pooled elements, the mean, the random projections and the parameters, each against its
    expected count with a 99% band per cell (binomial, normal approximation). A U-shape means
    too narrow, a hump too wide, a slope a bias."""
    plt = _plt()
    panels = [("elements (pooled)", sbc["pooled_elements"])] + list(sbc["tests"].items())[: max_panels - 1]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, t) in zip(axes.flat, panels):
        counts, expected = np.array(t["counts"], dtype=float), np.array(t["expected"], dtype=float)
        edges = np.arange(len(counts) + 1) / len(counts)
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="C0", alpha=0.7)
        p = expected / max(expected.sum(), 1.0)
        half = 2.576 * np.sqrt(expected * (1 - p))
        ax.fill_between(np.repeat(edges, 2)[1:-1], np.repeat(expected - half, 2), np.repeat(expected + half, 2),
                        color="k", alpha=0.15, lw=0)
        ax.step(edges, np.r_[expected, expected[-1]], where="post", color="k", lw=1)
        ax.set_title(f"{name}: p = {t['p_value']:.2g}", fontsize=8)
        ax.set_xticks([0, 0.5, 1]), ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"SBC ranks ({sbc['observations']} observations, {sbc['samples_per_observation']} samples each)",
                 fontsize=9)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)


def plot_tarp(path: str, tarp: dict) -> None:
    """TARP expected coverage against the credibility level (``report["tarp"]``), with the
    bootstrap band; the diagonal is calibrated."""
    plt = _plt()
    alpha, ecp = np.array(tarp["alpha"]), np.array(tarp["ecp"])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    if "band_low" in tarp:
        ax.fill_between(alpha, tarp["band_low"], tarp["band_high"], alpha=0.25, color="C0", lw=0, label="95% bootstrap")
    ax.plot(alpha, ecp, color="C0", label="expected coverage")
    ax.set_xlabel("credibility level"), ax.set_ylabel("expected coverage"), ax.legend(fontsize=8)
    ax.set_title(f"TARP: ATC {tarp['atc']:+.3f}, KS p = {tarp['ks_p_value']:.2g} ({tarp['observations']} obs.)",
                 fontsize=9)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)


def plot_metrics(records: list[dict], path: str, title: Optional[str] = None, loss_name: str = "bpd") -> None:
    """Plot the train and validation loss (``train_<loss_name>``, ``val_<loss_name>``), the step
    time and, when measured, the reconstruction error of the memory-free backward (per scale too)
    against the step into ``path``."""
    plt = _plt()
    train = [(r["step"], r[f"train_{loss_name}"]) for r in records if f"train_{loss_name}" in r]
    val = [(r["step"], r[f"val_{loss_name}"]) for r in records if r.get(f"val_{loss_name}") is not None]
    times = [(r["step"], r["step_time_s"]) for r in records if "step_time_s" in r]
    drift_keys = sorted({k for r in records for k in r if k.startswith("reconstruction_error")})
    panels = 3 if drift_keys else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6))
    ax, ax_t = axes[0], axes[1]
    if train:
        ax.plot(*zip(*train), lw=0.8, label="train")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="validation")
    ax.set_xlabel("step"), ax.legend()
    ax.set_ylabel("NLL (bits/dim, normalised data)" if loss_name == "bpd" else loss_name)
    if times:
        ax_t.plot(*zip(*times), lw=0.8)
    ax_t.set_xlabel("step"), ax_t.set_ylabel("step time (s)")
    if drift_keys:
        ax_d = axes[2]
        for key in drift_keys:
            pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and r[key] > 0]
            if pts:
                label = key.split("/", 1)[1].replace("_", " ") if "/" in key else "whole network"
                ax_d.plot(*zip(*pts), "o-" if key == "reconstruction_error" else ".--", ms=3, lw=0.8, label=label)
        ax_d.set_yscale("log"), ax_d.set_xlabel("step"), ax_d.legend(fontsize=7)
        ax_d.set_ylabel("reconstruction error (relative)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)
