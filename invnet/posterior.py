r"""Posterior sampling for conditional flows: batched draws, streaming moments, calibration, plots.

For an observation :math:`y`, draws :math:`x^{(i)} = f^{-1}(T z^{(i)}; y)` in batches and folds
them into running statistics (Welford's update, merged batch-wise as in Chan, Golub and LeVeque,
"Updating formulae and a pairwise algorithm for computing sample variances", 1979), so the memory
used does not grow with the number of samples. With the truth known (held-out simulations) it also
measures calibration: z-scores, coverage of central intervals and the ratio
:math:`E\|x^{(i)} - x\|^2 / E\|\bar x - x\|^2`, which is 2 for a calibrated sampler because then
:math:`E\|\bar x - x\|^2 = \mathrm{tr}\,\mathrm{Cov}(x \mid y) = E\|x^{(i)} - \bar x\|^2`
(conditional simulation-based checks as in "Validating Bayesian Inference Algorithms with
Simulation-Based Calibration", Talts et al., 2018, arXiv:1804.06788).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from .data.normalization import Normalization

__all__ = [
    "RunningMoments", "Sampler", "PosteriorSampler", "PosteriorSummary", "summarize_posterior",
    "Calibration", "plot_posterior", "plot_error_vs_std", "plot_coverage", "COVERAGE_LEVELS",
]

#: nominal levels of the central intervals whose coverage is reported
COVERAGE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


class RunningMoments:
    r"""Element-wise running mean and variance over batches of samples, in float64.

    Merging a batch of :math:`m` samples with mean :math:`\mu_b` and sum of squared deviations
    :math:`M_b` into :math:`(n, \mu, M)`:
    :math:`\delta = \mu_b - \mu`, :math:`\mu \leftarrow \mu + \delta m/(n+m)`,
    :math:`M \leftarrow M + M_b + \delta^2 n m/(n+m)`.

    >>> rm = RunningMoments()
    >>> for part in torch.arange(10.0).reshape(5, 2, 1).unbind(0):
    ...     rm.update(part)
    >>> rm.mean.tolist(), round(float(rm.std()), 4)
    ([4.5], 3.0277)
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None

    def update(self, batch: Tensor) -> None:
        """Add samples ``batch`` of shape ``(m, *shape)``."""
        b = batch.detach().to(torch.float64)
        m = b.shape[0]
        mb = b.mean(0)
        m2b = ((b - mb) ** 2).sum(0)
        if self.mean is None:
            self.n, self.mean, self.m2 = m, mb, m2b
            return
        n = self.n + m
        delta = mb - self.mean
        self.mean = self.mean + delta * (m / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * m / n)
        self.n = n

    def variance(self, ddof: int = 1) -> Tensor:
        if self.m2 is None or self.n - ddof < 1:
            raise ValueError(f"need more than {ddof} sample(s) for a variance, have {self.n}")
        return self.m2 / (self.n - ddof)

    def std(self, ddof: int = 1) -> Tensor:
        return self.variance(ddof).sqrt()


class Sampler(Protocol):
    """Anything that draws ``n`` posterior samples ``(n, *x_shape)`` given one observation."""

    def sample(self, n: int, y: Tensor, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None) -> Tensor: ...


class PosteriorSampler:
    r"""Posterior sampler of a trained conditional flow in raw data units: normalises the
    observation, draws :math:`\hat x = f^{-1}(T z; \hat y)` and maps the samples back,
    :math:`x = \sigma_x \hat x + \mu_x`.

    Args:
        model: a conditional :class:`~invnet.networks.FlowNetwork`.
        normalization: the statistics the model was trained with (identity when ``None``).
        x_shape: shape of one unknown ``(channels, *space)``, needed when the observation's
            grid differs from it (summary networks).

    >>> from invnet.networks import ConditionalCouplingFlow
    >>> s = PosteriorSampler(ConditionalCouplingFlow(1, 1, ndim=1, depth=1, hidden=4))
    >>> s.sample(5, torch.zeros(1, 8)).shape
    torch.Size([5, 1, 8])
    """

    def __init__(self, model, normalization: Optional[Normalization] = None,
                 x_shape: Optional[Sequence[int]] = None) -> None:
        self.model = model.eval()
        self.normalization = normalization
        self.x_shape = None if x_shape is None else tuple(int(v) for v in x_shape)

    @classmethod
    def from_checkpoint(cls, path: str) -> "PosteriorSampler":
        """Rebuild the network from a checkpoint's spec and weights (no code is unpickled)."""
        from .training.checkpoint import read_checkpoint
        from .training.network_spec import build_network

        ckpt = read_checkpoint(path)
        if not ckpt.meta.get("spec"):
            raise ValueError(f"checkpoint {ckpt.path} holds no network spec; it was not written by invnet train")
        model = build_network(ckpt.meta["spec"])
        dtype = {"float32": torch.float32, "float64": torch.float64}[ckpt.meta.get("data", {}).get("dtype", "float32")]
        model = model.to(dtype)
        model.load_state_dict(ckpt.weights)
        norm = ckpt.meta.get("normalization")
        return cls(model, Normalization.from_dict(norm) if norm else None, ckpt.meta.get("data", {}).get("x_shape"))

    @property
    def dtype(self) -> torch.dtype:
        p = next(iter(self.model.parameters()), None)
        return p.dtype if p is not None else torch.get_default_dtype()

    @torch.no_grad()
    def sample(self, n: int, y: Tensor, temperature: float = 1.0, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` samples given one raw observation ``y`` of shape ``(channels, *space)``."""
        c = torch.as_tensor(y).to(self.dtype)[None]
        if self.normalization is not None:
            c = self.normalization.y_to_normal(c)
        shape = None
        if self.x_shape is not None and tuple(c.shape[2:]) != self.x_shape[1:]:
            shape = self.x_shape  # the observation's grid differs (summary network): say what x looks like
        x = self.model.sample(n, c, temperature=temperature, shape=shape, generator=generator)
        if self.normalization is not None:
            x = self.normalization.x_to_raw(x)
        return x


@dataclass
class PosteriorSummary:
    """Streaming summary of the posterior of one observation.

    ``below`` counts, element-wise, the samples smaller than the truth (its rank), from which
    interval coverage follows without keeping samples; ``sq_err_samples`` is
    :math:`\\frac1n\\sum_i \\|x^{(i)} - x\\|^2` (both only when the truth was given)."""

    mean: Tensor
    std: Tensor
    samples: Tensor
    n: int
    below: Optional[Tensor] = None
    sq_err_samples: Optional[float] = None


def summarize_posterior(
    sampler: Sampler, y: Tensor, n_samples: int, batch_size: int = 64, temperature: float = 1.0, keep: int = 4,
    truth: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
) -> PosteriorSummary:
    r"""Draw ``n_samples`` samples for observation ``y`` in batches of ``batch_size``; return the
    mean, standard deviation, the first ``keep`` samples and (given ``truth``) rank counts.

    >>> class Exact:  # posterior N(y, 1)
    ...     def sample(self, n, y, temperature=1.0, generator=None):
    ...         return y + temperature * torch.randn((n,) + tuple(y.shape), generator=generator, dtype=torch.float64)
    >>> s = summarize_posterior(Exact(), torch.zeros(1, 100), 400, batch_size=64, generator=torch.Generator().manual_seed(0))
    >>> bool(s.mean.abs().max() < 0.25), bool((s.std - 1).abs().max() < 0.15), tuple(s.samples.shape)
    (True, True, (4, 1, 100))
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be at least 2 (for a standard deviation), got {n_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    moments = RunningMoments()
    kept: list[Tensor] = []
    below = None
    sq = 0.0
    t = None if truth is None else torch.as_tensor(truth, dtype=torch.float64)
    done = 0
    while done < n_samples:
        m = min(batch_size, n_samples - done)
        s = sampler.sample(m, y, temperature=temperature, generator=generator).detach()
        moments.update(s)
        if len(kept) < keep:
            kept.extend(s[: keep - len(kept)].to(torch.float64).unbind(0))
        if t is not None:
            s64 = s.to(torch.float64)
            if s64.shape[1:] != t.shape:
                raise ValueError(f"truth has shape {tuple(t.shape)}, samples have {tuple(s64.shape[1:])}")
            count = (s64 < t).sum(0)
            below = count if below is None else below + count
            sq += float(((s64 - t) ** 2).reshape(m, -1).sum(1).sum())
        done += m
    samples = torch.stack(kept) if kept else torch.zeros((0,) + tuple(moments.mean.shape), dtype=torch.float64)
    return PosteriorSummary(moments.mean, moments.std(), samples, moments.n, below,
                            None if t is None else sq / n_samples)


def _normal_quantile(p: float) -> float:
    return math.sqrt(2.0) * _erfinv(2 * p - 1)


def _erfinv(v: float) -> float:
    # Newton on erf; plenty for reporting interval half-widths
    x = 0.0
    for _ in range(60):
        x -= (math.erf(x) - v) / (2 / math.sqrt(math.pi) * math.exp(-x * x))
    return x


@dataclass
class Calibration:
    r"""Calibration of posterior summaries against known truths, accumulated observation by
    observation (no samples kept):

    * z-scores :math:`(x - \bar x)/\sigma` element-wise: mean and standard deviation (0 and 1
      when calibrated);
    * coverage of central intervals of nominal level :math:`p`: empirical (the truth's rank among
      the samples lies in :math:`[(1-p)/2, (1+p)/2]`) and Gaussian (:math:`|z| \le
      \Phi^{-1}((1+p)/2)`);
    * the ratio :math:`\sum E\|x^{(i)}-x\|^2 / \sum\|\bar x - x\|^2` (2 when calibrated; above 2
      the spread is too wide, below too narrow);
    * RMSE of the mean and the mean posterior std, and a bounded subsample of (|error|, std) pairs
      for the error-vs-std plot.

    >>> cal = Calibration()
    >>> s = PosteriorSummary(torch.zeros(4), torch.ones(4), torch.zeros(0, 4), 10, torch.tensor([5, 5, 0, 10]), 2.0)
    >>> cal.add(s, torch.tensor([0.0, 0.5, -3.0, 3.0])); r = cal.report()
    >>> r["coverage"]["0.5"]["empirical"], r["coverage"]["0.5"]["gaussian"]
    (0.5, 0.5)
    """

    levels: Sequence[float] = COVERAGE_LEVELS
    max_pairs: int = 20000
    n_obs: int = 0
    n_elements: int = 0
    n_samples: int = 0
    z_sum: float = 0.0
    z_sq: float = 0.0
    sq_err_mean: float = 0.0
    sq_err_samples: float = 0.0
    var_sum: float = 0.0
    inside_emp: dict = field(default_factory=dict)
    inside_gauss: dict = field(default_factory=dict)
    pairs: list = field(default_factory=list)
    per_obs: list = field(default_factory=list)

    def add(self, summary: PosteriorSummary, truth: Tensor) -> None:
        t = torch.as_tensor(truth, dtype=torch.float64)
        err = t - summary.mean
        std = summary.std.clamp_min(1e-300)
        z = err / std
        self.n_obs += 1
        self.n_elements += err.numel()
        self.n_samples = summary.n
        self.z_sum += float(z.sum())
        self.z_sq += float((z * z).sum())
        self.sq_err_mean += float((err * err).sum())
        self.var_sum += float((summary.std**2).sum())
        if summary.sq_err_samples is not None:
            self.sq_err_samples += summary.sq_err_samples
        for p in self.levels:
            key = str(p)
            if summary.below is not None:
                r = summary.below.to(torch.float64) / summary.n
                self.inside_emp[key] = self.inside_emp.get(key, 0) + int(((r >= (1 - p) / 2) & (r <= (1 + p) / 2)).sum())
            self.inside_gauss[key] = self.inside_gauss.get(key, 0) + int((z.abs() <= _normal_quantile((1 + p) / 2)).sum())
        flat_e, flat_s = err.abs().reshape(-1), summary.std.reshape(-1)
        room = self.max_pairs // 4
        if len(self.pairs) < self.max_pairs:
            step = max(1, flat_e.numel() // max(1, room))
            self.pairs.extend(zip(flat_e[::step].tolist(), flat_s[::step].tolist()))
            del self.pairs[self.max_pairs:]
        self.per_obs.append((math.sqrt(float((err * err).mean())), float(summary.std.mean())))

    def report(self) -> dict:
        """The calibration numbers as a JSON-able dict."""
        if self.n_obs == 0:
            raise ValueError("no observations were added")
        n = self.n_elements
        z_mean = self.z_sum / n
        cov = {}
        for p in self.levels:
            key = str(p)
            cov[key] = {"nominal": p, "gaussian": self.inside_gauss[key] / n,
                        "empirical": self.inside_emp[key] / n if key in self.inside_emp else None}
        ratio = None
        if self.sq_err_mean > 0:
            num = self.sq_err_samples if self.sq_err_samples > 0 else self.var_sum + self.sq_err_mean
            ratio = num / self.sq_err_mean
        return {
            "observations": self.n_obs, "samples_per_observation": self.n_samples, "elements": n,
            "z_mean": z_mean, "z_std": math.sqrt(max(self.z_sq / n - z_mean**2, 0.0)),
            "coverage": cov, "ratio_sample_to_mean_sq_error": ratio,
            "rmse_mean": math.sqrt(self.sq_err_mean / n), "mean_posterior_std": math.sqrt(self.var_sum / n),
        }


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savefig(fig, path: str) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


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
    panels = ([("truth", truth)] if truth is not None else []) + [("observation", observation), ("posterior mean", mean),
                                                                  ("posterior std", std)]
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
