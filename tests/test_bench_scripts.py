"""Smoke tests of the benchmark scripts at tiny sizes, so that they cannot rot. Functional only:
nothing here is timed or compared against a target (performance lives in scripts/)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from invnet import host_allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")


def run_script(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    drop = ("LD_PRELOAD", "MALLOC_CONF", "INVNET_ALLOCATOR", "INVNET_JEMALLOC", "INVNET_ALLOCATOR_RELAUNCHED")
    env = {k: v for k, v in os.environ.items() if k not in drop}  # the scripts' own allocator choice
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
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


def test_bench_memory_budget_and_accumulation_sweeps_tiny(tmp_path):
    out = tmp_path / "budget.json"
    proc = run_script("bench_memory.py", "--tiny", "--libraries", "invnet", "invnet-plain",
                      "--sweeps", "budget", "accumulate", "--accumulate-depths", "1", "--out", str(out),
                      "--plots", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert not [r for r in record["results"] if "error" in r]
    rows = {r["library"]: r for r in record["summary"]["budget"]}
    assert set(rows) == {"invnet-plain", "invnet@unlimited", "invnet@quarter", "invnet@0"}
    assert rows["invnet@quarter"]["budget_bytes"] == int(rows["invnet-plain"]["saved_mb"] * 2**20 / 4)
    assert rows["invnet@0"]["saved_mb"] < rows["invnet@unlimited"]["saved_mb"]
    assert all(r["time_s"] > 0 for r in rows.values())
    assert [r["depth"] for r in record["summary"]["accumulate"]] == [1]
    assert (tmp_path / "bench_budget_tradeoff.png").exists()


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


def _sbi_problems():
    import importlib.util

    spec = importlib.util.spec_from_file_location("invnet_bench_sbi_problems", os.path.join(SCRIPTS, "sbi_problems.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_two_moons_reference_samples_follow_the_likelihood():
    """Rejection samples against quadrature of prior x likelihood on a fine grid (mean and
    covariance within 4 standard errors of the sample size)."""
    import numpy as np

    sp = _sbi_problems()
    tm = sp.TwoMoons()
    rng = np.random.default_rng(0)
    for y in tm.joint(2, rng)[1]:
        s = tm.reference_posterior(y, 20000, rng)
        g = np.linspace(-1, 1, 2001)
        pts = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        w = np.exp(tm.log_likelihood(pts, y))
        w /= w.sum()
        mean = w @ pts
        cov = (pts - mean).T @ ((pts - mean) * w[:, None])
        se = np.sqrt(np.diag(cov) / len(s))
        assert np.all(np.abs(s.mean(0) - mean) < 4 * se)
        assert np.allclose(np.cov(s.T), cov, atol=4 * np.sqrt(2 / len(s)) * np.diag(cov).max())


def test_metropolis_recovers_a_known_gaussian():
    """Independent chains give a standard error of the mean (spread of the chain means); the
    estimate must sit within 4 of them, and the chains must mix well enough for that to be tight."""
    import numpy as np

    sp = _sbi_problems()
    rng = np.random.default_rng(1)
    a = rng.standard_normal((5, 5))
    cov = a @ a.T / 5 + 0.1 * np.eye(5)
    prec, mean = np.linalg.inv(cov), np.arange(5.0)

    def log_density(x):
        d = x - mean
        return -0.5 * np.einsum("ni,ij,nj->n", d, prec, d)

    chains, per_chain = 100, 40
    start = mean + rng.standard_normal((chains, 5))
    s = sp.metropolis(log_density, start, per_chain, rng, burn=2000, thin=10).reshape(chains, per_chain, 5)
    se = s.mean(1).std(0) / np.sqrt(chains)
    assert np.all(se < 0.05 * np.sqrt(np.diag(cov)))
    assert np.all(np.abs(s.reshape(-1, 5).mean(0) - mean) < 4 * se)
    assert np.allclose(np.cov(s.reshape(-1, 5).T), cov, atol=0.1 * np.diag(cov).max())


def test_slcp_likelihood_and_reference_symmetry():
    import numpy as np

    stats = pytest.importorskip("scipy.stats")
    sp = _sbi_problems()
    slcp = sp.SLCP()
    rng = np.random.default_rng(2)
    theta, y = slcp.joint(3, rng)
    for t, obs in zip(theta, y):
        s1, s2, rho = t[2] ** 2, t[3] ** 2, np.tanh(t[4])
        cov = [[s1 * s1, rho * s1 * s2], [rho * s1 * s2, s2 * s2]]
        exact = stats.multivariate_normal(t[:2], cov).logpdf(obs.reshape(4, 2)).sum()
        assert abs(slcp.log_likelihood(t[None], obs)[0] - exact) < 1e-9
    ref = slcp.reference_posterior(y[0], 4000, rng)
    assert ref.shape == (4000, 5) and slcp.in_support(ref).all()
    for k in (2, 3):  # the likelihood sees t3^2 and t4^2: each sign half the mass (binomial, 4 sd)
        assert abs((ref[:, k] > 0).mean() - 0.5) < 4 * 0.5 / np.sqrt(4000)


def test_slcp_chains_start_inside_the_support_when_the_mass_sits_on_its_edge():
    import numpy as np

    sp = _sbi_problems()
    slcp = sp.SLCP()
    rng = np.random.default_rng(0)
    y = slcp.simulate(np.array([[3.0, -3.0, 1.0, 1.0, 0.0]]), rng)[0]
    log_density = slcp._log_folded_posterior(y)
    # candidates exactly on the prior's edge (the jitter pushes half of them out of it)
    cand = np.tile([3.0, -3.0, 1.0, 1.0, 0.0], (50, 1))
    start = slcp.starting_points(log_density, cand, log_density(cand), 200, rng)
    assert np.isfinite(log_density(start)).all()
    assert len(np.unique(start, axis=0)) > 1  # jittered where the support allows


def test_bench_posterior_tiny_and_resumable(tmp_path):
    pytest.importorskip("sklearn")
    out, work = tmp_path / "res.json", tmp_path / "work"
    args = ("--problems", "two_moons", "--budgets", "300", "--models", "glow", "spline", "--observations", "1",
            "--samples", "400", "--max-epochs", "3", "--hidden", "8", "--depth", "2", "--out", str(out),
            "--work", str(work))
    proc = run_script("bench_posterior.py", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [r["model"] for r in results] == ["glow", "spline"]
    for r in results:
        assert 0.3 <= r["c2st_mean"] <= 1.0 and r["epochs"] <= 3 and r["inside_support"] > 0
    again = run_script("bench_posterior.py", *args)
    assert again.returncode == 0 and again.stdout.count("done: C2ST") == 2
    table = run_script("bench_posterior.py", "--table", "--out", str(out))
    assert table.returncode == 0 and table.stdout.count("| two_moons | 300 |") == 2


def test_bench_posterior_observations_and_references_stay_matched(tmp_path, monkeypatch):
    """Observation j is the same however many are asked for, and a cached reference made for
    another observation is refused (a run extended to more observations keeps its scores)."""
    import importlib.util

    import numpy as np

    _sbi_problems()
    monkeypatch.syspath_prepend(SCRIPTS)  # its sibling sbi_problems (a script run as a file has its folder on the path)
    spec = importlib.util.spec_from_file_location("invnet_bench_posterior", os.path.join(SCRIPTS, "bench_posterior.py"))
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    problem = bench.PROBLEMS["gaussian_linear"]()
    _, few = bench.observations(problem, 2)
    _, many = bench.observations(problem, 7)
    assert np.array_equal(few, many[:2])
    ref = bench.reference_samples(problem, many[0], 0, 200, str(tmp_path))
    assert np.array_equal(bench.reference_samples(problem, many[0], 0, 200, str(tmp_path)), ref)
    with pytest.raises(ValueError, match="another observation"):
        bench.reference_samples(problem, many[1], 0, 200, str(tmp_path))


@pytest.mark.timeout(300)
@pytest.mark.skipif(__import__("shutil").which("mpiexec") is None, reason="mpiexec is not on PATH (pip install mpich)")
def test_bench_distributed_tiny():
    """The scaling script runs through the Trainer and a ParallelStrategy on 2 ranks: strong
    scaling with the exact live bytes, and the memory fit."""
    import shutil

    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    base = ["timeout", "-s", "KILL", "240", shutil.which("mpiexec"), "-n", "2", sys.executable, "-m", "mpi4py",
            os.path.join(SCRIPTS, "bench_distributed.py")]
    proc = subprocess.run(base + ["--mode", "strong", "--size", "16", "--levels", "1", "--depth", "1", "--steps", "2",
                                  "--trace", "--overhead", "--bind"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=270)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["local"] == [8, 16, 16] and len(record["live_peak_mb"]) == 2 and record["step_s"] > 0
    assert 0 < record["halo_fraction_min"] <= record["halo_fraction_max"] < 1
    # per-rank phases of the step, and the serial step of each rank's own subdomain beside it
    phases = record["phases_s"]
    assert set(phases) == {"forward", "loss_mean", "backward", "grad_allreduce", "update", "halo_s"}
    assert all(len(v) == 2 for v in phases.values()) and min(phases["forward"] + phases["backward"]) > 0
    for key in ("serial_step_s", "decomposition_overhead", "serial_alone_step_s", "contention",
                "decomposition_overhead_cpu", "contention_cpu"):
        assert len(record[key]) == 2 and all(v > 0 for v in record[key]), key
    assert len(record["binding"]) == 2 and len(record["cpu_user_s"]) == 2
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
    # the workers run under jemalloc where it is installed, as invnet train does; --allocator system keeps glibc
    assert {r["allocator"] for r in record["results"]} == {"jemalloc" if host_allocator.find_jemalloc() else "system"}
    proc = run_script("bench_kernels.py", "--allocator", "system", "--nets", "chain", "--sizes", "8", "--batches", "1",
                      "--threads", "1", "--repeats", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["allocator"] for r in json.loads(out.read_text())["results"]] == ["system"]


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


def test_demo_calibration_on_a_tiny_demo(tmp_path):
    from invnet.cli import main

    demo = tmp_path / "demo"
    assert main(["demo", "--size", "tiny", "--out", str(demo)]) == 0
    proc = run_script("demo_calibration.py", str(demo), "--observations", "3", "--samples", "12")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = proc.stdout.strip().splitlines()[-1]
    assert row.startswith(f"| {demo} |") and "TARP" in row
    proc = run_script("demo_calibration.py", str(demo), "--observations", "50")
    assert proc.returncode != 0 and "held-out pairs" in proc.stderr
    proc = run_script("demo_calibration.py", str(tmp_path))
    assert proc.returncode != 0 and "not a finished `invnet demo` folder" in proc.stderr
