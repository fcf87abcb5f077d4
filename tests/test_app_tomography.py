"""applications.limited_angle_tomography: the operator and simulator, and a tiny run of
``python -m applications.limited_angle_tomography`` through invnet's trainer and its evaluation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from applications.limited_angle_tomography.__main__ import main
from applications.limited_angle_tomography.problem import radon_operator, simulate, squared_error
from applications.limited_angle_tomography.tomography import operator_norm, radon_matrix, tikhonov_cg

TINY = """
[data]
source = "applications.limited_angle_tomography.problem:simulate"
arguments = { size = 16, angles = 12, arc = 120.0, noise = 0.02 }
validation_size = 16

[model]
type = "applications.limited_angle_tomography.problem:learned_loop"
size = 16
angles = 12
arc = 120.0
state_channels = 4
iterations = 3
hidden = 8

[optimizer]
name = "Adam"
lr = 5e-3

[training]
out_dir = "run"
loss = "applications.limited_angle_tomography.problem:squared_error"
steps = 60
batch_size = 8
seed = 0
clip_grad_norm = 1.0
validate_every = 30
log_every = 5
progress = false
device = "cpu"
"""


def test_operator_is_the_radon_matrix_with_unit_norm_and_its_adjoint():
    op = radon_operator(16, 12, 120.0)
    a_sparse = radon_matrix(16, np.linspace(0.0, 120.0, 12, endpoint=False))
    a, scale = a_sparse.to_dense(), 1.0 / operator_norm(a_sparse)  # scaled to norm 1
    x = torch.rand(3, 1, 16, 16, dtype=torch.float32)
    ax = op.forward(x)
    assert torch.allclose(ax, scale * (x.reshape(3, -1).double() @ a.T).float(), rtol=1e-4, atol=1e-6)
    assert abs(float(torch.linalg.matrix_norm(scale * a, ord=2)) - 1.0) < 1e-3
    y = torch.randn(3, ax.shape[1])
    assert abs(float((ax * y).sum() - (x * op.adjoint(y)).sum())) < 1e-4 * float(ax.norm() * y.norm())


def test_simulator_noise_level_and_reproducibility():
    x, y = simulate(64, torch.Generator().manual_seed(5), size=16, angles=12, arc=120.0, noise=0.02)
    assert x.shape == (64, 1, 16, 16) and y.shape == (64, radon_operator(16, 12, 120.0).range_shape[0])
    assert float(x.min()) >= 0 and float(x.max()) <= 1 and float(x.std()) > 0.1
    clean = radon_operator(16, 12, 120.0).forward(x)
    relative = ((y - clean).pow(2).mean(1) / clean.pow(2).mean(1)).sqrt()
    assert abs(float(relative.mean()) - 0.02) < 0.003  # 2% of each sinogram's RMS
    again = simulate(64, torch.Generator().manual_seed(5), size=16, angles=12, arc=120.0, noise=0.02)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    with pytest.raises(ValueError, match="arc"):
        simulate(2, torch.Generator(), arc=200.0)


def test_tiny_run_learns_and_is_evaluated(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    assert main(["--config", str(tmp_path / "tiny.toml"), "--eval-images", "8"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (tmp_path / "run" / "reconstructions.png").stat().st_size > 1000
    assert (tmp_path / "run" / "metrics.png").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["train_loss"], results["training"]["final_train_mse"]
    assert results["training"]["steps"] == 60 and [r["step"] for r in records if "val_loss" in r] == [30, 60]
    assert last < 0.5 * first  # the loop learns (measured: 0.045 at step 60 against 0.18 at step 5)
    held = results["held_out_ellipses"]
    # after 60 steps the loop already beats back-projection clearly (measured about +5 dB); Tikhonov-CG
    # is tuned on validation phantoms, so it must beat back-projection too
    assert held["learned_loop"]["psnr"] > held["adjoint_A^T_y"]["psnr"] + 2
    assert held["tikhonov_cg"]["psnr"] > held["adjoint_A^T_y"]["psnr"]
    assert results["tikhonov_cg"]["lambda"] in (0.0, 1e-3, 3e-3, 1e-2, 3e-2)
    assert results["trained_loop_reconstruction_error_float32"] < 1e-5
    kept = results["saved_bytes_one_forward"]
    assert kept["memory_saving_on"] < kept["memory_saving_off"] / 4


def test_loss_is_the_per_sample_mean_squared_error():
    from applications.limited_angle_tomography.problem import learned_loop

    torch.manual_seed(0)
    loop = learned_loop(16, 12, 120.0, state_channels=4, iterations=2, hidden=4)
    x, y = simulate(5, torch.Generator().manual_seed(1), size=16, angles=12)
    per_sample = squared_error(loop, (x, y))
    assert per_sample.shape == (5,)
    assert torch.allclose(per_sample.mean(), torch.mean((loop.reconstruct(y) - x) ** 2))
    baseline = tikhonov_cg(radon_operator(16, 12, 120.0).forward, radon_operator(16, 12, 120.0).adjoint, y, 1e-3, 20)
    assert baseline.shape == x.shape


def test_mismatched_geometry_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    with pytest.raises(ValueError, match="share the geometry"):
        main(["--config", str(tmp_path / "tiny.toml"), "--set", "model.angles=10"])
    with pytest.raises(ValueError, match=r"\[training\] loss"):
        main(["--config", str(tmp_path / "tiny.toml"), "--set", "training.loss=math:sqrt"])
    assert not (tmp_path / "run").exists()


def test_doctests():
    import doctest

    from applications.limited_angle_tomography import problem

    result = doctest.testmod(problem, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
