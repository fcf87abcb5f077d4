"""The jobs under mpiexec on every parallel grid: `invnet train` with a decomposed volume equals
serial training, resumes exactly and stops on a signal to any rank; `invnet sample` on a grid
writes the serial store. Each launch has a timeout (pytest-timeout, `timeout` around mpiexec)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_mpi import HAVE_MPI4PY, MPIEXEC, ROOT, assert_ok, launch

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(not HAVE_MPI4PY, reason="mpi4py is not installed (pip install mpi4py mpich)"),
    pytest.mark.skipif(MPIEXEC is None, reason="mpiexec is not on PATH (pip install mpich)"),
]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def make_volumes(path: Path, n: int = 24, space=(16, 8, 8), seed: int = 0) -> Path:
    """3D pairs: x smooth along the first axis, y = x + noise on the same grid (float64)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1) + tuple(space)).cumsum(axis=2)
    y = x + 0.3 * rng.normal(size=x.shape)
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(1, 1) + tuple(space))
        f.create_dataset("y", data=y, chunks=(1, 1) + tuple(space))
    return path


def write_config(folder: Path, name: str, steps: int, batch_size: int, grid=None, extra: str = "") -> Path:
    """A float64 ConditionalGlow (2 levels) run on the volumes; SGD with momentum (see the test)."""
    text = f"""[data]
path = "vol.h5"
validation_fraction = 0.25
[model]
type = "ConditionalGlow"
hidden = 4
levels = 2
depth = 1
[optimizer]
name = "SGD"
lr = 0.02
momentum = 0.9
[training]
out_dir = "{name}"
steps = {steps}
batch_size = {batch_size}
log_every = 1
validate_every = 2
progress = false
precision = "float64"
{extra}
"""
    if grid is not None:
        text += f"[distributed]\ngrid = {list(grid)}\n"
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def mpi_train(config: Path, ranks: int, timeout: int = 200) -> subprocess.CompletedProcess:
    cmd = ["timeout", "-s", "KILL", str(timeout), MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py",
           "-m", "invnet", "train", str(config)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=config.parent, timeout=timeout + 30)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.timeout(600)
def test_decomposed_training_equals_serial_and_resumes(tmp_path):
    """Five float64 steps of a conditional Glow on 16x8x8 volumes: serially, with every volume
    split over 2 ranks (grid [1, 2, 1, 1], stopped after 3 steps and resumed), and on 4 ranks as
    2 batch groups x 2 subdomains (grid [2, 2, 1, 1], half the batch per group): the same loss and
    validation trajectory and the same weights, tensor by tensor, to 1e-10. (SGD with momentum:
    the weights then follow the gradients linearly. Adam divides each gradient by its running
    size, which turns round-off in the near-zero gradients of the first steps into relative
    weight differences of ~1e-10 in single tensors, serially too with another summation order;
    measured with Adam: 2e-12 over all weights, 1.3e-10 in the worst tensor.)"""
    make_volumes(tmp_path / "vol.h5")
    from invnet.cli import main

    assert main(["train", str(write_config(tmp_path, "serial", 5, 4))]) == 0
    reference = records(tmp_path / "serial")
    weights = load_file(str(tmp_path / "serial/checkpoints/step-00000005/model.safetensors"))
    runs = [("split2", 2, 4, (1, 2, 1, 1), (3, 5)), ("batch2split2", 4, 2, (2, 2, 1, 1), (5,))]
    for name, ranks, batch, grid, steps in runs:
        for n in steps:
            proc = mpi_train(write_config(tmp_path, name, n, batch, grid), ranks)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
            assert proc.stdout.count(f"finished at step {n}") == 1, proc.stdout  # rank 0 speaks
        assert "resuming from step 3" in proc.stdout or len(steps) == 1
        got = records(tmp_path / name)
        assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
        for key in ("train_bpd", "val_bpd"):
            a = [r.get(key) for r in reference]
            b = [r.get(key) for r in got]
            # (the run stopped at step 3 also validated there, at its own last step)
            assert all(v is not None for u, v in zip(a, b) if u is not None), key
            worst = max(abs(u - v) / abs(u) for u, v in zip(a, b) if u is not None)
            assert worst < 1e-10, f"{name}: {key} differs by {worst:.2e}"
        ckpts = sorted(os.listdir(tmp_path / name / "checkpoints"))
        assert ckpts[-1] == "step-00000005" and not [c for c in ckpts if ".tmp-" in c]  # written once, whole
        mine = load_file(str(tmp_path / name / "checkpoints/step-00000005/model.safetensors"))
        assert mine.keys() == weights.keys()  # the network's own names: no wrapper, any grid resumes it
        worst = max(rel(mine[k], weights[k]) for k in weights if weights[k].is_floating_point())
        assert worst < 1e-10, f"{name}: weights differ by {worst:.2e}"
    # the best-by-validation weights of the 4-rank run (the same validations as the serial run:
    # the global validation loss) are the serial run's
    serial, parallel = (tmp_path / n / "checkpoints" / "best" for n in ("serial", "batch2split2"))
    a, b = (json.loads((folder / "meta.json").read_text())["best"] for folder in (serial, parallel))
    assert a["step"] == b["step"] and abs(a["val_loss"] - b["val_loss"]) < 1e-10 * abs(a["val_loss"])
    mine, theirs = (load_file(str(folder / "model.safetensors")) for folder in (parallel, serial))
    assert max(rel(mine[k], theirs[k]) for k in theirs if theirs[k].is_floating_point()) < 1e-10


@pytest.mark.timeout(300)
def test_early_stopping_stops_every_rank_at_the_same_step(tmp_path):
    """min_delta far above any change: only the first validation (step 2) counts as better, so
    patience 2 stops at step 6 on every rank (the decision is agreed over the ranks), exit 0."""
    make_volumes(tmp_path / "vol.h5")
    proc = mpi_train(write_config(tmp_path, "early", 50, 2, (2, 2, 1, 1), "patience = 2\nmin_delta = 1e9"), 4)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("stopped early at step 6: no better validation loss for 2 validations") == 1, proc.stdout
    assert proc.stdout.count("finished at step 6") == 1
    assert sorted(os.listdir(tmp_path / "early" / "checkpoints")) == ["best", "step-00000006"]
    assert json.loads((tmp_path / "early/checkpoints/best/meta.json").read_text())["best"]["step"] == 2


def _rank_pids(root_pid: int) -> list[int]:
    """The python processes of the ranks started by our mpiexec (its descendants, by pid)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"invnet" in cmd and b"mpi4py" in cmd and not any(c.endswith(b"mpiexec") for c in cmd[:1]):
                found.append(child)
            todo.append(child)
    return sorted(found)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_a_signal_to_one_rank_checkpoints_and_stops_every_rank(tmp_path, sig, code):
    """SIGTERM (or Ctrl-C's SIGINT) delivered to the last rank only: every rank stops after the
    same step, rank 0 writes one checkpoint of it, and every rank exits with 75 (130)."""
    make_volumes(tmp_path / "vol.h5")
    config = write_config(tmp_path, "run", 100000, 4, (1, 2, 1, 1))
    cmd = ["timeout", "-s", "KILL", "200", MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "invnet",
           "train", str(config)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 150
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    pids = _rank_pids(proc.pid)
    assert len(pids) == 2, pids
    os.kill(pids[-1], sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, out[-2000:] + err[-2000:]
    ckpts = [c for c in os.listdir(tmp_path / "run" / "checkpoints") if c != "best"]  # (best: after validations)
    assert len(ckpts) == 1, ckpts
    step = int(ckpts[0].split("-")[1])
    assert records(tmp_path / "run")[-1]["step"] == step
    assert out.count("wrote checkpoint") == 1 and ("interrupted" if code == 130 else "preempted") in out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks,grid", [(2, "1 2 1 1"), (4, "2 1 2 1")])
def test_each_rank_reads_only_its_subdomain(tmp_path, ranks, grid):
    """Training on patches over a batch x space grid: no read of any rank covers more than its
    subdomain of a patch, the ranks together read each value once where serial reads it once,
    and the loss trajectory equals serial training's."""
    make_volumes(tmp_path / "vol.h5", space=(16, 8, 12))
    assert_ok(launch("reads.py", ranks, "--data", str(tmp_path / "vol.h5"), "--tmp", str(tmp_path), "--grid",
                     *grid.split(), timeout=240)[0])


def _flat(report: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in report.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif v is not None:
            out[prefix + k] = v
    return out


def _store(path: Path) -> dict:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(group[name][...]) for name in ("mean", "std", "samples", "index")} | {
        "chunks": tuple(group["mean"].chunks), "attrs": dict(group.attrs)}


@pytest.mark.timeout(600)
def test_decomposed_sampling_writes_the_serial_store(tmp_path):
    """`invnet sample` on 2 ranks (each volume split in two: grid 1 2 1 1) and on 4 (two
    observation groups x two subdomains: grid 2 1 2 1) writes the store the serial job writes
    with the same seed (the noise is drawn per global tile), chunked by subdomain, each rank its
    own chunks; the calibration is the same, and nothing temporary is left."""
    make_volumes(tmp_path / "vol.h5")
    from invnet.cli import main

    assert main(["train", str(write_config(tmp_path, "run", 2, 4))]) == 0
    common = ["--data", "vol.h5", "--n", "6", "--keep", "2", "--indices", "0:5", "--seed", "3"]
    assert main(["sample", str(tmp_path / "run"), "--out", str(tmp_path / "serial.zarr"), "--no-progress",
                 *common[:1], str(tmp_path / "vol.h5"), *common[2:]]) == 0
    serial = _store(tmp_path / "serial.zarr")
    for ranks, grid, chunk in ((2, "1 2 1 1", (1, 1, 8, 8, 8)), (4, "2 1 2 1", (1, 1, 16, 4, 8))):
        out = f"ranks{ranks}.zarr"
        cmd = ["timeout", "-s", "KILL", "240", MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m",
               "invnet", "sample", "run", "--out", out, "--grid", *grid.split(), "--plots", f"plots{ranks}", *common]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=270)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert proc.stdout.count("calibration (5 observations)") == 1  # rank 0 reports, for all
        got = _store(tmp_path / out)
        assert got["chunks"] == chunk and got["attrs"]["grid"] == [int(g) for g in grid.split()]
        for name in ("mean", "std", "samples", "index"):
            assert np.array_equal(got[name], serial[name]), name  # float64 run: the same numbers, bit for bit
        # the calibration is the same; SBC and TARP (random projections of whole unknowns) are only
        # computed when each observation lies on one rank
        split_report = _flat(got["attrs"]["calibration"])
        assert not [k for k in split_report if k.startswith(("sbc.", "tarp."))]
        serial_calibration = {k: v for k, v in _flat(serial["attrs"]["calibration"]).items()
                              if not k.startswith(("sbc.", "tarp."))}
        assert split_report == pytest.approx(serial_calibration, rel=1e-12)
        assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
        assert sorted(os.listdir(tmp_path / f"plots{ranks}"))[:2] == ["coverage.png", "error_vs_std.png"]


@pytest.mark.timeout(600)
def test_a_vector_summary_is_replicated_on_a_split_volume(tmp_path):
    """y a vector through a VectorSummary: every rank reads it whole and computes the same
    condition, while x is split; training on 2 ranks equals serial training (1e-10), and a run
    trained on a split volume samples serially (no split) to the store 2 ranks write."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 1, 16, 8, 8)).cumsum(axis=2)
    with h5py.File(tmp_path / "vol.h5", "w") as f:
        f["x"] = x
        f["y"] = x.mean(axis=(1, 2, 3, 4))[:, None] * np.ones((1, 3)) + 0.1 * rng.normal(size=(24, 3))
    summary = 'summary = { type = "VectorSummary", hidden = 8, out_channels = 4 }'
    from invnet.cli import main

    serial = write_config(tmp_path, "serial", 4, 4)
    serial.write_text(serial.read_text().replace("depth = 1\n", f"depth = 1\n{summary}\n"))
    assert main(["train", str(serial)]) == 0
    split = write_config(tmp_path, "split", 4, 4, (1, 2, 1, 1))
    split.write_text(split.read_text().replace("depth = 1\n", f"depth = 1\n{summary}\n"))
    proc = mpi_train(split, 2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    a, b = records(tmp_path / "serial"), records(tmp_path / "split")
    assert max(abs(u["train_bpd"] - v["train_bpd"]) / abs(u["train_bpd"]) for u, v in zip(a, b)) < 1e-10
    common = ["--data", "vol.h5", "--n", "4", "--keep", "1", "--indices", "0:3", "--no-progress"]
    cmd = ["timeout", "-s", "KILL", "200", MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "invnet",
           "sample", "split", "--out", "two.zarr", *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=230)
    assert proc.returncode == 0, proc.stderr[-3000:]
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["sample", "split", "--out", "one.zarr", *common]) == 0
    finally:
        os.chdir(old)
    two, one = _store(tmp_path / "two.zarr"), _store(tmp_path / "one.zarr")
    assert two["chunks"] == (1, 1, 8, 8, 8) and one["chunks"] == (1, 1, 16, 8, 8)
    assert all(np.array_equal(two[k], one[k]) for k in ("mean", "std", "samples", "index"))
