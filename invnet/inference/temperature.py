r"""Choose the sampling temperature on held-out simulations (post-hoc recalibration).

A conditional flow trained by maximum likelihood is often slightly over-confident: its samples
spread less than the truth's error around their mean. Sampling :math:`x = f^{-1}(T z; y)` with
:math:`z \sim \mathcal N(0, I)` and a temperature :math:`T > 1` widens them. :func:`calibrate_temperature`
picks :math:`T` on pairs :math:`(x_i, y_i)` *not* used for training nor for the final evaluation,
so that the spread-to-error ratio

.. math::
    r(T) = \frac{\sum_i \frac1n \sum_j \|s_{ij}(T) - x_i\|^2}{\sum_i \|\bar s_i(T) - x_i\|^2},
    \qquad s_{ij}(T) = f^{-1}(T z_{ij}; y_i), \quad \bar s_i = \tfrac1n \textstyle\sum_j s_{ij},

equals its value for a calibrated posterior. With :math:`x_i` and the :math:`s_{ij}` independent
draws of the same posterior (variance :math:`\sigma^2` per element),
:math:`E\|s - x\|^2 = 2\sigma^2` and :math:`E\|\bar s - x\|^2 = \sigma^2 (1 + 1/n)`, so the target
is :math:`2n/(n+1)` (2 for :math:`n \to \infty`, the ratio :class:`~invnet.inference.Calibration`
reports).

This is one scalar fitted on held-out data, like temperature scaling of classifiers (Guo et al.,
ICML 2017, "On calibration of modern neural networks"): it fixes a global over- or
under-dispersion, not a posterior of the wrong shape, and what it reports must be measured on
other held-out pairs again. The latents :math:`z_{ij}` are the same for every :math:`T`
(common random numbers, seeded per observation), so :math:`r(T)` is a smooth function of
:math:`T` and the root is found by bracketing and regula falsi in :math:`\log T`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .sampler import Sampler, summarize_posterior

__all__ = ["TemperatureFit", "calibrated_ratio", "ratio_terms", "calibrate_temperature", "parse_temperature"]


def parse_temperature(text: str) -> Optional[float]:
    """A command line's temperature: ``"auto"`` -> ``None`` (choose it on held-out pairs), a
    positive finite number -> itself; anything else raises ``ValueError`` naming what is expected.

    >>> parse_temperature("auto"), parse_temperature("1.2")
    (None, 1.2)
    """
    if str(text).strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--temperature must be a positive number or 'auto', got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"--temperature must be a positive number or 'auto', got {text!r}")
    return value


def calibrated_ratio(n_samples: int) -> float:
    r"""The spread-to-error ratio of a calibrated posterior estimated with ``n_samples`` samples,
    :math:`2n/(n+1)`.

    >>> calibrated_ratio(200)
    1.9900497512437811
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be at least 2, got {n_samples}")
    return 2.0 * n_samples / (n_samples + 1)


def ratio_terms(sampler: Sampler, xs: Sequence[Tensor], ys: Sequence[Tensor], n_samples: int, temperature: float,
                batch_size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    r"""Per observation :math:`i`: the mean squared distance of the samples to the truth,
    :math:`\frac1n\sum_j\|s_{ij}-x_i\|^2`, and that of their mean, :math:`\|\bar s_i - x_i\|^2`
    (float64 arrays of length ``len(ys)``). Observation ``i``'s latents come from a generator
    seeded by ``(seed, i)``, whatever the temperature.
    """
    spread = np.empty(len(ys))
    error = np.empty(len(ys))
    for i, (x, y) in enumerate(zip(xs, ys)):
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
        t = torch.as_tensor(x, dtype=torch.float64)
        summary = summarize_posterior(sampler, y, n_samples, batch_size, temperature, keep=0, truth=t, generator=gen)
        spread[i] = summary.sq_err_samples
        error[i] = float(((summary.mean.to(torch.float64) - t) ** 2).sum())
    return spread, error


@dataclass
class TemperatureFit:
    """What :func:`calibrate_temperature` found: the temperature, the held-out ratio there and at
    ``T = 1``, the target, a bootstrap interval of the ratio over the observations (how well
    this many held-out pairs pin it down), and every ``(T, ratio)`` evaluated."""

    temperature: float
    ratio: float
    target: float
    ratio_at_1: float
    ratio_interval: tuple[float, float]
    n_observations: int
    n_samples: int
    evaluations: list[tuple[float, float]] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ratio_interval"] = list(self.ratio_interval)
        d["evaluations"] = [list(e) for e in self.evaluations]
        return d


def _bootstrap_interval(spread: np.ndarray, error: np.ndarray, level: float = 0.9, draws: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap over observations of ``sum(spread) / sum(error)``."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(spread), size=(draws, len(spread)))
    r = spread[idx].sum(1) / np.maximum(error[idx].sum(1), np.finfo(float).tiny)
    lo, hi = np.quantile(r, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def calibrate_temperature(
    sampler: Sampler, xs: Sequence[Tensor], ys: Sequence[Tensor], n_samples: int = 32, batch_size: int = 64,
    bounds: tuple[float, float] = (0.25, 4.0), rtol: float = 0.002, max_evaluations: int = 24, seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
) -> TemperatureFit:
    r"""The temperature at which the held-out ratio :math:`r(T)` equals
    :func:`calibrated_ratio` ``(n_samples)`` (see the module docstring).

    Args:
        sampler: draws ``sample(n, y, temperature, generator)``, e.g. a
            :class:`~invnet.inference.PosteriorSampler`.
        xs, ys: held-out truths and observations (each ``(channels, *space)``), in the units
            the sampler returns; at least 8 pairs, disjoint from the training and the test pairs.
        n_samples: samples per observation (the target depends on it).
        bounds: the temperatures searched; a ratio still off target at a bound raises
            ``ValueError`` (the posterior is too far off for one scale factor to fix).
        rtol: stop when :math:`|r(T)/r^* - 1| \le` ``rtol`` (or after ``max_evaluations``).
        seed: seeds the latents (the same for every temperature) and the bootstrap.
        log: called with a line per evaluation.

    >>> class TooNarrow:  # exact posterior N(y, 1), sampled with standard deviation 0.5 T
    ...     def sample(self, n, y, temperature=1.0, generator=None):
    ...         return y + 0.5 * temperature * torch.randn((n,) + tuple(y.shape), generator=generator,
    ...                                                     dtype=torch.float64)
    >>> g = torch.Generator().manual_seed(1)
    >>> ys = [torch.randn(1, 200, generator=g, dtype=torch.float64) for _ in range(64)]
    >>> xs = [y + torch.randn(y.shape, generator=g, dtype=torch.float64) for y in ys]
    >>> fit = calibrate_temperature(TooNarrow(), xs, ys, n_samples=64)
    >>> 1.9 < fit.temperature < 2.1, abs(fit.ratio / fit.target - 1) <= 0.002
    (True, True)
    """
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys hold different numbers of pairs ({len(xs)} vs {len(ys)})")
    if len(ys) < 8:
        raise ValueError(f"calibrating a temperature needs at least 8 held-out pairs, got {len(ys)}")
    lo_T, hi_T = (float(b) for b in bounds)
    if not 0 < lo_T < 1 < hi_T:
        raise ValueError(f"bounds must satisfy 0 < low < 1 < high, got {bounds}")
    if rtol <= 0 or max_evaluations < 2:
        raise ValueError(f"rtol must be positive and max_evaluations at least 2, got {rtol}, {max_evaluations}")
    target = calibrated_ratio(n_samples)
    terms: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    ratios: dict[float, float] = {}  # every T tried, in order, and its held-out ratio

    def excess(T: float) -> float:  # log r(T) - log r*, increasing in T
        spread, error = ratio_terms(sampler, xs, ys, n_samples, T, batch_size, seed)
        r = float(spread.sum() / max(error.sum(), np.finfo(float).tiny))
        terms[T], ratios[T] = (spread, error), r
        if log is not None:
            log(f"temperature {T:.4f}: held-out ratio {r:.4f} (target {target:.4f})")
        return math.log(r / target)

    def result(T: float) -> TemperatureFit:
        return TemperatureFit(T, ratios[T], target, ratios[1.0], _bootstrap_interval(*terms[T], seed=seed),
                              len(ys), n_samples, list(ratios.items()))

    tol = math.log1p(rtol)
    f1 = excess(1.0)
    if abs(f1) <= tol:
        return result(1.0)
    # bracket the root: step by factors of 2 away from T = 1, clipped to the bounds
    a, fa = 1.0, f1
    step = 2.0 if f1 < 0 else 0.5
    while True:
        b = min(max(a * step, lo_T), hi_T)
        fb = excess(b)
        if abs(fb) <= tol:
            return result(b)
        if (fb > 0) != (fa > 0):
            break
        if b in (lo_T, hi_T) or len(ratios) >= max_evaluations:
            side = "narrow" if fb < 0 else "wide"
            raise ValueError(f"the held-out ratio is {math.exp(fb) * target:.3f} at temperature {b:g} (target "
                             f"{target:.3f}): the samples stay too {side} within bounds {bounds}; widen the bounds "
                             f"or fix the model")
        a, fa = b, fb
    # Illinois-modified regula falsi in log T (superlinear, keeps the bracket)
    la, lb = math.log(a), math.log(b)
    side = 0
    while len(ratios) < max_evaluations:
        lc = (la * fb - lb * fa) / (fb - fa)
        c = math.exp(lc)
        fc = excess(c)
        if abs(fc) <= tol or abs(lb - la) < 1e-6:
            return result(c)
        if (fc > 0) == (fb > 0):
            lb, fb = lc, fc
            if side == -1:
                fa /= 2
            side = -1
        else:
            la, fa = lc, fc
            if side == 1:
                fb /= 2
            side = 1
    return result(min(ratios, key=lambda T: abs(math.log(ratios[T] / target))))  # the closest one tried
