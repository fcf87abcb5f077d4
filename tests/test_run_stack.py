"""The trainer's run stack on one process: batch sources and losses of any kind, devices,
checkpoints that do not depend on the device, precision names, the parallel strategy's checks.
(CUDA tests skip with a reason where no GPU is present; tests/test_mpi_jobs.py runs the grids.)"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from invnet.data import ArraySource, BatchLoader, PairDataset
from invnet.distributed import ParallelStrategy, SerialComm
from invnet.networks import ConditionalCouplingFlow, ConditionalGlow, Glow, ImageSummary, VectorSummary
from invnet.training import (
    Precision,
    Trainer,
    read_checkpoint,
    resolve_device,
    resume_differences,
    to_device,
    trainer_from_config,
    validate_config,
)
from invnet.training.device import device_assignment

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


class SimulatedPairs:
    """A batch source that is not a file: dicts {"unknown", "data"} drawn from a seeded
    generator per step (the shape of a simulator source), with an exactly restorable position."""

    def __init__(self, batch: int, seed: int = 0) -> None:
        self.batch, self.seed, self.step = batch, seed, 0

    def next_batch(self) -> dict:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.step)
        self.step += 1
        x = torch.randn(self.batch, 2, generator=g)
        return {"unknown": x, "data": x[:, :1] + 0.1 * torch.randn(self.batch, 1, generator=g)}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = state["seed"], state["step"]


def nats_loss(model, batch):  # per-sample negative log-likelihood in nats, on dict batches
    return -model.log_prob(batch["unknown"], batch["data"])


def test_any_batch_source_and_loss_train_checkpoint_and_resume_exactly(tmp_path):
    def make(out, steps):
        torch.manual_seed(0)
        net = ConditionalCouplingFlow(2, 1, ndim=0, depth=2, hidden=8)
        opt = torch.optim.Adam(net.parameters(), 1e-2)
        return Trainer(net, opt, SimulatedPairs(16), str(tmp_path / out), steps, loss_fn=nats_loss,
                       validation=lambda: [SimulatedPairs(8, seed=9).next_batch()], validate_every=2,
                       checkpoint_every_steps=2, progress=False, device="cpu")

    straight = make("straight", 6)
    result = straight.fit()
    assert result.status == "finished" and result.loss_name == "loss"
    records = straight.metrics.read()
    assert [r["step"] for r in records] == list(range(1, 7)) and "train_loss" in records[0]
    assert {r["step"] for r in records if "val_loss" in r} == {2, 4, 6}
    first = make("split", 4)
    first.fit()
    second = make("split", 6)
    assert second.resume() and second.step == 4
    second.fit()
    assert [r["train_loss"] for r in second.metrics.read()] == [r["train_loss"] for r in records]
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    meta = read_checkpoint(result.checkpoint).meta
    assert meta["loss_name"] == "loss" and meta["run"]["grid"] == [1] and meta["run"]["precision"] == "float32"
    assert os.path.exists(tmp_path / "straight" / "metrics.png")


def test_the_drift_guard_needs_to_know_what_to_rebuild_for_a_custom_loss(tmp_path):
    net = ConditionalCouplingFlow(2, 1, ndim=0, depth=1, hidden=4)
    with pytest.raises(ValueError, match="drift_inputs"):
        Trainer(net, torch.optim.SGD(net.parameters(), 0.1), SimulatedPairs(4), str(tmp_path), 2, loss_fn=nats_loss,
                drift_check_every=1)


def test_a_loss_that_is_not_per_sample_is_refused(tmp_path):
    net = ConditionalCouplingFlow(2, 1, ndim=0, depth=1, hidden=4)
    trainer = Trainer(net, torch.optim.SGD(net.parameters(), 0.1), SimulatedPairs(4), str(tmp_path), 2,
                      loss_fn=lambda m, b: nats_loss(m, b).mean(), progress=False)
    with pytest.raises(ValueError, match="one loss per sample"):
        trainer.fit()


# ---------------------------------------------------------------- devices
def test_device_names(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")  # auto picks the CPU without CUDA
    with pytest.raises(ValueError, match=r"needs CUDA.*device = \"cpu\""):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="one of auto, cpu, cuda, cuda:N"):
        resolve_device("gpu0")
    assert device_assignment(torch.device("cpu"), SerialComm()) == "computing on cpu"


def test_each_rank_takes_the_gpu_of_its_node_local_rank(monkeypatch):
    class NodeComm(SerialComm):  # rank 5 of the job, the 3rd process on its node
        def node_local(self):
            return 2, 4

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", NodeComm()) == torch.device("cuda", 0)  # 4 ranks share 2 GPUs: 2 % 2
    assert resolve_device("cuda:1", NodeComm()) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="sees 2 GPU"):
        resolve_device("cuda:2")


def test_batches_move_to_the_device_whatever_their_structure():
    x = torch.ones(2)
    batch = {"a": (x, [x]), "n": 3}
    moved = to_device(batch, torch.device("meta"))
    assert moved["a"][0].device.type == "meta" and moved["a"][1][0].device.type == "meta" and moved["n"] == 3


def _pairs(n=16):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2)).astype("f4")
    return PairDataset(ArraySource(x, "x"), ArraySource(x[:, :1] + 0.1, "y"))


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
def test_a_checkpoint_is_device_independent(tmp_path):
    """Saved on the CPU as plain CPU tensors, and loaded onto another device: the weights and
    the optimizer state land there ("meta" stands for a GPU on this CPU-only machine: the same
    path, map to the parameters' device)."""
    net = ConditionalCouplingFlow(2, 1, ndim=0, depth=1, hidden=4)
    trainer = Trainer(net, torch.optim.Adam(net.parameters(), 1e-2), BatchLoader(_pairs(), range(16), 8),
                      str(tmp_path / "run"), 2, progress=False, device="cpu")
    path = trainer.fit().checkpoint
    state = torch.load(os.path.join(path, "state.pt"), map_location="meta", weights_only=True)  # no device needed
    assert state["optimizer"]["state"][0]["exp_avg"].device.type == "meta"

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    assert all(t.device.type == "cpu" for t in tensors(read_checkpoint(path).state))
    other = ConditionalCouplingFlow(2, 1, ndim=0, depth=1, hidden=4)
    resumed = Trainer(other, torch.optim.Adam(other.parameters(), 1e-2), BatchLoader(_pairs(), range(16), 8),
                      str(tmp_path / "run"), 4, progress=False, device=torch.device("meta"))
    assert resumed.resume() and resumed.step == 2
    assert all(p.device.type == "meta" for p in other.parameters())
    moments = [s["exp_avg"] for s in resumed.optimizer.state.values()]
    assert moments and all(m.device.type == "meta" for m in moments)


@CUDA
def test_a_run_trained_on_the_gpu_resumes_and_samples_on_the_cpu(tmp_path):
    from invnet.inference import PosteriorSampler

    net = ConditionalCouplingFlow(2, 1, ndim=0, depth=1, hidden=4)
    gpu = Trainer(net, torch.optim.Adam(net.parameters(), 1e-2), BatchLoader(_pairs(), range(16), 8),
                  str(tmp_path / "run"), 2, progress=False, device="cuda", spec=None)
    gpu.fit()
    other = ConditionalCouplingFlow(2, 1, ndim=0, depth=1, hidden=4)
    cpu = Trainer(other, torch.optim.Adam(other.parameters(), 1e-2), BatchLoader(_pairs(), range(16), 8),
                  str(tmp_path / "run"), 4, progress=False, device="cpu")
    assert cpu.resume() and cpu.fit().step == 4
    assert PosteriorSampler(other).sample(3, torch.zeros(1)).device.type == "cpu"


# ---------------------------------------------------------------- precision
def test_precision_names_and_the_older_dtype_key(tmp_path):
    base = {"data": {"path": "d.h5"}, "training": {"out_dir": "r", "steps": 2}}
    cfg = validate_config({**base, "training": {**base["training"], "dtype": "float64"}})
    assert cfg["training"]["precision"] == "float64" and "dtype" not in cfg["training"]
    with pytest.raises(ValueError, match="both 'dtype'.*keep only 'precision'"):
        validate_config({**base, "training": {**base["training"], "dtype": "float64", "precision": "float64"}})
    with pytest.raises(ValueError, match=r"precision must be one of \['float32', 'bfloat16', 'float16', 'float64'\]"):
        validate_config({**base, "training": {**base["training"], "precision": "half"}})
    # a run stored by an older invnet (dtype) resumes under a config that says precision
    old = validate_config(base)
    old["training"].pop("precision")
    old["training"]["dtype"] = "float32"
    assert resume_differences(json.loads(json.dumps(old)), validate_config(base)) == []
    assert Precision("float16").grad_scaler(torch.device("cpu")) is not None
    assert Precision.of_model(torch.nn.Linear(1, 1).double()).name == "float64"


# ---------------------------------------------------------------- the strategy's checks
def test_the_strategy_refuses_what_a_grid_cannot_run_before_any_message():
    with pytest.raises(ValueError, match="needs 2 ranks but the job has only 1"):
        ParallelStrategy((8, 8), (1, 2, 1))
    s = ParallelStrategy((8, 8))
    assert s.kind == "serial" and s.shard().splits_space is False
    s.check_data((1, 8, 8), (3,))
    with pytest.raises(ValueError, match="space shape"):
        s.check_data((1, 8, 4))


class _Split(ParallelStrategy):
    """A strategy that believes space is split in two along the first axis, without a second
    process: its checks are local arithmetic, so they run here as on every rank."""

    def __init__(self, space, grid):
        from invnet.distributed import Partition

        class TwoRanks(SerialComm):
            size = 2

        self.comm = TwoRanks()
        part = Partition.__new__(Partition)
        part.space_shape, part.grid, part.world = tuple(space), tuple(grid), self.comm
        part.local_space_shape = tuple(n // p for n, p in zip(space, grid[1:]))
        part.batch_ranks, part.space_grid, part.spatial_size = grid[0], tuple(grid[1:]), int(np.prod(grid[1:]))
        part.ndim, part.levels = len(space), 0
        self.partition = part


def test_decomposition_checks_name_what_cannot_be_split():
    s = _Split((12, 8), (1, 2, 1))
    with pytest.raises(ValueError, match="squeeze level 2"):
        s.check_network(Glow(1, hidden=4, levels=2, depth=1, ndim=2))
    image = ConditionalGlow(1, 2, hidden=4, levels=1, depth=1, ndim=2, summary=ImageSummary(1, 2, out_size=(12, 8)))
    with pytest.raises(ValueError, match="summary network ImageSummary .* cannot be decomposed"):
        s.check_network(image)
    vector = ConditionalGlow(1, 2, hidden=4, levels=1, depth=1, ndim=2, vector_condition=True,
                             summary=VectorSummary(12, 2))
    s.check_network(vector)  # a summary to a vector is replicated: fine
    with pytest.raises(ValueError, match="observation must live on the grid of x"):
        s.check_data((1, 12, 8), (1, 6, 4))
    s.check_data((1, 12, 8), (1, 12, 8))
    s.check_data((1, 12, 8), (5,))


def test_a_config_grid_that_does_not_fit_is_one_line_and_writes_nothing(tmp_path):
    import h5py

    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"] = np.zeros((8, 1, 8, 8), "f4")
        f["y"] = np.zeros((8, 1, 8, 8), "f4")
    cfg = validate_config({"data": {"path": "d.h5"}, "training": {"out_dir": "run", "steps": 1},
                           "distributed": {"grid": [1, 2, 1]}}, str(tmp_path))
    with pytest.raises(ValueError, match=r"\[distributed\] grid: grid \(1, 2, 1\) needs 2 ranks"):
        trainer_from_config(cfg)
    assert not os.path.exists(tmp_path / "run")


def test_a_memory_budget_trains_the_same_run_and_plans_once(tmp_path):
    """``memory_budget`` (the Trainer argument behind ``[training] memory_budget``): float64
    training with half the activations kept gives the run without a budget, and the network's
    plan is made once (the first step measures) and kept."""
    import invnet

    def run(out, budget):
        torch.manual_seed(0)
        net = ConditionalCouplingFlow(2, 1, ndim=0, depth=3, hidden=8).double()
        trainer = Trainer(net, torch.optim.SGD(net.parameters(), 1e-2), SimulatedPairs(16), str(tmp_path / out), 4,
                          loss_fn=lambda m, b: nats_loss(m, {k: v.double() for k, v in b.items()}),
                          memory_budget=budget, progress=False, device="cpu")
        trainer.fit()
        return trainer, [r["train_loss"] for r in trainer.metrics.read()]

    _, reference = run("none", None)
    measured, _ = run("measure", "1GB")
    half = sum(invnet.memory_plans(measured.model)[0].nbytes) // 2
    trainer, losses = run("half", half)
    assert max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-12 * max(abs(v) for v in reference)
    (plan,) = invnet.memory_plans(trainer.model)
    assert any(plan.keep) and not all(plan.keep) and plan.kept_bytes <= half
    with pytest.raises(ValueError, match="memory budget"):
        run("bad", "lots")


def test_memory_budget_config_key(tmp_path):
    base = {"data": {"path": "d.h5"}, "training": {"out_dir": "r", "steps": 2}}
    assert validate_config(base)["training"]["memory_budget"] is None
    for value in ("2GB", 0, 1.5e9, "unlimited"):
        assert validate_config({**base, "training": {**base["training"], "memory_budget": value}})
    with pytest.raises(ValueError, match=r"\[training\] memory_budget must be a byte count"):
        validate_config({**base, "training": {**base["training"], "memory_budget": "2 parsecs"}})
    old = validate_config(base)
    new = validate_config({**base, "training": {**base["training"], "memory_budget": "1GB"}})
    assert resume_differences(json.loads(json.dumps(old)), new) == []  # may change on resume
