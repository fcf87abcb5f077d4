r"""Calibration diagnostics of a posterior sampler against known truths, collected while the
samples stream by (no sample is kept):

* **Simulation-based calibration (SBC) ranks** ("Validating Bayesian Inference Algorithms with
  Simulation-Based Calibration", Talts, Betancourt, Simpson, Vehtari, Gelman, 2018,
  arXiv:1804.06788). For a scalar summary :math:`g`, the rank of :math:`g(x)` among
  :math:`g(x^{(1)}), \dots, g(x^{(n)})` (samples given the observation made from :math:`x`) is
  uniform on :math:`\{0, \dots, n\}` for every :math:`g` when the sampler is the posterior.
  A U-shaped histogram means too narrow (over-confident), a hump too wide, a slope a bias.
* **TARP expected coverage** ("Sampling-Based Accuracy Testing of Posterior Estimators for
  General Inference", Lemos, Coogan, Hezaveh, Perreault-Levasseur, ICML 2023, arXiv:2302.03026).
  Per observation draw a reference point :math:`r` independent of the truth and count the
  fraction :math:`f` of samples closer to :math:`r` than the truth is. The ball around :math:`r`
  through the truth is a credible region of level :math:`f`, and the expected coverage
  :math:`\mathrm{ECP}(\alpha) = P(f < \alpha)` equals :math:`\alpha` for every :math:`\alpha`
  exactly when the sampler is the posterior (for references drawn from a distribution with
  full support; Lemos et al., Theorem 3). :math:`f` is the rank of the distance to the
  reference. With references at the prior's scale (tests/test_diagnostics.py): samples too wide
  lift the curve above the diagonal (balls cover the truth too often), samples too narrow pull
  it below at high levels (and towards an S-shape when the references lie far from the
  posterior, where the ball is nearly a half-space); the signed area ``atc``
  :math:`= \int_0^1 (\mathrm{ECP}(\alpha) - \alpha)\, d\alpha` is then positive for too wide,
  negative for too narrow, near zero for an S. The KS test of :math:`f` sees all of these.

Which scalar summaries (for any ``x`` shape, vectors and 1D-3D fields alike):

* every element (a vector's parameters, a field's pixels): ranks from the ``below`` counts that
  :func:`~invnet.inference.summarize_posterior` already keeps. For vectors of at most
  ``max_parameters`` entries each parameter gets its own histogram and test; all elements are
  also pooled into one histogram, which for fields is the per-pixel view (its chi-square is
  descriptive only: pixels of one observation are not independent, so its p-value is too small);
* the mean of ``x`` over all elements: the low-frequency content that per-pixel ranks miss
  (pixel marginals can be calibrated while their correlations, hence the spread of the mean, are
  wrong);
* ``projections`` fixed random unit directions :math:`u_k` (seeded, the same for every
  observation): :math:`\langle u_k, x \rangle` mixes every element, so wrong correlations in
  any direction show up. One number per observation each, so their tests are valid.

Uniformity tests: Pearson's chi-square on the rank histogram with its exact cell probabilities
(ranks are discrete), and for TARP the Kolmogorov-Smirnov test of :math:`f` randomised within
its rank cell (:math:`u = (\text{count} + v) / (n + 1)`, :math:`v \sim U(0, 1)`, exactly uniform
under calibration). p-values need no scipy: the chi-square tail is the regularised upper
incomplete gamma function, the KS tail Kolmogorov's series with Stephens' small-sample factor.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..distributed.comm import Communicator
from .sampler import PosteriorSummary, Sampler

__all__ = [
    "chi2_sf", "ks_pvalue", "rank_uniformity", "tarp_curve", "PosteriorDiagnostics", "WatchedSampler",
    "diagnostics_summary",
]


def chi2_sf(stat: float, dof: int) -> float:
    """Upper tail :math:`P(\\chi^2_{\\nu} > s) = Q(\\nu/2, s/2)` (regularised upper incomplete gamma).

    >>> round(chi2_sf(3.841458820694124, 1), 6)  # the 95% point of chi-square with 1 dof
    0.05
    """
    if dof < 1:
        raise ValueError(f"dof must be >= 1, got {dof}")
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(max(stat, 0.0) / 2.0, dtype=torch.float64)))


def ks_pvalue(d: float, n: int) -> float:
    r"""Asymptotic p-value of the one-sample Kolmogorov-Smirnov statistic ``d`` of ``n`` values:
    :math:`Q(\lambda) = 2\sum_{k\ge1} (-1)^{k-1} e^{-2k^2\lambda^2}` with
    :math:`\lambda = (\sqrt n + 0.12 + 0.11/\sqrt n)\, d` (Stephens, 1970), good to about 0.01
    from :math:`n \approx 10`.

    >>> round(ks_pvalue(0.1358, 100), 2)
    0.05
    """
    if n < 1:
        raise ValueError(f"need at least one value, got n={n}")
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    if lam < 0.2:
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return float(min(1.0, max(0.0, 2 * total)))


def _bins_for(n_ranks: int, n_values: int, max_bins: int = 20) -> int:
    # about 5 expected per cell or more (the chi-square approximation), never more cells than
    # rank values
    return int(max(2, min(max_bins, n_ranks, n_values // 5)))


def _cell_probabilities(n_samples: int, bins: int) -> Tensor:
    # rank r in {0..n} falls into cell floor(r * bins / (n + 1)); exact cell probabilities
    cells = torch.div(torch.arange(n_samples + 1) * bins, n_samples + 1, rounding_mode="floor")
    return torch.bincount(cells, minlength=bins).to(torch.float64) / (n_samples + 1)


def rank_uniformity(ranks: Tensor, n_samples: int, bins: Optional[int] = None) -> dict:
    r"""Histogram of ranks in :math:`\{0..n\}` and Pearson's chi-square test of uniformity with the
    exact cell probabilities. Also ``mean`` and ``spread`` of :math:`u = (r + 1/2)/(n + 1)`:
    ``mean`` 0.5 and ``spread`` :math:`= 12\,\mathrm{Var}(u)` 1 when calibrated; a spread above 1
    is a U-shape (samples too narrow), below 1 a hump (too wide).

    >>> r = rank_uniformity(torch.arange(100) % 11, n_samples=10, bins=11)
    >>> r["counts"][:3], round(r["p_value"], 3)
    ([10, 9, 9], 1.0)
    """
    ranks = torch.as_tensor(ranks).reshape(-1).to(torch.int64)
    if ranks.numel() == 0:
        raise ValueError("no ranks to test")
    if int(ranks.min()) < 0 or int(ranks.max()) > n_samples:
        raise ValueError(f"ranks must lie in [0, {n_samples}]")
    bins = bins or _bins_for(n_samples + 1, ranks.numel())
    cells = torch.div(ranks * bins, n_samples + 1, rounding_mode="floor")
    counts = torch.bincount(cells, minlength=bins).to(torch.float64)
    expected = _cell_probabilities(n_samples, bins) * ranks.numel()
    stat = float(((counts - expected) ** 2 / expected).sum())
    u = (ranks.to(torch.float64) + 0.5) / (n_samples + 1)
    return {"count": int(ranks.numel()), "bins": bins, "counts": [int(v) for v in counts],
            "expected": [float(v) for v in expected], "chi2": stat, "p_value": chi2_sf(stat, bins - 1),
            "mean": float(u.mean()), "spread": float(12 * u.var(unbiased=False))}


def _histogram_report(counts: Tensor, n_samples: int, bins: int) -> dict:
    """As :func:`rank_uniformity` from accumulated cell counts (pooled elements)."""
    total = float(counts.sum())
    expected = _cell_probabilities(n_samples, bins) * total
    stat = float(((counts - expected) ** 2 / expected).sum())
    centers = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    mean = float((counts * centers).sum() / total)
    return {"count": int(total), "bins": bins, "counts": [int(v) for v in counts],
            "expected": [float(v) for v in expected], "chi2": stat, "p_value": chi2_sf(stat, bins - 1),
            "mean": mean, "spread": float(12 * ((counts * (centers - mean) ** 2).sum() / total)),
            "note": "elements of one observation are not independent: descriptive, not a test"}


def tarp_curve(fractions: Tensor, levels: int = 101, bootstrap: int = 500, seed: int = 0) -> dict:
    r"""Expected coverage :math:`\mathrm{ECP}(\alpha) = \frac1N \sum_j 1[f_j < \alpha]` on
    ``levels`` credibility levels in :math:`[0, 1]`, its area ``atc`` :math:`= \int (\mathrm{ECP} -
    \alpha)\,d\alpha` (trapezoid rule), the KS distance to the diagonal with its p-value, and a
    95% band from ``bootstrap`` resamples of the observations (percentile bootstrap).

    >>> f = (torch.arange(200, dtype=torch.float64) + 0.5) / 200
    >>> r = tarp_curve(f, bootstrap=0)
    >>> round(r["atc"], 3), r["ks_p_value"] > 0.99
    (0.0, True)
    """
    f = torch.as_tensor(fractions, dtype=torch.float64).reshape(-1)
    if f.numel() == 0:
        raise ValueError("no TARP fractions to evaluate")
    alpha = torch.linspace(0, 1, levels, dtype=torch.float64)
    ecp = (f[None, :] < alpha[:, None]).to(torch.float64).mean(1)
    d = float((torch.sort(f).values - torch.arange(1, f.numel() + 1, dtype=torch.float64) / f.numel()).abs().max())
    d = max(d, float((torch.sort(f).values - torch.arange(0, f.numel(), dtype=torch.float64) / f.numel()).abs().max()))
    out = {"alpha": alpha.tolist(), "ecp": ecp.tolist(), "atc": float(torch.trapezoid(ecp - alpha, alpha)),
           "ks_distance": d, "ks_p_value": ks_pvalue(d, f.numel()), "observations": int(f.numel())}
    if bootstrap > 0:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, f.numel(), (bootstrap, f.numel()), generator=gen)
        curves = (f[idx][:, None, :] < alpha[None, :, None]).to(torch.float64).mean(2)
        out["band_low"] = torch.quantile(curves, 0.025, dim=0).tolist()
        out["band_high"] = torch.quantile(curves, 0.975, dim=0).tolist()
    return out


class WatchedSampler:
    """A :class:`~invnet.inference.Sampler` that hands every batch it draws to a
    :class:`PosteriorDiagnostics` before returning it unchanged (see
    :meth:`PosteriorDiagnostics.watch`)."""

    def __init__(self, sampler: Sampler, diagnostics: PosteriorDiagnostics) -> None:
        self.sampler = sampler
        self.diagnostics = diagnostics

    def sample(
        self, n: int, y: Tensor, temperature: float = 1.0, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        s = self.sampler.sample(n, y, temperature=temperature, generator=generator)
        self.diagnostics._observe(s)
        return s


class PosteriorDiagnostics:
    r"""SBC ranks and TARP coverage of a sampler over many observations with known truths,
    accumulated batch by batch (see the module docstring for the method and the choice of
    summaries).

    Use: for each observation, ``watched = diag.watch(sampler, truth)``, draw through ``watched``
    (e.g. ``s = summarize_posterior(watched, y, n, truth=truth)``), then ``diag.add(s)``; finally
    ``diag.report()``.

    Args:
        x_shape: shape of one unknown ``(channels, *space)`` or ``(parameters,)``.
        reference_mean, reference_std: TARP references are drawn from
            :math:`\mathcal N(\mu, \sigma^2)` element-wise (broadcast against ``x_shape``; e.g.
            the per-channel statistics the model was trained with). Any distribution independent
            of the truth with full support keeps the test exact; one at the scale of the prior
            keeps it sensitive.
        projections: number of fixed random projections ranked besides the mean.
        max_parameters: vectors up to this length get a test per parameter.
        seed: seeds the projections, the references and the randomisation (independent of the
            sampler's own random numbers, so watching changes no sample).

    >>> import torch
    >>> from invnet.inference import summarize_posterior
    >>> class Exact:  # x ~ N(0, 1), y = x + N(0, 1): posterior N(y/2, 1/2)
    ...     def sample(self, n, y, temperature=1.0, generator=None):
    ...         return y / 2 + 0.5 ** 0.5 * torch.randn((n,) + tuple(y.shape), generator=generator, dtype=torch.float64)
    >>> gen = torch.Generator().manual_seed(0)
    >>> diag = PosteriorDiagnostics((3,), reference_std=1.0)
    >>> for _ in range(200):
    ...     x = torch.randn(3, generator=gen, dtype=torch.float64)
    ...     y = x + torch.randn(3, generator=gen, dtype=torch.float64)
    ...     diag.add(summarize_posterior(diag.watch(Exact(), x), y, 99, truth=x, generator=gen))
    >>> r = diag.report()
    >>> r["sbc"]["min_p_value_bonferroni"] > 0.01, abs(r["tarp"]["atc"]) < 0.05
    (True, True)
    """

    def __init__(
        self, x_shape: Sequence[int], reference_mean: float | Tensor = 0.0, reference_std: float | Tensor = 1.0,
        projections: int = 3, max_parameters: int = 16, seed: int = 0,
    ) -> None:
        self.x_shape = tuple(int(v) for v in x_shape)
        if not self.x_shape or any(v < 1 for v in self.x_shape):
            raise ValueError(f"x_shape must be a non-empty shape of positive sizes, got {tuple(x_shape)}")
        if projections < 0:
            raise ValueError(f"projections must be >= 0, got {projections}")
        self.size = math.prod(self.x_shape)
        shape = torch.Size(self.x_shape)
        self.ref_mean = torch.as_tensor(reference_mean, dtype=torch.float64).expand(shape).reshape(-1).clone()
        self.ref_std = torch.as_tensor(reference_std, dtype=torch.float64).expand(shape).reshape(-1).clone()
        if not bool((self.ref_std > 0).all()):
            raise ValueError("reference_std must be positive")
        self.seed = int(seed)
        self.gen = torch.Generator().manual_seed(self.seed)
        # columns: the mean over elements, then unit random directions
        u = torch.randn(self.size, projections, generator=self.gen, dtype=torch.float64)
        u = u / u.norm(dim=0, keepdim=True).clamp_min(1e-300)
        self.directions = torch.cat([torch.full((self.size, 1), 1.0 / self.size, dtype=torch.float64), u], 1)
        self.summary_names = ["mean"] + [f"projection_{k}" for k in range(projections)]
        self.per_parameter = len(self.x_shape) == 1 and self.size <= max_parameters
        self.n_samples: Optional[int] = None
        self.pooled_bins = 20
        self.pooled_counts: Optional[Tensor] = None
        self.summary_ranks: list[list[int]] = []
        self.parameter_ranks: list[list[int]] = []
        self.tarp_counts: list[int] = []
        self._current: Optional[dict] = None

    @classmethod
    def for_sampler(cls, sampler: Sampler, x_shape: Sequence[int], seed: int = 0, **kwargs) -> PosteriorDiagnostics:
        """Diagnostics whose TARP references follow the per-channel statistics of ``x`` that
        ``sampler`` was trained with (its ``normalization``), standard normal without one."""
        norm = getattr(sampler, "normalization", None)
        if norm is None:
            return cls(x_shape, seed=seed, **kwargs)
        view = (-1,) + (1,) * (len(tuple(x_shape)) - 1)  # per channel, broadcast over space
        mean = torch.tensor(norm.x_mean, dtype=torch.float64).reshape(view)
        std = torch.tensor(norm.x_std, dtype=torch.float64).reshape(view)
        return cls(x_shape, mean, std, seed=seed, **kwargs)

    # streaming ---------------------------------------------------------------------------------
    def watch(self, sampler: Sampler, truth: Tensor) -> WatchedSampler:
        """Start an observation with known ``truth``; draw its samples through the returned sampler."""
        t = torch.as_tensor(truth, dtype=torch.float64)
        if tuple(t.shape) != self.x_shape:
            raise ValueError(f"truth has shape {tuple(t.shape)}, expected {self.x_shape}")
        if self._current is not None:
            raise ValueError("the previous observation was not closed with add()")
        t = t.reshape(-1)
        ref = self.ref_mean + self.ref_std * torch.randn(self.size, generator=self.gen, dtype=torch.float64)
        self._current = {
            "truth": t, "truth_proj": t @ self.directions, "ref": ref, "truth_dist": float((t - ref).norm()),
            "below": torch.zeros(self.directions.shape[1], dtype=torch.int64), "closer": 0, "n": 0,
        }
        return WatchedSampler(sampler, self)

    def _observe(self, samples: Tensor) -> None:
        cur = self._current
        if cur is None:
            raise ValueError("call watch(sampler, truth) before drawing samples")
        s = samples.detach().to(torch.float64).reshape(samples.shape[0], -1)
        if s.shape[1] != self.size:
            raise ValueError(f"samples have {s.shape[1]} elements each, expected {self.size} (x_shape {self.x_shape})")
        cur["below"] += (s @ self.directions < cur["truth_proj"]).sum(0)
        cur["closer"] += int(((s - cur["ref"]).norm(dim=1) < cur["truth_dist"]).sum())
        cur["n"] += s.shape[0]

    def add(self, summary: PosteriorSummary) -> None:
        """Close the observation: its samples were drawn through :meth:`watch`'s sampler, and
        ``summary`` (with the truth given) holds their element-wise rank counts."""
        cur = self._current
        if cur is None:
            raise ValueError("add() needs an observation opened with watch()")
        if summary.below is None:
            raise ValueError("the summary holds no ranks: pass the truth to summarize_posterior")
        if summary.n != cur["n"]:
            raise ValueError(f"the summary counts {summary.n} samples but {cur['n']} were drawn through watch()")
        if self.n_samples is None:
            self.n_samples = cur["n"]
        elif self.n_samples != cur["n"]:
            raise ValueError(f"every observation needs the same number of samples ({self.n_samples}), got {cur['n']}")
        below = summary.below.reshape(-1).to(torch.int64)
        cells = torch.div(below * self.pooled_bins, self.n_samples + 1, rounding_mode="floor")
        counts = torch.bincount(cells, minlength=self.pooled_bins).to(torch.float64)
        self.pooled_counts = counts if self.pooled_counts is None else self.pooled_counts + counts
        if self.per_parameter:
            self.parameter_ranks.append(below.tolist())
        self.summary_ranks.append(cur["below"].tolist())
        self.tarp_counts.append(cur["closer"])
        self._current = None

    def sum_over_ranks(self, comm: Communicator, offset: int, total: int) -> None:
        """Gather the observations of every rank of ``comm`` (this rank added observations
        ``offset, offset + 1, ...`` of ``total``, in order), so that :meth:`report` covers all of
        them on every rank, in the same order as one process would. ``comm``: anything with
        ``allreduce_sum`` of a tensor (a :class:`~invnet.distributed.Communicator`).

        >>> class OneRank:
        ...     def allreduce_sum(self, t): return t
        >>> d = PosteriorDiagnostics((2,))
        >>> d.sum_over_ranks(OneRank(), 0, 0); d.tarp_counts
        []
        """
        if self._current is not None:
            raise ValueError("the last observation was not closed with add()")
        k = self.directions.shape[1]
        width = 2 + k + (self.size if self.per_parameter else 0)  # present, TARP count, summaries, parameters
        table = torch.zeros(total, width, dtype=torch.float64)
        for j, (closer, summ) in enumerate(zip(self.tarp_counts, self.summary_ranks)):
            params = self.parameter_ranks[j] if self.per_parameter else []
            table[offset + j] = torch.tensor([1.0, closer, *summ, *params], dtype=torch.float64)
        pooled = self.pooled_counts
        if pooled is None:
            pooled = torch.zeros(self.pooled_bins, dtype=torch.float64)
        extra = torch.cat([pooled, torch.tensor([float(self.n_samples or 0), float(self.n_samples is not None)],
                                                dtype=torch.float64)])
        table, extra = comm.allreduce_sum(table), comm.allreduce_sum(extra)
        rows = table[table[:, 0] > 0.5].round().to(torch.int64)
        self.tarp_counts = rows[:, 1].tolist()
        self.summary_ranks = rows[:, 2:2 + k].tolist()
        self.parameter_ranks = rows[:, 2 + k:].tolist() if self.per_parameter else []
        self.pooled_counts = extra[: self.pooled_bins]
        ranks_with_obs = float(extra[-1])
        self.n_samples = int(round(float(extra[-2]) / ranks_with_obs)) if ranks_with_obs else None

    # report ------------------------------------------------------------------------------------
    def report(self) -> dict:
        """``{"sbc": ..., "tarp": ...}`` as JSON-able dicts (see the module docstring)."""
        if not self.tarp_counts:
            raise ValueError("no observations were added")
        n = self.n_samples
        summaries = torch.tensor(self.summary_ranks)
        tests = {name: rank_uniformity(summaries[:, k], n) for k, name in enumerate(self.summary_names)}
        if self.per_parameter:
            ranks = torch.tensor(self.parameter_ranks)
            tests.update({f"parameter_{k}": rank_uniformity(ranks[:, k], n) for k in range(ranks.shape[1])})
        min_p = min(t["p_value"] for t in tests.values())
        sbc = {"samples_per_observation": n, "observations": len(self.tarp_counts), "tests": tests,
               "pooled_elements": _histogram_report(self.pooled_counts, n, self.pooled_bins),
               "min_p_value_bonferroni": min(1.0, min_p * len(tests))}
        # TARP: the count of closer samples is a rank in {0..n}; randomise it within its cell
        gen = torch.Generator().manual_seed(self.seed + 1)  # the same report every time it is asked for
        v = torch.rand(len(self.tarp_counts), generator=gen, dtype=torch.float64)
        f = (torch.tensor(self.tarp_counts, dtype=torch.float64) + v) / (n + 1)
        tarp = tarp_curve(f, seed=self.seed + 2)
        tarp["rank_test"] = rank_uniformity(torch.tensor(self.tarp_counts), n)
        tarp["reference"] = "N(reference_mean, reference_std^2) per element, independent of the truth"
        return {"sbc": sbc, "tarp": tarp}


def diagnostics_summary(report: dict) -> str:
    """One line for a report: the SBC verdict and the TARP numbers of ``report`` (which holds the
    ``"sbc"`` and ``"tarp"`` parts of :meth:`PosteriorDiagnostics.report`).

    >>> r = {"sbc": {"min_p_value_bonferroni": 0.4, "tests": {"mean": {"spread": 1.02}}},
    ...      "tarp": {"atc": 0.01, "ks_p_value": 0.7}}
    >>> diagnostics_summary(r)
    'SBC ranks: smallest p-value 0.4 (Bonferroni, 1 summaries; spread of the mean 1.02, 1 if calibrated);
     TARP: ATC +0.010, KS p-value 0.7'
    """
    sbc, tarp = report["sbc"], report["tarp"]
    return (f"SBC ranks: smallest p-value {sbc['min_p_value_bonferroni']:.2g} "
            f"(Bonferroni, {len(sbc['tests'])} summaries; "
            f"spread of the mean {sbc['tests']['mean']['spread']:.2f}, 1 if calibrated); "
            f"TARP: ATC {tarp['atc']:+.3f}, KS p-value {tarp['ks_p_value']:.2g}")
