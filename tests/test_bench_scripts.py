"""Smoke tests of the benchmark scripts at tiny sizes, so that they cannot rot. Functional only:
nothing here is timed or compared against a target (performance lives in scripts/)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")


def run_script(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, name), *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )


def test_bench_engine_tiny(tmp_path):
    out = tmp_path / "engine.json"
    proc = run_script("bench_engine.py", "--batch", "2", "--channels", "4", "--size", "8", "--hidden", "4",
                      "--depths", "1", "2", "--repeats", "1", "--rounds", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert [r["depth"] for r in record["summary"]] == [1, 2]
    assert not [r for r in record["results"] if "error" in r]
    for row in record["summary"]:
        # memory saving keeps only the chain's output; plain autograd keeps every activation
        assert 0 < row["saving_saved_mb"] < row["plain_saved_mb"]
        assert row["saving_time_s"] > 0 and row["plain_time_s"] > 0
    assert record["summary"][0]["saving_saved_mb"] == record["summary"][1]["saving_saved_mb"]


def test_bench_memory_tiny(tmp_path):
    out = tmp_path / "memory.json"
    proc = run_script("bench_memory.py", "--tiny", "--libraries", "invnet", "invnet-plain",
                      "--sweeps", "depth", "3d", "--out", str(out), "--plots", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert not [r for r in record["results"] if "error" in r]
    rows = record["summary"]["depth"]
    assert [row["depth"] for row in rows] == [1, 2]
    for row in rows:
        assert row["invnet_params"] == row["invnet-plain_params"] > 0
        assert row["invnet_saved_mb"] < row["invnet-plain_saved_mb"]
        assert row["invnet_time_s"] > 0 and row["invnet-plain_time_s"] > 0
    assert rows[0]["invnet_saved_mb"] == rows[1]["invnet_saved_mb"]  # only the outputs are kept
    assert [r["sweep"] for r in record["summary"]["size"]] == ["3d"]
    assert (tmp_path / "bench_depth.png").stat().st_size > 0
    assert "no 3D" in proc.stdout


def test_bench_memory_rejects_sizes_the_squeezes_cannot_halve(tmp_path):
    proc = run_script("bench_memory.py", "--size", "20", "--levels", "3", "--out", str(tmp_path / "x.json"))
    assert proc.returncode != 0 and "divisible by 2^levels = 8" in proc.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # the peers' own deprecations
def test_matched_models_agree_on_parameter_count():
    """The peers' Glows are built to match invnet's: the same parameter count."""
    sys.path.insert(0, SCRIPTS)
    try:
        import bench_models as bm
    finally:
        sys.path.remove(SCRIPTS)
    counts = {}
    for lib in bm.LIBRARIES:
        try:
            model = bm.build(lib, channels=3, levels=2, steps=2, hidden=4, image=8)
        except ImportError:
            continue  # peers are optional extras
        x = torch.randn(2, 3, 8, 8)
        loss = model.nll(x)
        loss.backward()
        assert torch.isfinite(loss)
        counts[lib] = sum(p.numel() for p in model.parameters())
    assert len(set(counts.values())) == 1, counts


def test_bench_gpu_without_cuda_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the GPU script would run a real measurement")
    out = tmp_path / "gpu.json"
    proc = run_script("bench_gpu.py", "--depths", "1", "--out", str(out))
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
    assert not out.exists()


@pytest.mark.timeout(300)
@pytest.mark.skipif(__import__("shutil").which("mpiexec") is None, reason="mpiexec is not on PATH (pip install mpich)")
def test_bench_distributed_tiny():
    """The scaling script runs through the Trainer and a ParallelStrategy on 2 ranks: strong
    scaling with the exact live bytes, and the memory fit."""
    import shutil

    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    base = ["timeout", "-s", "KILL", "240", shutil.which("mpiexec"), "-n", "2", sys.executable, "-m", "mpi4py",
            os.path.join(SCRIPTS, "bench_distributed.py")]
    proc = subprocess.run(base + ["--mode", "strong", "--size", "16", "--levels", "1", "--depth", "1", "--steps", "1",
                                  "--trace"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=270)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["local"] == [8, 16, 16] and len(record["live_peak_mb"]) == 2 and record["step_s"] > 0
    assert 0 < record["halo_fraction_min"] <= record["halo_fraction_max"] < 1
    proc = subprocess.run(base + ["--mode", "fit", "--sizes", "8", "16", "--levels", "1", "--depth", "1", "--steps",
                                  "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=270)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["largest_edge_one_rank_per_machine"]["tensors"] >= record["largest_edge_one_machine"]["tensors"] > 0


def test_bench_precision_tiny(tmp_path):
    out = tmp_path / "precision.json"
    proc = run_script("bench_precision.py", "--batch", "2", "--size", "16", "--hidden", "8", "--levels", "2",
                      "--depth", "1", "--repeats", "1", "--precisions", "float32", "bfloat16", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    rows = {r["precision"]: r for r in record["summary"]}
    assert set(rows) == {"float32", "bfloat16"} and not any(r["error"] for r in rows.values())
    assert all(r["finite_loss"] and r["step_s"] > 0 and r["live_peak_mb"] > 0 for r in rows.values())
    assert rows["float32"]["time_ratio_to_float32"] == 1.0 and rows["bfloat16"]["time_ratio_to_float32"] > 0


def test_measure_drift_tiny(tmp_path):
    out = tmp_path / "drift.json"
    proc = run_script("measure_drift.py", "--depths", "2", "--steps", "3", "--batch", "8", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert [(r["model"], r["depth"]) for r in record["results"]] == [("glow", 2), ("hint", 2)]
    for r in record["results"]:
        for state in ("untrained", "trained"):
            row = r[state]
            assert all(0 <= row[p] < 1e-3 for p in ("float32", "bfloat16", "float16"))
            # the whole network in bfloat16, invertible arithmetic included: far worse
            assert row["bf16_weights"] > 100 * row["float32"]
    assert "| glow | 2 |" in proc.stdout


def test_bench_kernels_tiny(tmp_path):
    out = tmp_path / "kernels.json"
    proc = run_script("bench_kernels.py", "--sizes", "8", "16", "--batches", "1", "--threads", "1",
                      "--repeats", "1", "--hidden", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert not [r for r in record["results"] if "error" in r]
    for r in record["results"]:
        assert set(r["ns_per_voxel"]) == {"invnet", "before", "plain"}
        assert r["readbacks_per_step"] == 1
        if torch.backends.mkldnn.is_available():
            assert not r["slow_conv3d"]["invnet"], r["ops"]["invnet"]
    assert [s["net"] for s in record["summary"]] == ["glow", "hint"]
    assert "slow_conv3d in profile" in proc.stdout


def test_bench_kernels_conditioners_and_profile_tiny(tmp_path):
    out = tmp_path / "cond.json"
    proc = run_script("bench_kernels.py", "--conditioners", "--threads", "1", "--repeats", "1", "--size-cap", "8",
                      "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert {len(r["space"]) for r in rows} == {1, 2, 3}
    if torch.backends.mkldnn.is_available():
        assert not [r for r in rows if len(r["space"]) == 3 and r["reference_ops"]["rule"]]
    out = tmp_path / "profile.json"
    proc = run_script("bench_kernels.py", "--profile-only", "--nets", "chain", "--sizes", "8", "--batches", "1",
                      "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())["results"]
    assert set(r["conv_calls"]) == {"invnet", "before", "plain"} and "forward" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_bench_kernels_without_gpu_says_so():
    proc = run_script("bench_kernels.py", "--device", "cuda", "--out", "/nonexistent/x.json")
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout
