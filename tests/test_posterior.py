import math

import numpy as np
import pytest
import torch

from invnet.data import Normalization
from invnet.inference import (
    Calibration,
    PosteriorSampler,
    RunningMoments,
    plot_coverage,
    plot_error_vs_std,
    plot_posterior,
    summarize_posterior,
)
from invnet.networks import ConditionalCouplingFlow

SIGMA = 0.5  # observation noise of the conjugate Gaussian problem x ~ N(0, I), y = x + SIGMA e


class GaussianPosterior:
    """Exact posterior of the conjugate problem, widened by `scale` (scale 1 = calibrated)."""

    def __init__(self, scale=1.0):
        self.scale = scale
        self.var = SIGMA**2 / (1 + SIGMA**2)

    def sample(self, n, y, temperature=1.0, generator=None):
        mean = y / (1 + SIGMA**2)
        noise = torch.randn((n,) + tuple(y.shape), generator=generator, dtype=torch.float64)
        return mean + self.scale * temperature * math.sqrt(self.var) * noise


def calibrate(sampler, n_obs=40, n_samples=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cal = Calibration()
    for _ in range(n_obs):
        x = torch.randn(1, 50, generator=gen, dtype=torch.float64)
        y = x + SIGMA * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        cal.add(summarize_posterior(sampler, y, n_samples, batch_size=64, truth=x, generator=gen), x)
    return cal


def test_running_moments_match_numpy_whatever_the_batching():
    data = torch.randn(103, 3, 4, dtype=torch.float64) * 2 + 1
    rm = RunningMoments()
    for part in torch.split(data, [1, 50, 7, 45]):
        rm.update(part)
    np.testing.assert_allclose(rm.mean.numpy(), data.mean(0).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rm.std().numpy(), data.std(0).numpy(), rtol=1e-12)


def test_exact_gaussian_sampler_is_calibrated():
    r = calibrate(GaussianPosterior()).report()
    assert abs(r["ratio_sample_to_mean_sq_error"] - 2) < 0.1
    for level in ("0.5", "0.9", "0.95"):
        assert abs(r["coverage"][level]["empirical"] - float(level)) < 0.03
        assert abs(r["coverage"][level]["gaussian"] - float(level)) < 0.03
    assert abs(r["z_mean"]) < 0.05 and abs(r["z_std"] - 1) < 0.05
    assert abs(r["mean_posterior_std"] - math.sqrt(SIGMA**2 / (1 + SIGMA**2))) < 0.01


def test_overconfident_and_underconfident_samplers_are_detected():
    narrow = calibrate(GaussianPosterior(scale=0.5), n_obs=20).report()
    wide = calibrate(GaussianPosterior(scale=2.0), n_obs=20).report()
    assert narrow["coverage"]["0.9"]["empirical"] < 0.7 and narrow["ratio_sample_to_mean_sq_error"] < 1.5
    assert wide["coverage"]["0.5"]["empirical"] > 0.8 and wide["ratio_sample_to_mean_sq_error"] > 4
    assert narrow["z_std"] > 1.5 and wide["z_std"] < 0.6


def test_temperature_scales_the_spread():
    gen = torch.Generator().manual_seed(0)
    y = torch.zeros(1, 400, dtype=torch.float64)
    s1 = summarize_posterior(GaussianPosterior(), y, 100, generator=gen)
    s2 = summarize_posterior(GaussianPosterior(), y, 100, temperature=0.5, generator=gen)
    assert abs(float(s2.std.mean() / s1.std.mean()) - 0.5) < 0.05


def test_flow_sampler_denormalises_and_plots(tmp_path):
    flow = ConditionalCouplingFlow(1, 1, ndim=2, depth=1, hidden=4)
    norm = Normalization([5.0], [0.001], [0.0], [1.0])
    sampler = PosteriorSampler(flow, norm)
    s = summarize_posterior(sampler, torch.zeros(1, 8, 8), 6, batch_size=4, keep=3,
                            truth=torch.full((1, 8, 8), 5.0), generator=torch.Generator().manual_seed(0))
    assert s.samples.shape == (3, 1, 8, 8) and s.n == 6
    assert abs(float(s.mean.mean()) - 5.0) < 0.01  # the zero-initialised flow is N(0, I) in normal units
    cal = Calibration()
    cal.add(s, torch.full((1, 8, 8), 5.0))
    plot_posterior(str(tmp_path / "p.png"), torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), s.mean, s.std, s.samples)
    plot_error_vs_std(str(tmp_path / "e.png"), cal)
    plot_coverage(str(tmp_path / "c.png"), cal.report())
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("p.png", "e.png", "c.png"))
    with pytest.raises(ValueError, match="n_samples"):
        summarize_posterior(sampler, torch.zeros(1, 8, 8), 1)
