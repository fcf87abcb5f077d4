"""`invnet train` in low precision and the reconstruction-drift guard, through the command on
this CPU machine: bfloat16 and float16 train (finite loss, the reconstruction error in the
metrics and the plot); the guard warns above its first threshold and stops above its second
(exit 70, the block named, the last good checkpoint kept)."""
from __future__ import annotations

import json
import os

import pytest
from test_failure_paths import make_pairs

from invnet.cli import main


def write(tmp_path, steps=6, **training) -> str:
    make_pairs(tmp_path / "data.h5")
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in training.items())
    path = tmp_path / "train.toml"
    path.write_text(f"""[data]
path = "data.h5"
[model]
type = "ConditionalGlow"
hidden = 8
levels = 2
depth = 1
[training]
out_dir = "run"
steps = {steps}
batch_size = 8
log_every = 1
progress = false
{lines}
""")
    return str(path)


def records(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_low_precision_trains_with_the_drift_in_the_metrics(tmp_path, precision, capsys):
    assert main(["train", write(tmp_path, precision=precision, drift_check_every=2)]) == 0
    got = records(tmp_path)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert all(r["train_bpd"] == r["train_bpd"] and abs(r["train_bpd"]) < 1e3 for r in got)  # finite
    drift = {r["step"]: r["reconstruction_error"] for r in got if "reconstruction_error" in r}
    assert set(drift) == {2, 4, 6} and all(0 <= v < 1e-3 for v in drift.values())
    assert any(k.startswith("reconstruction_error/scale_") for k in got[1])
    assert ("loss_scale" in got[0]) == (precision == "float16")
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 0
    from invnet.training import read_checkpoint

    assert read_checkpoint(str(tmp_path / "run")).meta["run"]["precision"] == precision


def test_the_drift_guard_warns_above_its_first_threshold(tmp_path, capsys):
    assert main(["train", write(tmp_path, steps=2, drift_check_every=1, drift_warn_above=1e-14,
                                drift_fail_above=1.0)]) == 0
    err = capsys.readouterr().err
    assert "warning: reconstruction error" in err and "worst block" in err


def test_the_drift_guard_stops_above_its_second_threshold(tmp_path, capsys):
    cfg = write(tmp_path, steps=6, drift_check_every=3, drift_warn_above=1e-15, drift_fail_above=1e-14,
                checkpoint_every_steps=1)
    assert main(["train", cfg]) == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reconstruction error" in err and "worst block" in err and "Remedy" in err
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints"))[-1] == "step-00000002"  # before the bad update
    assert [r["step"] for r in records(tmp_path)] == [1, 2]


def test_the_demo_trains_and_samples_in_bfloat16(tmp_path, capsys):
    assert main(["demo", "--size", "tiny", "--out", str(tmp_path / "demo"), "--device", "cpu",
                 "--precision", "bfloat16"]) == 0
    text = (tmp_path / "demo" / "config.toml").read_text()
    assert 'precision = "bfloat16"' in text and 'device = "cpu"' in text
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["status"] == "finished" and report["observations"] == 2
