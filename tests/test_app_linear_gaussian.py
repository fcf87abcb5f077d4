"""applications.linear_gaussian: a tiny run of ``python -m applications.linear_gaussian`` (through
the library trainer, on simulated pairs) checked against the exact Gaussian posterior."""
from __future__ import annotations

import json

import pytest
import torch

from applications.linear_gaussian import LinearGaussianProblem, evaluate, make_problem, simulate
from applications.linear_gaussian.__main__ import main
from invnet.inference import PosteriorSampler
from invnet.training import build_network, read_checkpoint

TINY = """
[data]
source = "applications.linear_gaussian:simulate"
arguments = { dim_x = 4, dim_y = 3, noise = 0.3, seed = 0 }
validation_size = 512

[model]
type = "ConditionalGlow"
levels = 1
depth = 3
hidden = 32

[optimizer]
name = "Adam"
lr = 2e-3

[scheduler]
name = "CosineAnnealingLR"
T_max = 250

[training]
out_dir = "run"
steps = 250
batch_size = 256
seed = 1
clip_grad_norm = 10.0
validate_every = 125
log_every = 25
progress = false
device = "cpu"
"""


def test_exact_posterior_formulas_match_conditioning_of_the_joint():
    pr = LinearGaussianProblem.random(4, 3, 0.3, seed=5)
    # joint covariance of (x, y) and the Schur complement give the posterior independently
    P, A, s2 = pr.prior_cov, pr.A, pr.noise_std**2
    cyy = A @ P @ A.T + s2 * torch.eye(3, dtype=P.dtype)
    cxy = P @ A.T
    gain = cxy @ torch.linalg.inv(cyy)
    y = torch.randn(2, 3, dtype=P.dtype)
    mean = pr.prior_mean + (y - pr.prior_mean @ A.T) @ gain.T
    assert torch.allclose(pr.posterior_cov(), P - gain @ cxy.T, atol=1e-12)
    assert torch.allclose(pr.posterior_mean(y), mean, atol=1e-12)


def test_simulator_draws_the_joint_of_the_problem():
    pr = make_problem(4, 3, 0.3, False, 0)
    x, y = simulate(20000, torch.Generator().manual_seed(3), dim_x=4, dim_y=3, noise=0.3)
    assert x.shape == (20000, 4) and y.shape == (20000, 3) and not pr.on_grid
    assert torch.allclose(x.mean(0), pr.prior_mean, atol=0.05)
    residual = y - x @ pr.A.T  # the noise, independent of x
    assert abs(float(residual.std()) - 0.3) < 0.01
    assert torch.allclose(torch.cov(x.T), pr.prior_cov, atol=0.08)
    field_x, field_y = simulate(2, torch.Generator(), dim_x=16, dim_y=8, field=True)
    assert field_x.shape == (2, 1, 16) and field_y.shape == (2, 1, 8)


def test_tiny_run_matches_the_exact_posterior(tmp_path, capsys):
    (tmp_path / "tiny.toml").write_text(TINY)
    assert main(["--config", str(tmp_path / "tiny.toml"), "--eval-y", "8", "--eval-samples", "4000"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 250 and results["final_val_bpd"] is not None
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_bpd" in r] == [125, 250]
    assert (tmp_path / "run" / "metrics.png").is_file()
    # thresholds: about 3x the values measured for this seed (README.md, "In the test suite")
    assert results["kl_gap_nats_per_dim"] < 0.04
    assert results["mean_error_in_posterior_std"] < 0.2
    assert results["cov_rel_error_pooled"] < 0.12
    for level, got in results["coverage"].items():
        assert abs(got - int(level) / 100) < 0.04, level
    # the same metrics see a wrong posterior: the untrained network of the same spec fails them
    spec = read_checkpoint(results["checkpoint"]).meta["spec"]
    untrained_net = build_network(spec)
    assert PosteriorSampler.from_checkpoint(results["checkpoint"]).model.state_dict().keys() == \
        untrained_net.state_dict().keys()
    untrained = evaluate(untrained_net, make_problem(4, 3, 0.3), n_y=4, n_samples=500, n_truth=50, n_kl=2000)
    assert untrained["kl_gap_nats_per_dim"] > 0.3
    # rerunning the finished run only evaluates again (a resume with nothing left to train)
    capsys.readouterr()
    assert main(["--config", str(tmp_path / "tiny.toml"), "--eval-y", "2", "--eval-samples", "200",
                 "--results", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["steps"] == 250


def test_a_config_of_another_problem_is_refused_before_training(tmp_path):
    (tmp_path / "other.toml").write_text(TINY.replace("applications.linear_gaussian:simulate",
                                                      "tests.test_simulated_training:simulate")
                                         .replace("dim_x = 4, dim_y = 3, noise = 0.3, seed = 0", "dim = 2"))
    with pytest.raises(ValueError, match="applications.linear_gaussian:simulate"):
        main(["--config", str(tmp_path / "other.toml")])
    assert not (tmp_path / "run").exists()


def test_doctests():
    import doctest

    from applications.linear_gaussian import problem

    result = doctest.testmod(problem, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
