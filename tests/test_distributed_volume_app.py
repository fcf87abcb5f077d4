"""applications/distributed_volume: its data module, and the application run tiny under mpiexec
on its own config's grid (2 batch groups x 2 subdomains) through invnet's trainer and sampler."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import zarr
from test_mpi import HAVE_MPI4PY, MPIEXEC, ROOT

from applications.distributed_volume.__main__ import held_out_path
from applications.distributed_volume.make_data import make_data, observe

CONFIG = ROOT / "applications" / "distributed_volume" / "config.toml"


def test_make_data_writes_train_and_test_pairs_atomically_and_deterministically(tmp_path):
    train, test = make_data(str(tmp_path / "a"), size=8, samples=3, n_test=2, seed=1)
    again, _ = make_data(str(tmp_path / "b"), size=8, samples=3, n_test=2, seed=1)
    assert held_out_path(train) == test
    with h5py.File(train) as f, h5py.File(again) as g, h5py.File(test) as t:
        assert f["x"].shape == f["y"].shape == (3, 1, 8, 8, 8) and t["x"].shape == (2, 1, 8, 8, 8)
        assert f["x"].chunks == (1, 1, 8, 8, 8)
        assert np.array_equal(f["x"][...], g["x"][...]) and np.array_equal(f["y"][...], g["y"][...])
        assert not np.allclose(f["x"][0], t["x"][0])  # test volumes are not training volumes
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["test.h5", "train.h5"]  # no temporaries left
    zarr_train, _ = make_data(str(tmp_path / "z"), size=8, samples=2, n_test=1, fmt="zarr")
    assert zarr_train.endswith("train.zarr")
    with pytest.raises(ValueError, match="size >= 4"):
        make_data(str(tmp_path / "c"), size=2)
    assert not (tmp_path / "c").exists()


def test_observation_is_a_local_blur_plus_noise():
    x = np.zeros((1, 1, 6, 6, 6), np.float32)
    x[0, 0, 3, 3, 3] = 27.0
    y = observe(x, 0.0, np.random.default_rng(0))
    assert np.isclose(y.sum(), 27.0) and np.isclose(y[0, 0, 2:5, 2:5, 2:5], 1.0).all()
    noisy = observe(np.zeros((4, 1, 8, 8, 8), np.float32), 0.1, np.random.default_rng(0))
    assert abs(noisy.std() - 0.1) < 0.01


@pytest.mark.mpi
@pytest.mark.skipif(not HAVE_MPI4PY or MPIEXEC is None, reason="needs mpi4py and mpiexec")
def test_application_trains_and_samples_on_its_grid_under_mpiexec(tmp_path):
    config = tmp_path / "config.toml"
    shutil.copy(CONFIG, config)  # the shipped config as it is: grid [2, 2, 1, 1], data/train.h5 beside it
    make_data(str(tmp_path / "data"), size=16, samples=8, n_test=2)
    timeout = 300
    cmd = ["timeout", "-s", "KILL", str(timeout), MPIEXEC, "-n", "4", sys.executable, "-m", "mpi4py", "-m",
           "applications.distributed_volume", "--config", str(config), "--steps", "3", "--samples", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout + 30)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("trained 3 steps") == 1 and "grid (2, 2, 1, 1)" in out  # rank 0 speaks for all
    run = tmp_path / "runs" / "dv"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps and max(steps) == 3
    results = json.loads((run / "results.json").read_text())
    assert results["grid"] == [2, 2, 1, 1] and results["ranks"] == 4 and results["observations"] == 2
    assert np.isfinite(results["rmse_mean"]) and results["mean_posterior_std"] > 0
    store = zarr.open_group(str(run / "posterior.zarr"), mode="r")
    assert store["mean"].shape == (2, 1, 16, 16, 16)
    assert store["mean"].chunks == (1, 1, 8, 16, 16)  # one chunk per subdomain: each rank wrote its own
    mean = store["mean"][...]
    assert np.isfinite(mean).all() and (store["std"][...] > 0).all()
