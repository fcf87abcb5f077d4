"""MPI tests: each script in tests/mpi runs under ``mpiexec -n {1,2,4} python -m mpi4py`` with a
timeout; the scripts reduce their verdict over ranks and exit non-zero on any failure.

Timeouts at three levels: pytest-timeout on each test, ``timeout`` around mpiexec (kills a hung
job), and the CI job's own limit. Skipped (with the reason) when mpi4py or mpiexec is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "mpi"
MPIEXEC = shutil.which("mpiexec")

try:
    import mpi4py  # noqa: F401

    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(not HAVE_MPI4PY, reason="mpi4py is not installed (pip install mpi4py mpich)"),
    pytest.mark.skipif(MPIEXEC is None, reason="mpiexec is not on PATH (pip install mpich)"),
]


def launch(script: str, ranks: int, *args: str, timeout: int = 200) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = ["timeout", "-s", "KILL", str(timeout), MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py",
           str(SCRIPTS / script), *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout + 30)
    return proc, time.monotonic() - start


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "OK:" in proc.stdout, f"exit {proc.returncode}\n{out[-4000:]}"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_primitives_data_parallel_io_and_bad_configurations(ranks, tmp_path):
    """Adjoint tests of every primitive (~1e-14), data parallel = serial on the concatenated
    batch, per-rank HDF5/Zarr reads and chunk-aligned Zarr writes, and bad configurations failing
    on every rank before any message: one launch."""
    proc, _ = launch("suite.py", ranks, "primitives", "data_parallel", "bad_config", "io", "--tmp", str(tmp_path))
    assert_ok(proc)
    assert "squeeze level 2" in proc.stdout and "needs" in proc.stdout


@pytest.mark.timeout(240)
def test_torch_distributed_gloo_backend():
    assert_ok(launch("suite.py", 2, "primitives", "data_parallel", "gloo")[0])


@pytest.mark.timeout(420)
@pytest.mark.parametrize("ranks", [2, 4])
def test_decomposed_equals_serial(ranks):
    """Core chains on every grid, and Glow, ConditionalGlow, HINT, ConditionalHINT and their
    multiscale forms (those present) on one grid per dimension."""
    assert_ok(launch("decomposed.py", ranks, timeout=380)[0])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ranks", [2, 4])
def test_one_failing_rank_ends_the_job(ranks):
    proc, seconds = launch("failure.py", ranks, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, -9, 137), (
        f"exit {proc.returncode} (0: went on; 137: hung until killed)\n{out[-3000:]}"
    )
    assert "deliberate failure" in out and "UNREACHABLE" not in out
    assert seconds < 45, f"the job took {seconds:.1f} s to end"


@pytest.mark.timeout(300)
def test_invnet_train_under_mpiexec_logs_once_and_resumes(tmp_path):
    """`mpiexec -n 2 python -m mpi4py -m invnet train CONFIG`: data parallel, only rank 0 prints and
    writes checkpoints; raising `steps` and rerunning resumes from the last checkpoint."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_training import make_data

    make_data(str(tmp_path / "data.h5"))
    cfg = tmp_path / "train.toml"
    text = (f'[data]\npath = "{tmp_path / "data.h5"}"\n[model]\ntype = "ConditionalCouplingFlow"\ndepth = 1\n'
            f'hidden = 4\n[training]\nout_dir = "{tmp_path / "run"}"\nsteps = STEPS\nbatch_size = 8\nlog_every = 1\n'
            'progress = false\ncheckpoint_every_steps = 2\n')
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for steps in (4, 6):
        cfg.write_text(text.replace("STEPS", str(steps)))
        proc = subprocess.run(["timeout", "-s", "KILL", "200", MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py",
                               "-m", "invnet", "train", str(cfg)], capture_output=True, text=True, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert proc.stdout.count(f"finished at step {steps}") == 1, proc.stdout
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == [1, 2, 3, 4, 5, 6]


@pytest.mark.timeout(240)
def test_sample_job_split_over_ranks(tmp_path):
    """`invnet sample`'s job with a communicator: rank blocks of observations, one store renamed into
    place by rank 0 when every rank's part is in; rank 0's block equals the serial job's."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_failure_paths import make_pairs, write_config

    from invnet.cli import main
    from invnet.inference import sample_job

    make_pairs(tmp_path / "data.h5")
    assert main(["train", write_config(tmp_path, steps=2)]) == 0
    run, data = str(tmp_path / "run"), str(tmp_path / "data.h5")
    sample_job(run, data, str(tmp_path / "serial.zarr"), n_samples=6, keep=2, indices=range(5), seed=3)
    assert_ok(launch("sample.py", 3, "--run", run, "--data", data, "--tmp", str(tmp_path))[0])
