r"""Calibration of posterior samples against known truths (held-out simulations).

z-scores, coverage of central intervals and the ratio
:math:`E\|x^{(i)} - x\|^2 / E\|\bar x - x\|^2`, which is 2 for a calibrated sampler because then
:math:`E\|\bar x - x\|^2 = \mathrm{tr}\,\mathrm{Cov}(x \mid y) = E\|x^{(i)} - \bar x\|^2`
(conditional simulation-based checks as in "Validating Bayesian Inference Algorithms with
Simulation-Based Calibration", Talts et al., 2018, arXiv:1804.06788).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from ..distributed.comm import Communicator
from .sampler import PosteriorSummary

__all__ = ["Calibration", "COVERAGE_LEVELS"]

#: nominal levels of the central intervals whose coverage is reported
COVERAGE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


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
                inside = (r >= (1 - p) / 2) & (r <= (1 + p) / 2)
                self.inside_emp[key] = self.inside_emp.get(key, 0) + int(inside.sum())
            inside_gauss = z.abs() <= _normal_quantile((1 + p) / 2)
            self.inside_gauss[key] = self.inside_gauss.get(key, 0) + int(inside_gauss.sum())
        flat_e, flat_s = err.abs().reshape(-1), summary.std.reshape(-1)
        room = self.max_pairs // 4
        if len(self.pairs) < self.max_pairs:
            step = max(1, flat_e.numel() // max(1, room))
            self.pairs.extend(zip(flat_e[::step].tolist(), flat_s[::step].tolist()))
            del self.pairs[self.max_pairs:]
        self.per_obs.append((math.sqrt(float((err * err).mean())), float(summary.std.mean())))

    def sum_over_ranks(self, comm: Communicator, shared_by: int = 1) -> None:
        """Sum the counts and sums over the ranks of ``comm`` (each rank calibrated its own
        observations, or, when a volume is split, its own subdomain of them: ``shared_by`` ranks
        share each observation, which then counts once), so that :meth:`report` describes all of
        them on every rank. The (|error|, std) pairs for the plots stay this rank's. ``comm``: a
        :class:`~invnet.distributed.Communicator`.

        >>> from invnet.distributed import SerialComm
        >>> class TwoRanks(SerialComm):  # as if a second rank had seen the same observations
        ...     size = 2
        ...     def allreduce_sum(self, t): return 2 * t
        >>> cal = Calibration()
        >>> below = torch.tensor([5, 5, 0, 10])
        >>> s = PosteriorSummary(torch.zeros(4), torch.ones(4), torch.zeros(0, 4), 10, below, 2.0)
        >>> cal.add(s, torch.zeros(4)); cal.sum_over_ranks(TwoRanks()); cal.report()["observations"]
        2
        """
        keys = [str(p) for p in self.levels]
        values = [self.n_obs, self.n_elements, self.z_sum, self.z_sq, self.sq_err_mean, self.sq_err_samples,
                  self.var_sum, float(self.n_obs > 0), float(self.n_samples), float(bool(self.inside_emp)),
                  *[float(self.inside_emp.get(k, 0)) for k in keys],
                  *[float(self.inside_gauss.get(k, 0)) for k in keys]]
        total = comm.allreduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()
        self.n_obs, self.n_elements = int(round(total[0] / shared_by)), int(round(total[1]))
        self.z_sum, self.z_sq, self.sq_err_mean, self.sq_err_samples, self.var_sum = total[2:7]
        ranks_with_obs, n_samples, ranks_with_truth_ranks = total[7:10]
        self.n_samples = int(round(n_samples / ranks_with_obs)) if ranks_with_obs else 0  # the same on every rank
        counts = [int(round(v)) for v in total[10:]]
        if ranks_with_truth_ranks > 0:  # the truth's rank among the samples was counted: empirical coverage
            self.inside_emp = dict(zip(keys, counts[:len(keys)]))
        self.inside_gauss = dict(zip(keys, counts[len(keys):]))

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
