import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

import invnet.training.checkpoint as checkpoint_module
from invnet import host_allocator
from invnet.core.checks import gradient_error, invertibility_error, logdet_error, randomize_parameters_
from invnet.networks import ConditionalCouplingFlow
from invnet.training import (
    EXIT_PREEMPTED,
    NonFiniteLossError,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    save_checkpoint,
    trainer_from_config,
    validate_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_data(path, n=48, size=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, size, size)).cumsum(axis=2).astype("f4")
    y = (x + 0.3 * rng.normal(size=x.shape)).astype("f4")
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(8, 1, size, size))
        f.create_dataset("y", data=y, chunks=(8, 1, size, size))
    return path


def config(tmp_path, steps, out="run", **training):
    data = str(tmp_path / "data.h5")
    if not os.path.exists(data):
        make_data(data)
    t = {"out_dir": str(tmp_path / out), "steps": steps, "batch_size": 8, "log_every": 1, "progress": False,
         "clip_grad_norm": 5.0, "validate_every": 3, **training}
    return validate_config({
        "data": {"path": data, "validation_fraction": 0.25, "patch": [4, 8]},
        "model": {"type": "ConditionalCouplingFlow", "depth": 2, "hidden": 8},
        "optimizer": {"name": "Adam", "lr": 1e-2},
        "scheduler": {"name": "StepLR", "step_size": 2, "gamma": 0.7},
        "training": t,
    })


@pytest.mark.parametrize("shapes", [((2, 1, 4, 4), (2, 2, 4, 4)), ((3, 3), (3, 2)), ((2, 2, 4, 4), (2, 3)),
                                    ((2, 1, 2, 2, 2), (2, 1, 2, 2, 2))])
def test_conditional_coupling_flow_is_exact(shapes):
    xs, cs = shapes
    ndim = len(xs) - 2
    flow = ConditionalCouplingFlow(xs[1], cs[1], ndim, depth=2, hidden=4,
                                   vector_condition=len(cs) == 2 and ndim > 0).double()
    x, c = torch.randn(xs, dtype=torch.float64), torch.randn(cs, dtype=torch.float64)
    flow(x, c)
    randomize_parameters_(flow, 0.3)
    assert invertibility_error(flow, x, c) < 1e-12
    assert logdet_error(flow, x, c) < 1e-10
    assert gradient_error(flow, x, c) < 1e-10


def test_resume_gives_the_same_run_bitwise(tmp_path):
    straight = trainer_from_config(config(tmp_path, 8, "straight"))
    straight.fit()
    first = trainer_from_config(config(tmp_path, 4, "split"))
    assert first.fit().step == 4
    second = trainer_from_config(config(tmp_path, 8, "split"))  # picks up step 4 from split/checkpoints
    assert second.step == 4
    second.fit()
    a, b = straight.metrics.read(), second.metrics.read()
    assert [(r["step"], r["train_bpd"]) for r in a] == [(r["step"], r["train_bpd"]) for r in b] and len(a) == 8
    # validation every 3 steps agrees too (the stopped run also validated at its own last step, 4)
    val_a = {r["step"]: r["val_bpd"] for r in a if "val_bpd" in r}
    val_b = {r["step"]: r["val_bpd"] for r in b if "val_bpd" in r}
    assert val_a == {k: v for k, v in val_b.items() if k != 4} and set(val_a) == {3, 6, 8}
    for (k, v), (k2, v2) in zip(straight.model.state_dict().items(), second.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert straight.optimizer.param_groups[0]["lr"] == second.optimizer.param_groups[0]["lr"]


def test_checkpoint_write_that_fails_midway_keeps_the_previous_one(tmp_path, monkeypatch):
    d = str(tmp_path / "ck")
    save_checkpoint(d, 1, {"w": torch.ones(3)}, {"s": 1}, {"m": 1})

    def broken_save(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(d, 2, {"w": torch.zeros(3)}, {"s": 2}, {"m": 2})
    monkeypatch.undo()
    assert [os.path.basename(p) for p in list_checkpoints(d)] == ["step-00000001"]
    assert os.listdir(d) == ["step-00000001"]  # the half-written temporary folder is gone
    ck = read_checkpoint(d)
    assert ck.step == 1 and torch.equal(ck.weights["w"], torch.ones(3))


def test_a_killed_write_leaves_a_usable_checkpoint(tmp_path):
    # a separate process is SIGKILLed while writing checkpoint 2 (its write sleeps midway)
    d = str(tmp_path / "ck")
    save_checkpoint(d, 1, {"w": torch.ones(3)}, {"s": 1}, {"m": 1})
    code = f"""
import time, torch, invnet.training.checkpoint as c
orig = c._write_files
def slow(tmp, *a):
    open(tmp + "/model.safetensors", "wb").write(b"partial")
    print("writing", flush=True); time.sleep(60)
c._write_files = slow
c.save_checkpoint({d!r}, 2, {{"w": torch.zeros(3)}}, {{}}, {{}})
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    assert read_checkpoint(d).step == 1
    save_checkpoint(d, 3, {"w": torch.zeros(3)}, {}, {})  # the next save cleans the leftover
    assert sorted(os.listdir(d)) == ["step-00000001", "step-00000003"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = trainer_from_config(config(tmp_path, 6, checkpoint_every_steps=1))
    original = trainer.model.bits_per_dim

    def poisoned(x, c):
        out = original(x, c)
        return out * float("nan") if trainer.step == 3 else out

    trainer.model.bits_per_dim = poisoned
    with pytest.raises(NonFiniteLossError, match=r"step 4.*step-00000003"):
        trainer.fit()
    assert read_checkpoint(latest_checkpoint(trainer.checkpoint_dir)).step == 3


ALLOCATOR_VARIABLES = ("LD_PRELOAD", "MALLOC_CONF", "INVNET_ALLOCATOR", "INVNET_JEMALLOC",
                       "INVNET_ALLOCATOR_RELAUNCHED")


def train_then_signal(cfg_path, metrics, sig):
    """`invnet train CFG` in a subprocess; once two metrics lines are written, send `sig`."""
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARIABLES}  # the command's own choice
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "invnet", "train", cfg_path], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc, out, err


def test_sigterm_writes_a_checkpoint_and_exits_with_the_documented_code(tmp_path):
    cfg_path = tmp_path / "train.toml"
    make_data(str(tmp_path / "data.h5"))
    cfg_path.write_text("""
[data]
path = "data.h5"
[model]
type = "ConditionalCouplingFlow"
depth = 1
hidden = 4
[training]
out_dir = "run"
steps = 100000
batch_size = 8
log_every = 1
progress = false
""")
    metrics = tmp_path / "run" / "metrics.jsonl"
    proc, out, err = train_then_signal(str(cfg_path), metrics, signal.SIGTERM)
    assert proc.returncode == EXIT_PREEMPTED, err
    ck = read_checkpoint(str(tmp_path / "run"))
    assert 2 <= ck.step < 100000
    assert "preempted" in out
    # the command runs under jemalloc where it is installed (relaunched by invnet/host_allocator.py)
    assert ("host allocator: jemalloc" in out) == (host_allocator.find_jemalloc() is not None), out
    steps_logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps_logged[-1] == ck.step


def test_sigterm_during_setup_stops_before_anything_is_written(tmp_path, monkeypatch):
    import invnet.training.run as run_module
    from invnet.training import train_from_config

    cfg = config(tmp_path, 2)
    original = run_module.data_moments

    def interrupted(*args, **kwargs):  # the batch system's SIGTERM arrives while the data are checked
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "data_moments", interrupted)
    result = train_from_config(cfg)
    assert result.status == "preempted" and result.step == 0 and result.checkpoint is None
    assert not os.path.exists(os.path.join(cfg["training"]["out_dir"], "config.json"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(run_module, "data_moments", original)
    result = train_from_config(cfg)  # rerunning the same command just trains
    assert result.status == "finished" and result.step == 2


def test_config_errors_name_the_allowed_keys(tmp_path):
    base = {"data": {"path": "d.h5"}, "training": {"out_dir": "r", "steps": 2}}
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['trainig'\]; allowed sections"):
        validate_config(dict(base, trainig={}))
    with pytest.raises(ValueError, match=r"\[training\]: unknown key\(s\) \['step'\]; allowed: \['out_dir', 'steps'"):
        validate_config({"data": {"path": "d.h5"}, "training": {"out_dir": "r", "steps": 2, "step": 1}})
    with pytest.raises(ValueError, match=r"\[training\] needs the key 'steps'"):
        validate_config({"data": {"path": "d.h5"}, "training": {"out_dir": "r"}})
    with pytest.raises(ValueError, match="unknown key.*'lrr'.*Adam; allowed: \\['lr'"):
        validate_config(dict(base, optimizer={"name": "Adam", "lrr": 1}))
    with pytest.raises(ValueError, match="unknown network type|unknown type"):
        validate_config(dict(base, model={"type": "Nope"}))
    with pytest.raises(ValueError, match="wrong type"):
        validate_config({"data": {"path": "d.h5"}, "training": {"out_dir": "r", "steps": "2"}})
    make_data(str(tmp_path / "d.h5"))
    # the network's keys are checked with the config now, before the data are opened
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['depthh'\].*allowed"):
        trainer_from_config(validate_config(dict(base, model={"type": "ConditionalCouplingFlow", "depthh": 2}),
                                            str(tmp_path)))
    assert not os.path.exists(str(tmp_path / "r"))  # nothing written before the error


def test_checkpoint_rebuilds_a_network_with_a_summary_network(tmp_path):
    from invnet.inference import PosteriorSampler

    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "lowres.h5", "w") as f:
        f["x"] = rng.normal(size=(16, 1, 8, 8)).astype("f4")
        f["y"] = rng.normal(size=(16, 2, 4, 4)).astype("f4")  # observations on a coarser grid
    cfg = validate_config({
        "data": {"path": "lowres.h5", "validation_fraction": 0.0},
        "model": {"type": "ConditionalGlow", "hidden": 4, "levels": 1, "depth": 1,
                  "summary": {"type": "ImageSummary", "hidden": 4, "out_channels": 3}},
        "training": {"out_dir": "run", "steps": 2, "batch_size": 8, "progress": False},
    }, str(tmp_path))
    result = trainer_from_config(cfg).fit()
    spec = read_checkpoint(result.checkpoint).meta["spec"]
    assert spec["cond_channels"] == 3 and spec["summary"]["in_channels"] == 2 and spec["summary"]["out_size"] == [8, 8]
    sampler = PosteriorSampler.from_checkpoint(str(tmp_path / "run"))
    assert sampler.sample(3, torch.zeros(2, 4, 4)).shape == (3, 1, 8, 8)
