"""The failure paths of `invnet train`, `invnet sample`, `invnet info` and the demo, as a user meets
them: each case asserts the exit code, the one-line message, and that no file was lost, changed
or left behind. The dangerous cases come first (overwrite, restart, resume after a config change,
corrupt checkpoints)."""
import hashlib
import json
import os
import shutil
import signal
import sys

import h5py
import numpy as np
import pytest
import zarr

from invnet.cli import main
from invnet.training import EXIT_PREEMPTED, EXIT_USAGE, PreemptionFlag
from invnet.training.signals import EXIT_INTERRUPTED

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_training import train_then_signal  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = """[data]
path = "{data}"
validation_fraction = 0.25
[model]
type = "ConditionalCouplingFlow"
depth = {depth}
hidden = 4
[training]
out_dir = "{out}"
steps = {steps}
batch_size = {batch}
log_every = 1
checkpoint_every_steps = 1
keep_last = {keep}
progress = false
"""


def make_pairs(path, n=24, x=None, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 8, 8)).astype("f4") if x is None else x
    y = (x + 0.3 * rng.normal(size=x.shape)).astype("f4")
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = x, y
    return str(path)


def write_config(folder, name="train.toml", data="data.h5", out="run", steps=3, depth=1, batch=8, keep=3, extra=""):
    path = folder / name
    path.write_text(CONFIG.format(data=data, out=out, steps=steps, depth=depth, batch=batch, keep=keep) + extra)
    return str(path)


def snapshot(folder):
    """Every file and folder under `folder` with a hash of its bytes: what 'nothing changed' means."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            found[os.path.relpath(os.path.join(root, d), folder)] = "dir"
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                found[os.path.relpath(os.path.join(root, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
    return found


def leftovers(folder):
    """Temporaries of the atomic writers anywhere under `folder`."""
    return [os.path.join(r, n) for r, ds, fs in os.walk(folder) for n in ds + fs if ".tmp-" in n]


def one_line_error(err, *words):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and "Traceback" not in err, err
    assert all(w in lines[-1] for w in words), lines[-1]
    return lines[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder with data.h5, train.toml and run/ (3 steps, a checkpoint at each)."""
    folder = tmp_path_factory.mktemp("trained")
    make_pairs(folder / "data.h5")
    assert main(["train", write_config(folder)]) == 0
    return folder


@pytest.fixture
def work(trained, tmp_path):
    """A private copy of the trained folder."""
    shutil.copytree(trained, tmp_path / "w")
    return tmp_path / "w"


# ------------------------------------------------------------------------------ overwrite
def test_sample_overwrite_never_deletes_a_folder_it_did_not_write(work, capsys):
    run = work / "run"
    (run / "notes.txt").write_text("my notes")
    before = snapshot(work)
    code = main(["sample", str(run), "--data", str(work / "data.h5"), "--out", str(run), "--overwrite", "--n", "4"])
    assert code == EXIT_USAGE
    one_line_error(capsys.readouterr().err, "overwrite (--overwrite) replaces only a store written by invnet sample",
                   str(run))
    assert snapshot(work) == before


def test_sample_overwrite_of_a_file_is_refused_not_a_traceback(work, capsys):
    target = work / "results.txt"
    target.write_text("precious")
    before = snapshot(work)
    code = main(["sample", str(work / "run"), "--data", str(work / "data.h5"), "--out", str(target), "--overwrite"])
    assert code == EXIT_USAGE
    one_line_error(capsys.readouterr().err, "is a file that is not one")
    assert snapshot(work) == before


def test_sample_overwrite_replaces_its_own_store_completely(work, capsys):
    out = str(work / "r.zarr")
    args = ["sample", str(work / "run"), "--data", str(work / "data.h5"), "--out", out, "--n", "4", "--keep", "1"]
    assert main(args + ["--indices", "0:3"]) == 0
    assert main(args + ["--indices", "0:2"]) == EXIT_USAGE  # exists: refused without --overwrite
    one_line_error(capsys.readouterr().err, "already exists", "--overwrite")
    assert zarr.open_group(out, mode="r")["index"][...].tolist() == [0, 1, 2]
    assert main(args + ["--indices", "0:2", "--overwrite"]) == 0
    g = zarr.open_group(out, mode="r")
    assert g["index"][...].tolist() == [0, 1] and g.attrs["written_by"] == "invnet sample"
    assert leftovers(work) == []


# ------------------------------------------------------------------------------ restart
def test_restart_moves_the_previous_run_aside_and_never_mixes_runs(work, capsys):
    old = snapshot(work / "run")
    cfg = write_config(work, steps=2, keep=1)  # fewer steps and a smaller keep_last than the old run
    assert main(["train", cfg, "--restart"]) == 0
    out = capsys.readouterr().out
    moved = [line for line in out.splitlines() if "moved the previous run aside to" in line]
    assert len(moved) == 1, out
    aside = moved[0].split("aside to ")[1].strip()
    assert os.path.basename(aside).startswith("run.previous-") and snapshot(aside) == old  # all of it, unchanged
    assert sorted(os.listdir(work / "run" / "checkpoints")) == ["best", "step-00000002"]  # (validated at the end)
    steps = [json.loads(line)["step"] for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert main(["info", str(work / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2


def test_restart_refuses_to_move_a_folder_that_holds_the_config(work, capsys):
    cfg = write_config(work / "run", data="../data.h5", out=".")
    before = snapshot(work)
    assert main(["train", cfg, "--restart"]) == EXIT_USAGE
    one_line_error(capsys.readouterr().err, "--restart moves the previous run", "the config file")
    assert snapshot(work) == before


# ------------------------------------------------------------------------------ resume after a config change
def test_resume_after_a_config_change_names_the_keys_and_writes_nothing(work, capsys):
    before = snapshot(work / "run")
    cfg = write_config(work, steps=5, depth=2, batch=4)
    assert main(["train", cfg]) == EXIT_USAGE
    line = one_line_error(capsys.readouterr().err, "differs from the run")
    assert "[model] depth: 1 -> 2" in line and "[training] batch_size: 8 -> 4" in line and "steps" not in line
    assert snapshot(work / "run") == before


def test_resume_with_more_steps_says_where_it_resumes(work, capsys):
    cfg = write_config(work, steps=5, extra="validate_every = 2\n")  # steps and validate_every may change
    assert main(["train", cfg]) == 0
    out = capsys.readouterr().out
    assert f"resuming from step 3 (checkpoint {work / 'run' / 'checkpoints' / 'step-00000003'})" in out
    assert "finished at step 5" in out


# ------------------------------------------------------------------------------ corrupt checkpoints
@pytest.mark.parametrize("name", ["model.safetensors", "state.pt", "meta.json"])
@pytest.mark.parametrize("folder, pick", [("best", []), ("step-00000003", ["--checkpoint", "last"])])
def test_a_damaged_checkpoint_file_is_named_in_sample_and_info(work, capsys, name, folder, pick):
    damaged = work / "run" / "checkpoints" / folder / name
    damaged.write_bytes(damaged.read_bytes()[:20])  # truncated
    before = snapshot(work)
    assert main(["info", str(work / "run")] + pick) == EXIT_USAGE
    one_line_error(capsys.readouterr().err, str(damaged), "unreadable")
    code = main(["sample", str(work / "run"), "--data", str(work / "data.h5"), "--out", str(work / "r.zarr")] + pick)
    assert code == EXIT_USAGE
    one_line_error(capsys.readouterr().err, str(damaged))
    assert snapshot(work) == before


def test_resume_falls_back_to_the_previous_good_checkpoint(work, capsys):
    bad = work / "run" / "checkpoints" / "step-00000003"
    (bad / "model.safetensors").write_bytes(b"\0" * 10)
    assert main(["train", write_config(work, steps=4)]) == 0
    out, err = capsys.readouterr()
    assert "skipping an unreadable checkpoint" in out and "model.safetensors" in out
    assert "resuming from step 2" in out and "finished at step 4" in out
    names = sorted(os.listdir(work / "run" / "checkpoints"))
    aside = [n for n in names if n.startswith("step-00000003.unreadable-")]  # the damaged one, kept for a look
    assert len(aside) == 1 and os.path.getsize(work / "run" / "checkpoints" / aside[0] / "model.safetensors") == 10
    # the best weights written with step 3 belonged to the lost trajectory: set aside too, and rewritten
    stale = [n for n in names if n.startswith("best.stale-")]
    assert len(stale) == 1 and "does not belong to the checkpoint resumed from" in err
    assert [n for n in names if n not in aside + stale] == ["best", "step-00000002", "step-00000003", "step-00000004"]
    steps = [json.loads(line)["step"] for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_with_no_readable_checkpoint_stops_with_advice(work, capsys):
    for ck in (work / "run" / "checkpoints").iterdir():
        (ck / "state.pt").write_bytes(b"junk")
    cfg = write_config(work, steps=4)
    before = snapshot(work)
    assert main(["train", cfg]) == EXIT_USAGE
    one_line_error(capsys.readouterr().err, "no readable checkpoint", "state.pt", "--restart")
    assert snapshot(work) == before


# ------------------------------------------------------------------------------ bad configurations
@pytest.mark.parametrize("extra, words", [
    ("model = 5\n", ["[model] must be a table"]),  # (replaces the [model] table below)
    ('[optimizer]\nname = "Adam"\nlr = "fast"\n', ["[optimizer] lr must be a number for Adam", "'fast'"]),
    ('depth = "two"\n', ["[model] depth must be an integer", "'two'"]),
    ('[scheduler]\nname = "StepLR"\ngamma = 0.5\n', ["[scheduler] StepLR needs the key(s) ['step_size']"]),
    ('[scheduler]\nname = "StepLR"\nstep_size = "2"\n', ["[scheduler] step_size must be an integer for StepLR"]),
    ('out_dir = ""\n', ["[training] out_dir must be a non-empty string"]),
    ("keep_last = 0\n", ["[training] keep_last must be a positive number"]),
])
def test_a_bad_value_in_any_section_is_one_line_and_writes_nothing(tmp_path, capsys, extra, words):
    make_pairs(tmp_path / "data.h5")
    text = CONFIG.format(data="data.h5", out="run", steps=2, depth=1, batch=8, keep=2)
    if extra.startswith("model ="):
        text = extra + text.replace('[model]\ntype = "ConditionalCouplingFlow"\ndepth = 1\nhidden = 4\n', "")
    elif extra.startswith("depth"):
        text = text.replace("depth = 1\n", extra)
    elif extra.startswith("out_dir") or extra.startswith("keep_last"):
        key = extra.split(" ")[0]
        text = "\n".join(line for line in text.splitlines() if not line.startswith(key + " ")) + "\n"
        text = text.replace("[training]\n", "[training]\n" + extra)
    else:
        text += extra
    (tmp_path / "c.toml").write_text(text)
    before = snapshot(tmp_path)
    assert main(["train", str(tmp_path / "c.toml")]) == EXIT_USAGE
    one_line_error(capsys.readouterr().err, *words)
    assert snapshot(tmp_path) == before


def test_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
    make_pairs(tmp_path / "data.h5")
    (tmp_path / "run").write_text("not a folder")
    cfg = write_config(tmp_path)
    before = snapshot(tmp_path)
    assert main(["train", cfg]) == EXIT_USAGE
    one_line_error(capsys.readouterr().err, "out_dir", "is not a folder")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------ partial outputs of sample
@pytest.mark.parametrize("args, words", [
    (["--batch-size", "0"], ["batch_size (--batch-size) must be a positive integer"]),
    (["--temperature", "-1"], ["--temperature must be a positive number or 'auto'"]),
    (["--temperature", "nan"], ["--temperature must be a positive number or 'auto'"]),
    (["--keep", "9", "--n", "4"], ["keep (--keep) must lie in [0, n_samples=4]"]),
    (["--indices", "0:99"], ["indices must lie in [0, 24)"]),
    (["--indices", "a:b"], ["--indices must be 'a:b' or 'i,j,k'"]),
])
def test_sample_checks_every_argument_before_creating_anything(work, capsys, args, words):
    before = snapshot(work)
    out = str(work / "r.zarr")
    assert main(["sample", str(work / "run"), "--data", str(work / "data.h5"), "--out", out] + args) == EXIT_USAGE
    one_line_error(capsys.readouterr().err, *words)
    assert snapshot(work) == before


def test_sample_names_a_non_finite_observation_and_the_rerun_works(work, capsys):
    with h5py.File(work / "data.h5", "a") as f:
        y = f["y"][...]
        y[5, 0, 3, 3] = np.inf
        f["y"][...] = y
    before = snapshot(work)
    args = ["sample", str(work / "run"), "--data", str(work / "data.h5"), "--out", str(work / "r.zarr"), "--n", "4"]
    assert main(args) == EXIT_USAGE
    one_line_error(capsys.readouterr().err, "NaN or Inf in row 5")
    assert snapshot(work) == before
    assert main(args + ["--indices", "0,1,2,3,4,6"]) == 0  # the corrected rerun: no "already exists"
    assert zarr.open_group(str(work / "r.zarr"), mode="r")["index"][...].tolist() == [0, 1, 2, 3, 4, 6]


def disturb_sampling(monkeypatch, at_call, disturb):
    """Run `disturb()` when the sample job summarises its `at_call`-th observation."""
    import invnet.inference.job as job

    calls, original = [], job.summarize_posterior

    def summarize(*a, **k):
        calls.append(1)
        if len(calls) == at_call:
            disturb()
        return original(*a, **k)

    monkeypatch.setattr(job, "summarize_posterior", summarize)


def raise_keyboard_interrupt():
    raise KeyboardInterrupt


def test_sample_that_fails_midway_leaves_no_store(work, capsys, monkeypatch):
    disturb_sampling(monkeypatch, 3, raise_keyboard_interrupt)  # Ctrl-C while sampling
    before = snapshot(work)
    code = main(["sample", str(work / "run"), "--data", str(work / "data.h5"), "--out", str(work / "r.zarr"),
                 "--n", "4", "--plots", str(work / "figs")])
    assert code == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
    assert snapshot(work) == before  # no store, no temporary, no figures


def test_sample_stopped_by_sigterm_leaves_nothing_and_says_rerun(work, capsys, monkeypatch):
    disturb_sampling(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))  # the batch system's notice
    before = snapshot(work)
    code = main(["sample", str(work / "run"), "--data", str(work / "data.h5"), "--out", str(work / "r.zarr"),
                 "--n", "4"])
    assert code == EXIT_PREEMPTED
    one_line_error(capsys.readouterr().err,
                   "stopped by SIGTERM; nothing was left half-written (rerun the same command)")
    assert snapshot(work) == before and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sample_shows_progress_over_observations(work, capsys):
    args = ["sample", str(work / "run"), "--data", str(work / "data.h5"), "--out", str(work / "r.zarr"), "--n", "4"]
    assert main(args + ["--indices", "0:3"]) == 0
    err = capsys.readouterr().err
    assert "sample" in err and "3/3" in err and "obs" in err


# ------------------------------------------------------------------------------ interruption
def test_ctrl_c_writes_a_checkpoint_and_exits_130(tmp_path):
    make_pairs(tmp_path / "data.h5")
    metrics = tmp_path / "run" / "metrics.jsonl"
    proc, out, err = train_then_signal(write_config(tmp_path, steps=100000), metrics, signal.SIGINT)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "received SIGINT: wrote checkpoint" in out + err and "interrupted at step" in out
    step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / f"step-{step:08d}")
    assert leftovers(tmp_path) == []


def test_a_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with PreemptionFlag() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.received == "SIGINT"  # the first: finish the step, checkpoint, stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second: now
    assert signal.getsignal(signal.SIGINT) is before  # restored as it was


# ------------------------------------------------------------------------------ data that train but mislead
def test_integer_and_constant_data_warn_with_advice(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.integers(-100, 100, size=(24, 1, 8, 8)).astype("i2")
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["x"], f["y"] = x, (x + rng.normal(size=x.shape)).astype("f4")
    assert main(["train", write_config(tmp_path, steps=1)]) == 0
    err = capsys.readouterr().err
    assert "invnet train: warning:" in err and "holds integers (int16)" in err and "Dequantize" in err
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["x"] = np.full((24, 1, 8, 8), 3.0, "f4")
        f["y"] = rng.normal(size=(24, 1, 8, 8)).astype("f4")
    assert main(["train", write_config(tmp_path, data="flat.h5", out="flat", steps=1)]) == 0
    err = capsys.readouterr().err
    assert "channel(s) [0] are constant" in err and "drop the channel" in err


# ------------------------------------------------------------------------------ first contact
def test_help_shows_defaults_and_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip().startswith("invnet 0.")
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 100)" in text and "(default: 1.0)" in text and "(default: None)" not in text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: invnet_demo_output)" in text and "(default: small)" in text


def test_demo_refuses_a_folder_with_files_it_did_not_write(tmp_path, capsys):
    (tmp_path / "data.h5").write_text("someone else's")
    before = snapshot(tmp_path)
    assert main(["demo", "--size", "tiny", "--out", str(tmp_path)]) == EXIT_USAGE
    one_line_error(capsys.readouterr().err, "which the demo did not write")
    assert snapshot(tmp_path) == before


def test_demo_reruns_in_its_own_folder_and_prints_it(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--size", "tiny", "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert f"output folder {out}" in first and "took" in first and "CPU" in first
    assert main(["demo", "--size", "tiny", "--out", str(out), "--steps", "3"]) == 0
    assert "replacing the previous demo's outputs" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["steps"] == 3
    assert not [n for n in os.listdir(out) if n.startswith("run.")] and leftovers(out) == []


def test_the_demo_output_folder_is_ignored_by_git():
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert "/invnet_demo_output/" in f.read().split()


def test_sample_from_a_network_whose_condition_hides_the_grid(tmp_path, capsys):
    """A vector summary network turns the observation into a vector: the sampler must say the
    shape of x (it used to fail with 'sample needs shape')."""
    make_pairs(tmp_path / "data.h5")
    cfg = write_config(tmp_path, steps=1)
    text = open(cfg).read().replace('type = "ConditionalCouplingFlow"\ndepth = 1\nhidden = 4',
                                    'type = "ConditionalGlow"\nlevels = 1\ndepth = 1\nhidden = 4\n'
                                    'summary = { type = "VectorSummary", hidden = 8, out_channels = 4 }')
    open(cfg, "w").write(text)
    assert main(["train", cfg]) == 0
    out = str(tmp_path / "r.zarr")
    assert main(["sample", str(tmp_path / "run"), "--data", str(tmp_path / "data.h5"), "--out", out, "--n", "4",
                 "--indices", "0:2"]) == 0
    assert zarr.open_group(out, mode="r")["mean"].shape == (2, 1, 8, 8)


def test_docs_name_every_network_a_config_may_use_and_the_store_layout():
    from invnet.training.network_spec import available_networks

    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        text = f.read()
    missing = [n for n in available_networks() if f"`{n}`" not in text]
    assert not missing, f"docs/config.md does not document {missing}"
    assert "when merged" not in text and all(f"`{a}`" in text for a in ("mean", "std", "samples", "index"))
