"""`invnet train` on pairs simulated on the fly (`[data] source`), with a model and a loss named
by entry point (`[model] type = "module:Name"`, `[training] loss = "module:function"`): the hooks
the applications use (docs/config.md, "Simulators and your own model or loss")."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from invnet.cli import main as invnet_main
from invnet.data import Shard, SimulatedPairs, simulated_set
from invnet.training import read_checkpoint, train_from_config, validate_config

HERE = __name__  # this module, as the entry points below name it


def simulate(n: int, generator: torch.Generator, dim: int = 2, noise: float = 0.1):
    """x ~ N(0, I_dim), y = x_0 + noise e: a tiny linear-Gaussian simulator."""
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return x, x[:, :1] + noise * torch.randn(n, 1, generator=generator, dtype=torch.float64)


def simulate_field(n: int, generator: torch.Generator, size: int = 8):
    """Fields x (n, 1, size, size) and y = x + noise on the same grid, as numpy (a numpy simulator)."""
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    x = rng.normal(size=(n, 1, size, size))
    return x, x + 0.1 * rng.normal(size=x.shape)


class Regressor(nn.Module):
    """A model that is no flow: y -> x by a linear map (trained on a squared error)."""

    def __init__(self, dim: int, hidden: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, dim))


def squared_error(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return (model.net(y) - x).pow(2).sum(1)


def _raw(tmp_path, steps: int = 6, out: str = "run", **training) -> dict:
    return {
        "data": {"source": f"{HERE}:simulate", "arguments": {"dim": 2, "noise": 0.2}, "validation_size": 20},
        "model": {"type": "ConditionalCouplingFlow", "depth": 2, "hidden": 8},
        "optimizer": {"name": "Adam", "lr": 1e-2},
        "training": {"out_dir": str(tmp_path / out), "steps": steps, "batch_size": 16, "validate_every": 3,
                     "log_every": 1, "progress": False, "device": "cpu", **training},
    }


def _config(tmp_path, steps: int = 6, out: str = "run", **training) -> dict:
    return validate_config(_raw(tmp_path, steps, out, **training))


def test_simulated_pairs_train_validate_and_resume_exactly(tmp_path):
    straight = train_from_config(_config(tmp_path, 8, "straight", checkpoint_every_steps=4))
    assert straight.status == "finished" and straight.last_val_loss is not None
    first = train_from_config(_config(tmp_path, 4, "split"))
    assert first.step == 4
    resumed = train_from_config(_config(tmp_path, 8, "split"))  # more steps: a resume, not a new run
    a, b = read_checkpoint(straight.checkpoint), read_checkpoint(resumed.checkpoint)
    for k in a.weights:
        assert torch.equal(a.weights[k], b.weights[k]), k
    assert a.meta["data"]["source"] == f"{HERE}:simulate" and a.meta["data"]["arguments"] == {"dim": 2, "noise": 0.2}
    assert a.meta["normalization"] == {"x_mean": [0.0, 0.0], "x_std": [1.0, 1.0], "y_mean": [0.0], "y_std": [1.0]}
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9)) and "val_bpd" in records[2]


def test_changed_simulator_arguments_are_refused_on_resume(tmp_path):
    train_from_config(_config(tmp_path, 2))
    cfg = _config(tmp_path, 4)
    cfg["data"]["arguments"] = {"dim": 2, "noise": 0.5}
    with pytest.raises(ValueError, match=r"\[data\] arguments"):
        train_from_config(cfg)


def test_model_and_loss_named_by_entry_point(tmp_path):
    raw = _raw(tmp_path, 30, loss=f"{HERE}:squared_error")
    raw["model"] = {"type": f"{HERE}:Regressor", "dim": 2, "hidden": 8}
    raw["data"]["validation_size"] = 400
    cfg = validate_config(raw)  # the open section checks the class's own arguments
    result = train_from_config(cfg)
    # learns E[x | y]: the best squared error is 1.04 (x_1 is independent of y), an untrained model's about 2
    assert result.loss_name == "loss" and result.last_val_loss < 1.4
    ckpt = read_checkpoint(result.checkpoint)
    assert ckpt.meta["spec"] == {"type": f"{HERE}:Regressor", "dim": 2, "hidden": 8}


def test_bad_simulator_configs_are_one_line_errors(tmp_path):
    base = {"training": {"out_dir": str(tmp_path / "r"), "steps": 1}}
    cases = [
        ({"path": "d.h5", "source": f"{HERE}:simulate"}, "either path .* or source"),
        ({}, "either path .* or source"),
        ({"source": "no_such_module_xyz:simulate"}, "cannot import 'no_such_module_xyz'"),
        ({"source": f"{HERE}:nothing_here"}, "has no 'nothing_here'"),
        ({"source": "simulate"}, "entry point"),
        ({"path": "d.h5", "arguments": {"a": 1}}, "belong to a simulator"),
        ({"source": f"{HERE}:simulate", "patch": [4]}, "read a file"),
        ({"source": f"{HERE}:simulate", "arguments": {"dims": 3}},
         r"\[data\] arguments: unknown key\(s\) \['dims'\] for simulate; allowed: \['dim', 'noise'\]"),
        ({"source": f"{HERE}:simulate", "arguments": {"dim": "two"}}, r"\[data\] arguments dim must be an integer"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError, match=message):
            validate_config({"data": data, **base})
    with pytest.raises(ValueError, match=r"\[training\] loss 'math:nope'"):
        validate_config({"data": {"source": f"{HERE}:simulate"}, "training": {**base["training"], "loss": "math:nope"}})
    with pytest.raises(ValueError, match="unknown key"):
        validate_config({"data": {"source": f"{HERE}:simulate"}, "model": {"type": f"{HERE}:Regressor", "dim": 2,
                                                                           "depth": 3}, **base})
    assert not (tmp_path / "r").exists()


def test_a_simulator_returning_bad_values_stops_before_anything_is_written(tmp_path):
    cfg = _config(tmp_path)
    cfg["data"]["arguments"] = {"dim": 2, "noise": float("nan")}
    with pytest.raises(ValueError, match="NaN or Inf"):
        train_from_config(cfg)
    assert not (tmp_path / "run").exists()


def test_invnet_train_command_on_a_simulator(tmp_path, capsys):
    (tmp_path / "c.toml").write_text(
        f'[data]\nsource = "{HERE}:simulate_field"\narguments = {{ size = 8 }}\nvalidation_size = 4\n'
        '[model]\ntype = "ConditionalGlow"\nlevels = 1\ndepth = 1\nhidden = 4\n'
        '[training]\nout_dir = "run"\nsteps = 2\nbatch_size = 4\nprogress = false\n')
    assert invnet_main(["train", str(tmp_path / "c.toml")]) == 0
    printed = capsys.readouterr().out
    assert "finished at step 2" in printed
    assert "no validation pairs" not in printed  # the simulator's fixed validation set counts
    assert read_checkpoint(str(tmp_path / "run")).meta["data"]["x_shape"] == [1, 8, 8]


def test_subdomains_of_simulated_batches_assemble_the_whole():
    whole = SimulatedPairs(simulate_field, 3, seed=4, arguments={"size": 8}).next_batch()
    parts = [SimulatedPairs(simulate_field, 3, seed=4, arguments={"size": 8},
                            shard=Shard(0, 1, (i, j), (2, 2))).next_batch() for i in range(2) for j in range(2)]
    x = torch.cat([torch.cat([parts[0][0], parts[1][0]], 3), torch.cat([parts[2][0], parts[3][0]], 3)], 2)
    assert torch.equal(x, whole[0])
    groups = [SimulatedPairs(simulate, 4, seed=1, shard=Shard(g, 2)).next_batch()[0] for g in range(2)]
    assert not torch.equal(groups[0], groups[1])  # each batch group its own samples
    val = simulated_set(simulate, 6, 4, seed=2)
    halves = [simulated_set(simulate, 6, 4, seed=2, shard=Shard(g, 2)) for g in range(2)]
    assert torch.equal(torch.cat([b[0] for h in halves for b in h]), torch.cat([b[0] for b in val]))
