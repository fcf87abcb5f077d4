"""Linear-Gaussian inverse problem with an exact posterior, for checking amortized conditional flows.

Model:  x ~ N(m0, P),  y = A x + e,  e ~ N(0, s^2 I).  Then (Bayes' rule for Gaussians)

    p(x | y) = N(mu(y), S),   S = (P^{-1} + A^T A / s^2)^{-1},   mu(y) = S (P^{-1} m0 + A^T y / s^2),

with S independent of y and mu affine in y. A conditional flow q(x | y) trained on joint pairs
(x, y) by maximum likelihood minimises E_y KL(p(.|y) || q(.|y)); this module builds the problem,
its simulator (:func:`simulate`, the ``[data] source`` of the configs: fresh joint pairs every
step) and the comparison with the exact posterior (:func:`evaluate`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["LinearGaussianProblem", "make_problem", "simulate", "evaluate"]

D64 = torch.float64


@dataclass
class LinearGaussianProblem:
    """``y = A x + noise`` with a Gaussian prior; all exact quantities in float64."""

    A: Tensor
    prior_mean: Tensor
    prior_cov: Tensor
    noise_std: float
    #: a 1D field: the network sees x as (1, dim_x) and y as (1, dim_y) (one channel on a grid)
    #: (not named ``field``: that is the constructor :meth:`field`, which would become the default)
    on_grid: bool = False

    @classmethod
    def random(cls, dim_x: int = 8, dim_y: int = 6, noise_std: float = 0.3, seed: int = 0) -> LinearGaussianProblem:
        """A random well-posed instance: prior covariance with eigenvalues in [0.5, 2] and random
        eigenvectors, prior mean of size ~0.5, and ``A`` with N(0, 1/dim_x) entries."""
        if dim_x < 2 or dim_y < 1:
            raise ValueError(f"need dim_x >= 2 and dim_y >= 1, got {dim_x}, {dim_y}")
        if not noise_std > 0:
            raise ValueError(f"noise_std must be positive, got {noise_std}")
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim_x, dim_x, generator=g, dtype=D64))
        eig = torch.linspace(0.5, 2.0, dim_x, dtype=D64)
        prior_cov = q @ torch.diag(eig) @ q.T
        prior_mean = 0.5 * torch.randn(dim_x, generator=g, dtype=D64)
        A = torch.randn(dim_y, dim_x, generator=g, dtype=D64) / math.sqrt(dim_x)
        return cls(A, prior_mean, prior_cov, float(noise_std))

    @classmethod
    def field(cls, n: int = 16, m: int = 8, noise_std: float = 0.1, length_scale: float = 3.0,
              seed: int = 0) -> LinearGaussianProblem:
        r"""A 1D field variant: ``x`` on ``n`` grid points with a squared-exponential prior
        covariance :math:`P_{ij} = e^{-(i-j)^2 / (2 \ell^2)} + 0.05\,\delta_{ij}`, observed as
        ``m`` blurred samples (Gaussian blur of width ``n / m``, every ``n / m``-th point)."""
        if n % m:
            raise ValueError(f"the field size n={n} must be a multiple of the observation size m={m}")
        i = torch.arange(n, dtype=D64)
        squared_distance = (i[:, None] - i[None, :]) ** 2
        prior_cov = torch.exp(-squared_distance / (2 * length_scale**2)) + 0.05 * torch.eye(n, dtype=D64)
        centres = (torch.arange(m, dtype=D64) + 0.5) * (n / m) - 0.5
        A = torch.exp(-((centres[:, None] - i[None, :]) ** 2) / (2 * (n / m) ** 2))
        A = A / A.sum(1, keepdim=True)
        g = torch.Generator().manual_seed(seed)
        prior_mean = 0.3 * torch.sin(2 * math.pi * i / n + float(torch.rand(1, generator=g, dtype=D64)) * 6.0)
        return cls(A, prior_mean, prior_cov, float(noise_std), on_grid=True)

    @property
    def dim_x(self) -> int:
        return self.A.shape[1]

    @property
    def dim_y(self) -> int:
        return self.A.shape[0]

    def sample_joint(self, n: int, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """``n`` pairs ``(x, y)`` from the joint, float64, shapes ``(n, dim_x)``, ``(n, dim_y)``."""
        chol = torch.linalg.cholesky(self.prior_cov)
        x = self.prior_mean + torch.randn(n, self.dim_x, generator=generator, dtype=D64) @ chol.T
        y = x @ self.A.T + self.noise_std * torch.randn(n, self.dim_y, generator=generator, dtype=D64)
        return x, y

    def posterior_cov(self) -> Tensor:
        """:math:`S = (P^{-1} + A^T A / s^2)^{-1}` (the same for every ``y``)."""
        prec = torch.linalg.inv(self.prior_cov) + self.A.T @ self.A / self.noise_std**2
        return torch.linalg.inv(prec)

    def posterior_mean(self, y: Tensor) -> Tensor:
        """:math:`\\mu(y) = S (P^{-1} m_0 + A^T y / s^2)`, rows of ``y`` -> rows."""
        s = self.posterior_cov()
        rhs = torch.linalg.solve(self.prior_cov, self.prior_mean) + y.to(D64) @ self.A / self.noise_std**2
        return rhs @ s.T

    def posterior_log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        """:math:`\\log p(x \\mid y)` per row."""
        dist = torch.distributions.MultivariateNormal(self.posterior_mean(y), self.posterior_cov())
        return dist.log_prob(x.to(D64))

    def sample_posterior(self, y: Tensor, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` exact posterior samples per row of ``y``: shape ``(rows, n, dim_x)``."""
        chol = torch.linalg.cholesky(self.posterior_cov())
        z = torch.randn(y.shape[0], n, self.dim_x, generator=generator, dtype=D64)
        return self.posterior_mean(y)[:, None, :] + z @ chol.T

    def to_network(self, rows: Tensor) -> Tensor:
        """Rows ``(n, d)`` in the layout the network sees: ``(n, 1, d)`` for a field, else as they are."""
        return rows[:, None, :] if self.on_grid else rows

    def from_network(self, t: Tensor) -> Tensor:
        """Inverse of :meth:`to_network`."""
        return t[:, 0, :] if self.on_grid else t


@functools.lru_cache(maxsize=8)
def make_problem(dim_x: int = 8, dim_y: int = 6, noise: Optional[float] = None, field: bool = False,
            seed: int = 0) -> LinearGaussianProblem:
    """The problem a config's ``[data] arguments`` name: :meth:`LinearGaussianProblem.random`
    (vectors; noise 0.3 by default) or, with ``field``, :meth:`LinearGaussianProblem.field`
    (noise 0.1 by default); built once per process."""
    if field:
        return LinearGaussianProblem.field(dim_x, dim_y, 0.1 if noise is None else noise, seed=seed)
    return LinearGaussianProblem.random(dim_x, dim_y, 0.3 if noise is None else noise, seed=seed)


def simulate(n: int, generator: torch.Generator, dim_x: int = 8, dim_y: int = 6, noise: Optional[float] = None,
             field: bool = False, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` fresh joint pairs ``(x, y)`` of :func:`make_problem` (float64), in the network's layout:
    the simulator of ``[data] source = "applications.linear_gaussian:simulate"`` (its keyword
    arguments are the config's ``[data] arguments``; ``seed`` fixes the problem, the generator the
    draws).

    >>> x, y = simulate(3, torch.Generator().manual_seed(0), dim_x=4, dim_y=2)
    >>> tuple(x.shape), tuple(y.shape)
    ((3, 4), (3, 2))
    >>> make_problem(4, 2).on_grid, make_problem(16, 8, field=True).on_grid
    (False, True)
    >>> tuple(simulate(3, torch.Generator(), dim_x=16, dim_y=8, field=True)[0].shape)
    (3, 1, 16)
    """
    pr = make_problem(dim_x, dim_y, noise, field, seed)
    x, y = pr.sample_joint(n, generator)
    return pr.to_network(x), pr.to_network(y)


# --------------------------------------------------------------------------------------------
def _metrics_from_samples(problem: LinearGaussianProblem, y: Tensor, samples: Tensor, truth_draws: Tensor) -> dict:
    """Posterior statistics of ``samples`` (rows, n, dim_x) against the exact posterior."""
    mu = problem.posterior_mean(y)
    cov = problem.posterior_cov()
    m_hat = samples.mean(1)
    centred = samples - m_hat[:, None, :]
    c_hat = centred.transpose(1, 2) @ centred / (samples.shape[1] - 1)
    mean_err = ((m_hat - mu).norm(dim=1) / mu.norm(dim=1)).mean()
    mean_err_std = (((m_hat - mu) / torch.sqrt(torch.diagonal(cov))).pow(2).mean(1).sqrt()).mean()
    cov_err = ((c_hat - cov).flatten(1).norm(dim=1) / cov.norm()).mean()
    cov_err_pooled = (c_hat.mean(0) - cov).norm() / cov.norm()
    coverage = {}
    for level in (0.5, 0.9, 0.95):
        lo = torch.quantile(samples, (1 - level) / 2, dim=1)
        hi = torch.quantile(samples, (1 + level) / 2, dim=1)
        inside = (truth_draws >= lo[:, None, :]) & (truth_draws <= hi[:, None, :])
        coverage[f"{int(level * 100)}"] = float(inside.double().mean())
    return {
        "mean_rel_error": float(mean_err),
        "mean_error_in_posterior_std": float(mean_err_std),
        "cov_rel_error": float(cov_err),
        "cov_rel_error_pooled": float(cov_err_pooled),
        "coverage": coverage,
    }


@torch.no_grad()
def evaluate(
    net: nn.Module,
    problem: LinearGaussianProblem,
    n_y: int = 50,
    n_samples: int = 20000,
    n_truth: int = 200,
    n_kl: int = 20000,
    seed: int = 12345,
) -> dict:
    """Compare ``q(x|y)`` with the exact posterior on ``n_y`` held-out observations.

    * ``mean_rel_error``: mean over y of ``|m_q - mu| / |mu|`` (sample mean of ``n_samples`` draws);
      ``mean_error_in_posterior_std``: RMS over components of ``(m_q - mu) / sqrt(diag S)``.
    * ``cov_rel_error``: mean over y of ``|C_q - S|_F / |S|_F`` (per-y sample covariance);
      ``cov_rel_error_pooled``: the same for the y-averaged sample covariance (S does not depend on y).
    * ``kl_gap_nats_per_dim``: ``(E[-log q(x|y)] - E[-log p(x|y)]) / dim_x`` over ``n_kl`` joint
      pairs = forward KL(p || q) averaged over y, per dimension (with its standard error).
    * ``coverage``: fraction of exact posterior draws inside q's central 50/90/95% intervals
      (per component, from q's sample quantiles).

    ``exact_baseline`` holds the same sample statistics computed from exact posterior samples of
    the same size: the Monte-Carlo noise floor of each number.
    """
    g = torch.Generator().manual_seed(seed)
    dtype = next(net.parameters()).dtype
    _, y = problem.sample_joint(n_y, g)
    samples = torch.stack(
        [problem.from_network(net.sample(n_samples, problem.to_network(y[i : i + 1]).to(dtype))).double()
         for i in range(n_y)]
    )
    truth = problem.sample_posterior(y, n_truth, g)
    out = _metrics_from_samples(problem, y, samples, truth)
    baseline = _metrics_from_samples(problem, y, problem.sample_posterior(y, n_samples, g), truth)
    x, yk = problem.sample_joint(n_kl, g)
    nll_q = -net.log_prob(problem.to_network(x).to(dtype), problem.to_network(yk).to(dtype)).double()
    nll_p = -problem.posterior_log_prob(x, yk)
    diff = (nll_q - nll_p) / problem.dim_x
    out["kl_gap_nats_per_dim"] = float(diff.mean())
    out["kl_gap_std_error"] = float(diff.std() / math.sqrt(n_kl))
    out["exact_baseline"] = baseline
    return out
