"""SBC ranks and TARP coverage against exact posteriors: a calibrated sampler passes, over- and
under-dispersed, biased and decorrelated samplers are caught. Seeds are fixed; every bound is
derived from the sample sizes (for a p-value: a correct implementation fails it with probability
at most the bound), not tuned to the outcome."""
import math

import pytest
import torch

from invnet.inference import (
    PosteriorDiagnostics,
    chi2_sf,
    ks_pvalue,
    plot_rank_histograms,
    plot_tarp,
    rank_uniformity,
    summarize_posterior,
    tarp_curve,
)

D = torch.float64
N_OBS = 300  # observations per experiment
N_SAMPLES = 99  # samples per observation: ranks 0..99
ALPHA = 1e-3  # a calibrated sampler fails a p-value check with probability <= ALPHA


def _sd_mean_u(n):  # std of the mean of n uniform values
    return 1 / math.sqrt(12 * n)


def _sd_spread(n):  # std of 12 Var(u) for n uniform values: Var((u - 1/2)^2) = 1/180
    return 12 / math.sqrt(180 * n)


class GaussianPosterior:
    """Exact posterior N(m(y), C) of a linear-Gaussian problem, drawn through a square root of C;
    ``scale`` widens it, ``shift`` biases it, ``independent`` keeps the marginals and drops the
    correlations."""

    def __init__(self, mean_fn, cov, scale=1.0, shift=0.0, independent=False):
        self.mean_fn, self.scale, self.shift = mean_fn, scale, shift
        self.root = torch.diag(cov.diagonal().sqrt()) if independent else torch.linalg.cholesky(cov)

    def sample(self, n, y, temperature=1.0, generator=None):
        z = torch.randn(n, self.root.shape[0], generator=generator, dtype=D)
        m = self.mean_fn(y).reshape(-1)
        return (m + self.shift + self.scale * z @ self.root.T).reshape((n,) + tuple(y.shape))


def vector_problem():
    # x ~ N(0, I_4), y = x + N(0, 0.5^2 I): posterior N(y / 1.25, 0.2 I)
    cov = 0.2 * torch.eye(4, dtype=D)
    return (4,), torch.eye(4, dtype=D), 0.5, (lambda y: y / 1.25), cov


def field_problem():
    # a 4x4 field with a shared offset seen through strong noise: x ~ N(0, I + 1 1^T),
    # y = x + N(0, 2^2 I); the posterior correlates the pixels (variance 3.2 along the mean
    # direction, 0.8 across)
    d = 16
    prior = torch.eye(d, dtype=D) + torch.ones(d, d, dtype=D)
    cov = torch.linalg.inv(torch.linalg.inv(prior) + torch.eye(d, dtype=D) / 4.0)
    return (1, 4, 4), prior, 2.0, (lambda y: cov @ y.reshape(-1) / 4.0), cov


def run(problem, seed=0, **kw):
    shape, prior, noise, mean_fn, cov = problem
    sampler = GaussianPosterior(mean_fn, cov, **kw)
    prior_root = torch.linalg.cholesky(prior)
    gen = torch.Generator().manual_seed(seed)
    diag = PosteriorDiagnostics(shape, reference_std=prior.diagonal().sqrt().reshape(shape), seed=seed)
    for _ in range(N_OBS):
        x = (prior_root @ torch.randn(prior.shape[0], generator=gen, dtype=D)).reshape(shape)
        y = x + noise * torch.randn(shape, generator=gen, dtype=D)
        s = summarize_posterior(diag.watch(sampler, x), y, N_SAMPLES, batch_size=40, truth=x, generator=gen)
        diag.add(s)
    return diag.report()


@pytest.mark.parametrize("problem", [vector_problem, field_problem])
def test_calibrated_sampler_gives_uniform_ranks_and_a_diagonal_tarp_curve(problem):
    r = run(problem())
    sbc, tarp = r["sbc"], r["tarp"]
    assert sbc["min_p_value_bonferroni"] > ALPHA
    for t in sbc["tests"].values():
        assert abs(t["mean"] - 0.5) < 4 * _sd_mean_u(N_OBS) and abs(t["spread"] - 1) < 4 * _sd_spread(N_OBS)
    # ECP(alpha) - alpha has std sqrt(alpha (1 - alpha) / N) <= 1/(2 sqrt N); ATC = 1/2 - mean(f)
    assert abs(tarp["atc"]) < 4 * _sd_mean_u(N_OBS)
    assert max(abs(e - a) for e, a in zip(tarp["ecp"], tarp["alpha"])) < 4 / (2 * math.sqrt(N_OBS))
    assert tarp["ks_p_value"] > ALPHA and tarp["rank_test"]["p_value"] > ALPHA
    # the bootstrap band at alpha = 1/2 is about 2 x 1.96 binomial standard errors wide
    width = tarp["band_high"][50] - tarp["band_low"][50]
    expected_width = 3.92 * math.sqrt(0.25 / N_OBS)
    assert tarp["alpha"][50] == 0.5 and abs(width - expected_width) < 0.25 * expected_width
    if problem is vector_problem:
        assert {f"parameter_{k}" for k in range(4)} <= set(sbc["tests"])


@pytest.mark.parametrize("problem", [vector_problem, field_problem])
@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_over_and_under_dispersed_samplers_are_detected(problem, scale):
    r = run(problem(), scale=scale)
    sbc, tarp = r["sbc"], r["tarp"]
    assert sbc["min_p_value_bonferroni"] < ALPHA and tarp["ks_p_value"] < ALPHA
    spread = sbc["tests"]["mean"]["spread"]
    if scale < 1:  # too narrow: the truth falls outside the samples, a U-shaped histogram
        assert spread > 1 + 4 * _sd_spread(N_OBS)
    else:  # too wide: the truth sits in the middle, a hump
        assert spread < 1 - 4 * _sd_spread(N_OBS)
    # TARP: credible balls of high level cover the truth too rarely when the samples are too
    # narrow, too often when too wide (ECP - alpha has std <= 1/(2 sqrt N)); a too-wide sampler
    # lifts the whole curve (positive ATC)
    ecp75 = dict(zip([round(a, 2) for a in tarp["alpha"]], tarp["ecp"]))[0.75]
    bound = 4 / (2 * math.sqrt(N_OBS))
    if scale < 1:
        assert ecp75 < 0.75 - bound
    else:
        assert ecp75 > 0.75 + bound and tarp["atc"] > 4 * _sd_mean_u(N_OBS)


def test_bias_shows_in_the_rank_means():
    _, _, _, mean_fn, cov = problem = vector_problem()
    r = run(problem, shift=0.5 * math.sqrt(0.2))  # half a posterior std in every parameter
    for k in range(4):
        t = r["sbc"]["tests"][f"parameter_{k}"]
        assert t["mean"] < 0.5 - 4 * _sd_mean_u(N_OBS) and t["p_value"] < ALPHA  # samples above the truth


def test_decorrelated_field_has_calibrated_pixels_but_a_wrong_mean():
    """Right pixel marginals, no correlation: the pooled per-pixel ranks look uniform, the rank of
    the field's mean does not (which is why the mean and projections are ranked too)."""
    r = run(field_problem(), independent=True)
    pooled, mean = r["sbc"]["pooled_elements"], r["sbc"]["tests"]["mean"]
    n_pixels = pooled["count"]
    assert abs(pooled["spread"] - 1) < 4 * _sd_spread(n_pixels / 16)  # as if one pixel per observation
    assert mean["p_value"] < ALPHA and mean["spread"] > 1 + 4 * _sd_spread(N_OBS)


def test_p_values_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for dof in (1, 4, 19):
        for x in (0.1, 3.0, 25.0, 60.0):
            assert abs(chi2_sf(x, dof) - stats.chi2.sf(x, dof)) < 1e-10
    for n in (20, 100, 1000):  # asymptotic form against the exact distribution
        for d in (0.02, 0.05, 0.1, 0.2, 0.3):
            assert abs(ks_pvalue(d, n) - stats.kstwo.sf(d, n)) < 0.01


def test_rank_histogram_uses_exact_cell_probabilities():
    # 11 rank values in 4 cells: sizes 3, 3, 3, 2 (floor(r * 4 / 11))
    r = rank_uniformity(torch.arange(11).repeat(10), n_samples=10, bins=4)
    assert r["counts"] == [30, 30, 30, 20] and r["expected"] == pytest.approx([30, 30, 30, 20])
    assert r["chi2"] == pytest.approx(0.0) and r["p_value"] == pytest.approx(1.0)


def test_tarp_curve_of_extremes():
    narrow = tarp_curve(torch.tensor([0.0] * 50 + [0.999] * 50, dtype=D), bootstrap=0)
    assert narrow["ks_p_value"] < 1e-6 and abs(narrow["atc"]) < 0.02  # S-shaped: no net area
    biased = tarp_curve(torch.full((100,), 0.1, dtype=D), bootstrap=0)
    assert biased["atc"] > 0.35  # coverage above the diagonal everywhere past 0.1


def test_plots_are_written(tmp_path):
    r = run(vector_problem())
    plot_rank_histograms(str(tmp_path / "ranks.png"), r["sbc"])
    plot_tarp(str(tmp_path / "tarp.png"), r["tarp"])
    assert (tmp_path / "ranks.png").stat().st_size > 0 and (tmp_path / "tarp.png").stat().st_size > 0


def test_misuse_is_rejected_with_clear_errors():
    diag = PosteriorDiagnostics((3,))
    with pytest.raises(ValueError, match="truth has shape"):
        diag.watch(object(), torch.zeros(4))
    with pytest.raises(ValueError, match="watch"):
        diag.add(None)
    with pytest.raises(ValueError, match="no observations"):
        diag.report()
    exact = GaussianPosterior(lambda y: y, torch.eye(3, dtype=D))
    y = torch.zeros(3, dtype=D)
    s = summarize_posterior(diag.watch(exact, y), y, 10, truth=y)
    with pytest.raises(ValueError, match="not closed"):
        diag.watch(exact, y)
    diag.add(s)
    s = summarize_posterior(diag.watch(exact, y), y, 12, truth=y)
    with pytest.raises(ValueError, match="same number of samples"):
        diag.add(s)
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, 5\]"):
        rank_uniformity(torch.tensor([0, 6]), n_samples=5)
    with pytest.raises(ValueError, match="reference_std"):
        PosteriorDiagnostics((2,), reference_std=0.0)


def test_observations_split_over_ranks_report_as_one():
    """Two ranks (threads with a summing allreduce), each with its block of observations: after
    sum_over_ranks both report exactly what one process that saw all of them reports."""
    import threading

    shape, prior, noise, mean_fn, cov = vector_problem()
    sampler = GaussianPosterior(mean_fn, cov, scale=1.5)
    gen = torch.Generator().manual_seed(3)
    single = PosteriorDiagnostics(shape, seed=1)
    ranks = [PosteriorDiagnostics(shape, seed=1), PosteriorDiagnostics(shape, seed=1)]
    for k in range(40):
        x = torch.randn(shape, generator=gen, dtype=D)
        y = x + noise * torch.randn(shape, generator=gen, dtype=D)
        if k == 20:  # rank 1's references continue where rank 0's end, as the single process's do
            ranks[1].gen.set_state(single.gen.get_state())
        for diag in (single, ranks[k // 20]):
            g = torch.Generator().manual_seed(100 + k)  # the same samples in both
            diag.add(summarize_posterior(diag.watch(sampler, x), y, 30, truth=x, generator=g))
    slots, barrier = [None, None], threading.Barrier(2)

    class Comm:
        def __init__(self, r):
            self.r = r

        def allreduce_sum(self, t):
            slots[self.r] = t
            barrier.wait()
            out = slots[0] + slots[1]
            barrier.wait()
            return out

    threads = [threading.Thread(target=ranks[r].sum_over_ranks, args=(Comm(r), 20 * r, 40)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    one, r0, r1 = single.report(), ranks[0].report(), ranks[1].report()
    assert r0 == r1 and one == r0 and one["sbc"]["observations"] == 40
