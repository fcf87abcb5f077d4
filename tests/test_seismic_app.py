"""applications/seismic_imaging: the earth models, the forward operator, the simulator the configs
name as their `[data] source`, and the application run tiny in 2D and 3D (train through invnet's
trainer on simulated pairs, resume exactly, sample held-out pairs, write the calibration report)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("pylops")
from applications.seismic_imaging import (  # noqa: E402
    earth_model,
    earth_models,
    observe,
    poststack_operator,
    reflectivity,
    simulate,
    standardization,
    to_log_impedance,
)
from applications.seismic_imaging.__main__ import main  # noqa: E402
from invnet.training import read_checkpoint  # noqa: E402


@pytest.mark.parametrize("kind", ["layered", "folded", "faulted"])
def test_earth_models_are_blocky_and_deepen(kind):
    rng = np.random.default_rng(0)
    m = earth_model((32, 24), rng, kind, texture=0.0)
    assert m.shape == (32, 24) and np.isfinite(m).all()
    assert abs((earth_model((32, 24), np.random.default_rng(0), kind, texture=0.1) - m).std() - 0.1) < 0.02
    assert 3 <= len(np.unique(m)) <= 8  # piecewise constant layers
    if kind == "layered":
        assert (np.diff(m, axis=1) == 0).all()  # flat layers: constant along x
    else:
        assert (np.diff(m, axis=1) != 0).any()
    assert earth_models(3, (8, 4, 4), seed=1).shape == (3, 1, 8, 4, 4)
    assert np.allclose(reflectivity(np.ones((5, 2))), 0)


@pytest.mark.parametrize("shape", [(32, 16), (16, 8, 8)])
def test_poststack_operator_is_linear_with_a_true_adjoint(shape):
    op = poststack_operator(shape)
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=op.shape[1]), rng.normal(size=op.shape[0])
    assert np.isclose((op @ a) @ b, a @ (op.H @ b), rtol=1e-10)
    m = earth_models(2, shape, seed=3)
    clean, noisy = observe(m, 0.0, np.random.default_rng(4)), observe(m, 0.05, np.random.default_rng(4))
    assert clean.shape == m.shape
    assert np.allclose(clean[0, 0], (op @ m[0, 0].ravel()).reshape(shape))
    assert abs((noisy - clean).std() - 0.05) < 0.01
    # the data see interfaces only: a constant model gives (almost) no data away from the edges
    flat = observe(np.ones((1, 1) + shape), 0.0, np.random.default_rng(0))[0, 0]
    assert np.abs(flat[4:-4]).max() < 1e-10


def test_simulator_is_a_function_of_its_generator_and_standardised():
    x, y = simulate(64, torch.Generator().manual_seed(5), shape=[16, 8], noise=0.02)
    x2, y2 = simulate(64, torch.Generator().manual_seed(5), shape=[16, 8], noise=0.02)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(x, simulate(64, torch.Generator().manual_seed(6), shape=[16, 8])[0])
    # fresh draws have about zero mean and unit spread (the standardisation is the prior's own)
    assert abs(float(x.mean())) < 0.15 and abs(float(x.std()) - 1) < 0.15 and abs(float(y.std()) - 1) < 0.15
    x_mean, x_std, y_std = standardization((16, 8), 0.02)
    assert np.allclose(to_log_impedance(x, [16, 8]), x_mean + x_std * x)
    # the data are the forward model of the log-impedance (noise 0: exactly)
    x0, y0 = simulate(2, torch.Generator().manual_seed(7), shape=[16, 8], noise=0.0)
    models = to_log_impedance(x0.astype(np.float64), [16, 8], noise=0.0)
    _, _, y0_std = standardization((16, 8), 0.0)
    assert np.allclose(y0 * y0_std, observe(models, 0.0, np.random.default_rng(0)), atol=1e-5)
    for bad in ({"shape": [16]}, {"shape": [2, 8]}, {"noise": -1.0}):
        with pytest.raises(ValueError):
            simulate(1, torch.Generator(), **bad)


TINY = ["--set", "model.hidden=4", "--set", "model.depth=1", "--set", "data.validation_size=8",
        "--set", "training.batch_size=4", "--set", "training.validate_every=2", "--set", "training.progress=false",
        "--n-test", "2", "--samples", "8", "--calibration-pairs", "8", "--calibration-samples", "4", "--no-plots"]


def test_2d_application_trains_on_simulated_pairs_resumes_exactly_and_reports(tmp_path, capsys):
    straight = tmp_path / "straight"
    assert main(["--out", str(straight), "--steps", "4", "--set", "scheduler.T_max=4", *TINY[:-1]]) == 0  # with figures
    assert (straight / "figures").is_dir()
    results = json.loads((straight / "results.json").read_text())
    assert results["observations"] == 2 and results["steps"] == 4 and results["shape"] == [32, 32]
    assert np.isfinite(results["rmse_mean_log_impedance"]) and results["mean_posterior_std"] > 0
    assert results["rmse_mean_log_impedance"] == pytest.approx(results["rmse_mean"] * results["x_std"])
    assert 0 <= results["coverage"]["0.9"]["empirical"] <= 1 and "ratio_sample_to_mean_sq_error" in results
    assert (straight / "posterior.zarr").is_dir() and (straight / "test.h5").is_file()
    # --temperature auto (the default): chosen on 8 held-out simulations, where the ratio meets its target
    fit = results["temperature_fit"]
    assert fit["n_observations"] == 8 and fit["n_samples"] == 4 and fit["target"] == pytest.approx(2 * 4 / 5)
    assert results["temperature"] == fit["temperature"] and abs(fit["ratio"] / fit["target"] - 1) <= 0.002
    assert fit["evaluations"][0][0] == 1.0 and results["uncalibrated"]["temperature"] == 1.0
    if fit["temperature"] != 1.0:  # the T = 1 posterior is sampled too, with the same latents
        assert (straight / "posterior_T1.zarr").is_dir()
        assert results["uncalibrated"]["ratio"] != results["ratio_sample_to_mean_sq_error"]
    # the same 4 steps in two runs (a stop after 2, then the same command): the same weights
    split = tmp_path / "split"
    schedule = ["--set", "scheduler.T_max=4"]  # the schedule of the whole run: a resume may not change it
    assert main(["--out", str(split), "--steps", "2", *schedule, *TINY]) == 0
    capsys.readouterr()
    assert main(["--out", str(split), "--steps", "4", *schedule, *TINY]) == 0
    assert "resuming from step 2" in "".join(capsys.readouterr())
    a = read_checkpoint(str(straight / "checkpoints" / "step-00000004"))
    b = read_checkpoint(str(split / "checkpoints" / "step-00000004"))
    for k in a.weights:
        assert torch.equal(a.weights[k], b.weights[k]), k


def test_3d_application_runs_tiny(tmp_path):
    from applications.seismic_imaging.__main__ import HERE

    argv = ["--config", f"{HERE}/config_3d.toml", "--out", str(tmp_path / "run"), "--steps", "2", *TINY,
            "--set", 'data.arguments={"shape": [8, 8, 8], "noise": 0.02}', "--set", "model.levels=1"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["shape"] == [8, 8, 8] and results["elements"] == 2 * 8**3


def test_a_fixed_temperature_skips_the_calibration_and_a_bad_one_is_refused_before_training(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "run"), "--steps", "1", *TINY, "--set", "model.levels=1"]
    with pytest.raises(SystemExit):
        main([*argv, "--temperature", "warm"])
    assert "--temperature must be a positive number or 'auto'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main([*argv, "--temperature", "1.5"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["temperature"] == 1.5 and results["temperature_fit"] is None
    assert results["uncalibrated"]["temperature"] == 1.0 and (tmp_path / "run" / "posterior_T1.zarr").is_dir()


def test_a_config_with_another_source_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="applications.seismic_imaging:simulate"):
        main(["--out", str(tmp_path / "run"), "--set", "data.source=applications.linear_gaussian:simulate",
              "--set", "data.arguments={}"])
    assert not (tmp_path / "run").exists()
