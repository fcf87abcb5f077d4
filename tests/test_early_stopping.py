"""Early stopping on the validation loss, the best-by-validation checkpoint, ReduceLROnPlateau, and
`--checkpoint best|last|step-N` (issue 17: training that does not overfit by default).

The trainer-level tests script the validation curve (the validation loss is a chosen number per
step) while the weights train for real in float64, so the step where training must stop, the
step whose weights are best and the learning rates a plateau scheduler must set are known in
advance."""
from __future__ import annotations

import json
import os
import signal

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from invnet.cli import main
from invnet.networks import ConditionalCouplingFlow
from invnet.training import Trainer, read_checkpoint, validate_config
from invnet.training.checkpoint import best_checkpoint, list_checkpoints
from invnet.training.checkpoint_choice import choose_checkpoint
from invnet.training.early_stopping import EarlyStopping

#: the scripted validation loss at each validation step (validate_every = 2): best at step 8, then
#: four validations without a better loss, so patience 4 stops at step 16
CURVE = {2: 5.0, 4: 4.0, 6: 4.2, 8: 3.0, 10: 3.5, 12: 3.4, 14: 3.3, 16: 3.2, 18: 1.0, 20: 0.5}


class Pairs:
    """Fresh (x, y) pairs per step from a seeded generator; the position is the step."""

    def __init__(self, batch: int = 16) -> None:
        self.batch, self.step = batch, 0

    def next_batch(self):
        g = torch.Generator().manual_seed(1000 + self.step)
        self.step += 1
        x = torch.randn(self.batch, 2, generator=g, dtype=torch.float64)
        return x, x[:, :1] + 0.3 * torch.randn(self.batch, 1, generator=g, dtype=torch.float64)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class Scripted:
    """A loss whose training part is the real NLL and whose validation part is CURVE at the
    trainer's current step; it also keeps the weights seen at each validation, and can send
    this process a SIGTERM while computing a chosen step."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.trainer, self.kill_at, self.weights_at = None, kill_at, {}

    def __call__(self, model, batch):
        if batch == "validation":
            step = self.trainer.step
            self.weights_at[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return torch.full((1,), CURVE[step], dtype=torch.float64)
        if self.kill_at is not None and self.trainer.step + 1 == self.kill_at:
            self.kill_at = None
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer finishes this step, checkpoints, stops
        x, y = batch
        return -model.log_prob(x, y)


def make_trainer(out_dir, loss: Scripted, patience=4, steps=20, plateau=False, **kwargs) -> Trainer:
    torch.manual_seed(0)
    net = ConditionalCouplingFlow(2, 1, ndim=0, depth=2, hidden=8).double()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1) if plateau else None
    trainer = Trainer(net, opt, Pairs(), str(out_dir), steps, loss_fn=loss, scheduler=sched,
                      validation=lambda: ["validation"], validate_every=2, patience=patience, progress=False,
                      device="cpu", **kwargs)
    loss.trainer = trainer
    return trainer


def weights_of(path: str) -> dict:
    return load_file(os.path.join(path, "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_counts_validations_since_the_best():
    stop = EarlyStopping(patience=2, min_delta=0.5)
    assert stop.update(1, float("nan")) is False and stop.best_step is None  # NaN never improves
    assert stop.update(2, 3.0) is True and stop.bad == 0
    assert stop.update(3, 2.6) is False  # better, but by less than min_delta
    assert stop.update(4, 2.4) is True and (stop.best_step, stop.best_loss, stop.bad) == (4, 2.4, 0)
    assert not stop.should_stop
    stop.update(5, 2.4), stop.update(6, 9.0)
    assert stop.should_stop
    assert stop.message(6) == ("stopped early at step 6: no better validation loss for 2 validations "
                               "(best 2.4 at step 4)")
    again = EarlyStopping(patience=3)
    again.load_state_dict(stop.state_dict())
    assert (again.best_step, again.bad, again.should_stop) == (4, 2, False)  # more patience on resume goes on
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="patience must be a positive integer"):
            EarlyStopping(bad)
    with pytest.raises(ValueError, match="min_delta"):
        EarlyStopping(3, -0.1)


def test_stops_at_the_right_step_and_keeps_the_best_weights(tmp_path, capsys):
    loss = Scripted()
    trainer = make_trainer(tmp_path / "run", loss, checkpoint_every_steps=1, keep_last=1)
    result = trainer.fit()
    assert (result.status, result.step, result.stopped_early) == ("finished", 16, True)
    assert (result.best_step, result.best_val_loss) == (8, 3.0)
    assert "stopped early at step 16: no better validation loss for 4 validations (best 3 at step 8)" in \
        capsys.readouterr().out
    ck = str(tmp_path / "run" / "checkpoints")
    # keep_last = 1 with a checkpoint every step: only the last step checkpoint and the best remain
    assert [os.path.basename(p) for p in list_checkpoints(ck)] == ["step-00000016"]
    assert result.best_checkpoint == best_checkpoint(ck) == os.path.join(ck, "best")
    best = read_checkpoint(result.best_checkpoint)
    assert best.step == 8 and best.meta["best"] == {"step": 8, "val_loss": 3.0} and best.meta["last_val_loss"] == 3.0
    assert best.state["loader"] == {"step": 8}  # the data position at the best step
    assert same(best.weights, loss.weights_at[8]) and not same(best.weights, loss.weights_at[16])
    assert same(weights_of(os.path.join(ck, "step-00000016")), loss.weights_at[16])
    last = read_checkpoint(os.path.join(ck, "step-00000016"))
    assert last.state["early_stopping"] == {"best_loss": 3.0, "best_step": 8, "bad": 4}
    assert last.meta["best"] == {"step": 8, "val_loss": 3.0}
    vals = [r["val_loss"] for r in trainer.metrics.read() if "val_loss" in r]
    assert vals == [CURVE[s] for s in range(2, 17, 2)]
    with pytest.raises(ValueError, match="holds weights only"):
        make_trainer(tmp_path / "other", Scripted()).resume(result.best_checkpoint)


def test_without_patience_the_run_goes_on_and_still_keeps_the_best(tmp_path):
    loss = Scripted()
    result = make_trainer(tmp_path / "run", loss, patience=None, steps=12).fit()
    assert (result.step, result.stopped_early, result.best_step) == (12, False, 8)
    assert same(read_checkpoint(result.best_checkpoint).weights, loss.weights_at[8])


def test_resume_after_sigterm_in_the_middle_of_patience_is_the_same_run(tmp_path):
    """Interrupted at step 11 (best at 8; the early-stopping count and the plateau scheduler's
    count both at 1), resumed: the same stop step, weights, best weights and learning rates as
    the run never stopped, bitwise in float64."""
    straight_loss = Scripted()
    straight = make_trainer(tmp_path / "straight", straight_loss, plateau=True)
    done = straight.fit()
    assert (done.step, done.stopped_early, done.best_step) == (16, True, 8)
    lrs = [r["lr"] for r in straight.metrics.read()]
    # halved by the validations of steps 12 and 16 (two bad ones in a row each; a step's record shows
    # the rate it trained with)
    assert lrs[11] == 1e-2 and lrs[12] == lrs[-1] == 5e-3 and straight.optimizer.param_groups[0]["lr"] == 2.5e-3

    first = make_trainer(tmp_path / "cut", Scripted(kill_at=11), plateau=True)
    cut = first.fit()
    assert (cut.status, cut.step, cut.signal) == ("preempted", 11, "SIGTERM")
    state = read_checkpoint(cut.checkpoint).state
    assert state["early_stopping"]["bad"] == 1 and state["scheduler"]["num_bad_epochs"] == 1
    assert read_checkpoint(str(tmp_path / "cut" / "checkpoints" / "best")).step == 8

    again_loss = Scripted()
    again = make_trainer(tmp_path / "cut", again_loss, plateau=True)
    assert again.resume()
    resumed = again.fit()
    assert (resumed.status, resumed.step, resumed.stopped_early, resumed.best_step) == ("finished", 16, True, 8)
    assert same(again.network.state_dict(), straight.network.state_dict())
    assert same(weights_of(resumed.best_checkpoint), weights_of(done.best_checkpoint))
    drop = ("step_time_s", "peak_memory_mb")
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in t.metrics.read()] for t in (straight, again)]
    assert rows[0] == rows[1]

    rerun = make_trainer(tmp_path / "cut", Scripted(), plateau=True)  # the same command again: stays stopped
    assert rerun.resume() and rerun.fit().step == 16
    more = make_trainer(tmp_path / "cut", Scripted(), patience=6, plateau=True)  # more patience: goes on
    assert more.resume() and more.fit().step == 20 and more.early_stopping.best_step == 20


def test_a_best_folder_of_a_lost_future_is_set_aside_on_resume(tmp_path):
    run = tmp_path / "run"
    make_trainer(run, Scripted(), patience=None, steps=8, checkpoint_every_steps=4, keep_last=5).fit()
    ck = run / "checkpoints"
    # the newest checkpoint is lost: the best (step 8) belongs to a trajectory the resumed run redoes
    os.rename(ck / "step-00000008", ck / "step-00000008.unreadable-x")
    trainer = make_trainer(run, Scripted(), patience=None, steps=8)
    with pytest.warns(UserWarning, match=r"best checkpoint \(step 8\) does not belong.*best at step 4"):
        assert trainer.resume()
    assert best_checkpoint(str(ck)) is None and any(n.startswith("best.stale-") for n in os.listdir(ck))
    assert trainer.fit().best_checkpoint == str(ck / "best")
    assert read_checkpoint(str(ck / "best")).step == 8


def test_what_keys_on_validation_needs_validation(tmp_path):
    net = ConditionalCouplingFlow(2, 1, ndim=0, depth=1, hidden=4).double()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    with pytest.raises(ValueError, match="patience keys on the validation loss"):
        Trainer(net, opt, Pairs(), str(tmp_path / "a"), 4, patience=3, progress=False)
    with pytest.raises(ValueError, match="ReduceLROnPlateau scheduler keys on the validation loss"):
        Trainer(net, opt, Pairs(), str(tmp_path / "b"), 4, scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
                validation=lambda: [], progress=False)
    with pytest.raises(ValueError, match="mode='min'"):
        Trainer(net, opt, Pairs(), str(tmp_path / "c"), 4, validation=lambda: [], validate_every=2, progress=False,
                scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max"))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


# ---------------------------------------------------------------- the job: config, CLI
def write_data(path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2)).astype("f4")
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x)
        f.create_dataset("y", data=(x[:, :1] + 0.3 * rng.normal(size=(n, 1))).astype("f4"))


def write_config(tmp_path, out="run", validation_fraction=0.25, scheduler="", **training) -> str:
    if not (tmp_path / "data.h5").exists():
        write_data(tmp_path / "data.h5")
    t = {"out_dir": out, "steps": 100, "batch_size": 8, "progress": False, "log_every": 1, **training}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in t.items())
    path = tmp_path / f"{out}.toml"
    path.write_text(f'[data]\npath = "data.h5"\nvalidation_fraction = {validation_fraction}\n'
                    f'[model]\ntype = "ConditionalCouplingFlow"\ndepth = 1\nhidden = 4\n'
                    f'{scheduler}\n[training]\n{lines}\n')
    return str(path)


def test_invnet_train_stops_early_and_sample_info_use_the_best(tmp_path, capsys):
    # min_delta far above any change: only the first validation counts as better, so patience 2
    # stops at the third validation, step 6, whatever the numbers
    cfg = write_config(tmp_path, validate_every=2, patience=2, min_delta=1e6, checkpoint_every_steps=1, keep_last=1)
    assert main(["train", cfg]) == 0
    out = capsys.readouterr().out
    assert "stopped early at step 6: no better validation loss for 2 validations (best" in out and "at step 2)" in out
    assert "finished at step 6" in out
    run = str(tmp_path / "run")
    assert main(["train", cfg]) == 0  # the same command again: nothing more to do
    assert "already stopped early at step 6" in capsys.readouterr().out

    assert main(["info", run]) == 0
    captured = capsys.readouterr()
    info = json.loads(captured.out)
    assert info["step"] == 2 and info["best"]["step"] == 2 and info["checkpoint"].endswith("best")
    assert "using the best checkpoint by validation, step 2, validation bpd" in captured.err
    assert main(["info", run, "--checkpoint", "last"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 6
    assert main(["info", run, "--checkpoint", "step-6"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 6
    assert main(["info", run, "--checkpoint", "step-4"]) == 2
    assert capsys.readouterr().err.strip() == ("invnet info: error: the run has no checkpoint step-4; it holds: best "
                                               "(step 2), last (step 6), step-6")
    assert main(["info", run, "--checkpoint", "newest"]) == 2
    assert "--checkpoint must be best, last or step-N" in capsys.readouterr().err
    assert main(["info", os.path.join(run, "checkpoints", "step-00000006"), "--checkpoint", "best"]) == 2
    assert "is one checkpoint already" in capsys.readouterr().err

    store = str(tmp_path / "s.zarr")
    assert main(["sample", run, "--data", str(tmp_path / "data.h5"), "--out", store, "--n", "4", "--indices", "0:2",
                 "--no-progress"]) == 0
    assert "using the best checkpoint by validation, step 2" in capsys.readouterr().out
    import zarr

    assert zarr.open_group(store, mode="r").attrs["checkpoint"] == os.path.join(run, "checkpoints", "best")


def test_a_run_without_validation_falls_back_to_the_last_and_says_so(tmp_path, capsys):
    cfg = write_config(tmp_path, validation_fraction=0, steps=3)
    assert main(["train", cfg]) == 0
    assert "no validation pairs: no early stopping and no best checkpoint" in capsys.readouterr().out
    run = str(tmp_path / "run")
    assert main(["info", run]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 3
    assert ("using the last checkpoint, step 3 (the run has no best-by-validation checkpoint: it ran without "
            "validation)") in captured.err
    assert main(["info", run, "--checkpoint", "best"]) == 2
    assert "the run has no best checkpoint; it holds: last (step 3), step-3" in capsys.readouterr().err
    assert choose_checkpoint(run, "last")[0] == os.path.join(run, "checkpoints", "step-00000003")


def test_validation_defaults_to_once_per_epoch(tmp_path):
    cfg = write_config(tmp_path, steps=9, patience=0)  # 40 pairs, 30 for training, batch 8: 3 steps an epoch
    assert main(["train", cfg]) == 0
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records if "val_bpd" in r] == [3, 6, 9]


def test_plateau_scheduler_config(tmp_path, capsys):
    base = {"data": {"path": "d.h5"}, "training": {"out_dir": "r", "steps": 10}}

    def check(scheduler, data=None):
        return validate_config(dict(base, scheduler=dict(name="ReduceLROnPlateau", **scheduler),
                                    data=data or base["data"]))

    assert check({"factor": 0.5, "patience": 2, "threshold_mode": "abs"})["scheduler"]["factor"] == 0.5
    for bad, message in [({"factor": 1.5}, r"factor must lie in \(0, 1\)"), ({"mode": "max"}, 'mode must be "min"'),
                         ({"patience": "2"}, "patience must be an integer"), ({"patience": -1}, "must be >= 0"),
                         ({"threshold_mode": "relative"}, "threshold_mode must be one of"),
                         ({"cooldwn": 1}, r"unknown key\(s\) \['cooldwn'\] for ReduceLROnPlateau")]:
        with pytest.raises(ValueError, match=message):
            check(bad)
    with pytest.raises(ValueError, match="no validation pairs: set \\[data\\] validation_fraction > 0"):
        check({}, {"path": "d.h5", "validation_fraction": 0})
    for bad, message in [({"patience": -1}, "patience must be zero or a positive number"),
                         ({"min_delta": -0.1}, "min_delta must be zero or a positive number"),
                         ({"patience": 2.5}, "patience has the wrong type")]:
        with pytest.raises(ValueError, match=message):
            validate_config(dict(base, training=dict(base["training"], **bad)))
    # a job with it: the learning rate falls on a plateau of the validation loss (huge min_delta:
    # ReduceLROnPlateau's own threshold decides here, abs 1e6: nothing counts as better)
    cfg = write_config(tmp_path, steps=8, validate_every=2, patience=0,
                       scheduler='[scheduler]\nname = "ReduceLROnPlateau"\nfactor = 0.5\npatience = 1\n'
                                 'threshold = 1e6\nthreshold_mode = "abs"')
    assert main(["train", cfg]) == 0
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert lrs == [1e-3] * 6 + [5e-4] * 2  # bad at 4 and 6: halved after the step-6 validation


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_best_weights_of_a_cuda_run_are_its_weights_at_the_best_step(tmp_path):
    loss = Scripted()
    torch.manual_seed(0)
    net = ConditionalCouplingFlow(2, 1, ndim=0, depth=2, hidden=8).double()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    trainer = Trainer(net, opt, Pairs(), str(tmp_path / "run"), 10, loss_fn=loss, validation=lambda: ["validation"],
                      validate_every=2, progress=False, device="cuda")
    loss.trainer = trainer
    result = trainer.fit()
    best = read_checkpoint(result.best_checkpoint)
    assert best.step == 8 and all(v.device.type == "cpu" for v in best.weights.values())
    assert same(best.weights, {k: v.cpu() for k, v in loss.weights_at[8].items()})
