"""invnet.inference.temperature: the temperature chosen on held-out pairs calibrates the spread.

Exact cases: the posterior is N(y, I) and the "network" samples N(y, (a T)^2 I), so the calibrated
temperature is 1/a. With 64 observations of 200 elements the held-out ratio has a relative
standard error of about 1.3%, and dlog r / dlog T = 1 near the root (a = 1/2), so T is pinned to
about +-0.025: the bounds below are 4 standard errors wide.
"""
import numpy as np
import pytest
import torch

from invnet.inference import PosteriorSampler
from invnet.inference.temperature import calibrate_temperature, calibrated_ratio, ratio_terms
from invnet.networks import ConditionalCouplingFlow


class Scaled:
    """Samples N(y, (scale * T)^2 I): too narrow for scale < 1, too wide above."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.calls = 0

    def sample(self, n, y, temperature=1.0, generator=None):
        self.calls += 1
        noise = torch.randn((n,) + tuple(y.shape), generator=generator, dtype=torch.float64)
        return y + self.scale * temperature * noise


def pairs(n=64, d=200, seed=1):
    g = torch.Generator().manual_seed(seed)
    ys = [torch.randn(1, d, generator=g, dtype=torch.float64) for _ in range(n)]
    xs = [y + torch.randn(y.shape, generator=g, dtype=torch.float64) for y in ys]
    return xs, ys


@pytest.mark.parametrize("scale, expected", [(0.5, 2.0), (2.0, 0.5), (0.8, 1.25)])
def test_the_temperature_undoes_a_global_over_or_under_dispersion(scale, expected):
    xs, ys = pairs()
    fit = calibrate_temperature(Scaled(scale), xs, ys, n_samples=64)
    assert fit.temperature == pytest.approx(expected, rel=0.05)
    assert abs(fit.ratio / fit.target - 1) <= 0.002 and fit.target == calibrated_ratio(64)
    assert fit.ratio_interval[0] < fit.target < fit.ratio_interval[1]
    assert fit.evaluations[0][0] == 1.0 and (fit.ratio_at_1 < fit.target) == (scale < 1)
    # measured on other held-out pairs, the chosen temperature is calibrated there too
    xs2, ys2 = pairs(seed=2)
    spread, error = ratio_terms(Scaled(scale), xs2, ys2, 64, fit.temperature, seed=5)
    assert spread.sum() / error.sum() == pytest.approx(fit.target, rel=0.05)


def test_a_calibrated_sampler_keeps_temperature_one_after_a_single_evaluation():
    xs, ys = pairs()
    sampler = Scaled(1.0)
    fit = calibrate_temperature(sampler, xs, ys, n_samples=64, rtol=0.05)
    assert fit.temperature == 1.0 and len(fit.evaluations) == 1 and sampler.calls == 64


def test_the_latents_are_the_same_at_every_temperature():
    # with s = y + T e and x = y + u, |s - x|^2 = T^2 |e|^2 - 2T e.u + |u|^2 is a quadratic in T when
    # the latents e do not change with T: its third difference over T = 1, 2, 3, 4 vanishes
    xs, ys = pairs(n=8, d=10)
    spread = [ratio_terms(Scaled(1.0), xs, ys, 16, float(t), batch_size=5, seed=3)[0] for t in (1, 2, 3, 4)]
    third = spread[3] - 3 * spread[2] + 3 * spread[1] - spread[0]
    np.testing.assert_allclose(third, 0, atol=1e-10 * max(s.max() for s in spread))
    other_seed = ratio_terms(Scaled(1.0), xs, ys, 16, 1.0, batch_size=5, seed=4)[0]
    assert not np.allclose(other_seed, spread[0])


def test_a_real_flow_through_the_posterior_sampler_reaches_its_target():
    torch.manual_seed(0)
    flow = ConditionalCouplingFlow(1, 1, ndim=1, depth=2, hidden=8).double()
    g = torch.Generator().manual_seed(4)
    ys = [torch.randn(1, 16, generator=g, dtype=torch.float64) for _ in range(12)]
    xs = [0.5 * y + 0.3 * torch.randn(y.shape, generator=g, dtype=torch.float64) for y in ys]
    fit = calibrate_temperature(PosteriorSampler(flow), xs, ys, n_samples=8, bounds=(0.05, 20.0))
    assert abs(fit.ratio / fit.target - 1) <= 0.002 and 0.05 < fit.temperature < 20


def test_bad_arguments_and_unreachable_targets_are_named():
    xs, ys = pairs(n=8, d=10)
    with pytest.raises(ValueError, match="at least 8 held-out pairs"):
        calibrate_temperature(Scaled(1.0), xs[:7], ys[:7])
    with pytest.raises(ValueError, match="different numbers of pairs"):
        calibrate_temperature(Scaled(1.0), xs, ys[:-1] + ys[:0])
    with pytest.raises(ValueError, match="0 < low < 1 < high"):
        calibrate_temperature(Scaled(1.0), xs, ys, bounds=(1.5, 3.0))
    with pytest.raises(ValueError, match="too narrow within bounds"):  # needs T = 10
        calibrate_temperature(Scaled(0.1), xs, ys, n_samples=16)
    with pytest.raises(ValueError, match="at least 2"):
        calibrated_ratio(1)
