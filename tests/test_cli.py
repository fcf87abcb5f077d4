import json
import os

import numpy as np
import pytest
import zarr

from invnet.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--size", "tiny", "--out", str(out)]) == 0
    return out


def test_demo_writes_plots_zarr_and_report(demo_dir, capsys):
    for name in ("report.md", "report.json", "config.toml", "data.h5", "run/metrics.png", "run/metrics.jsonl",
                 "plots/coverage.png", "plots/error_vs_std.png", "plots/sbc_ranks.png", "plots/tarp.png"):
        assert (demo_dir / name).exists(), name
    report = json.loads((demo_dir / "report.json").read_text())
    assert report["observations"] == 2 and report["steps"] == 6
    assert "SBC ranks" in (demo_dir / "report.md").read_text() and 0 <= report["tarp"]["ks_p_value"] <= 1
    assert 0 <= report["coverage"]["0.9"]["empirical"] <= 1 and report["ratio_sample_to_mean_sq_error"] > 1
    g = zarr.open_group(str(demo_dir / "posterior.zarr"), mode="r")
    assert g["mean"].shape == (2, 1, 8, 8) and g["samples"].shape == (2, 4, 1, 8, 8)
    assert np.isfinite(g["std"][...]).all() and (g["std"][...] > 0).all()


def test_sample_and_info_commands(demo_dir, tmp_path, capsys):
    out = str(tmp_path / "results.zarr")
    code = main(["sample", str(demo_dir / "run"), "--data", str(demo_dir / "data.h5"), "--n", "6", "--keep", "2",
                 "--indices", "0:3", "--out", out, "--plots", str(tmp_path / "plots")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "calibration (3 observations)" in printed and out in printed
    g = zarr.open_group(out, mode="r")
    assert g["index"][...].tolist() == [0, 1, 2] and g["samples"].shape == (3, 2, 1, 8, 8)
    assert "calibration" in g.attrs and os.path.exists(str(tmp_path / "results_report.json"))
    report = json.loads((tmp_path / "results_report.json").read_text())
    assert report["sbc"]["observations"] == 3 and report["tarp"]["observations"] == 3
    assert (tmp_path / "plots" / "sbc_ranks.png").exists() and (tmp_path / "plots" / "tarp.png").exists()
    assert main(["info", str(demo_dir / "run")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 6 and info["network"]["type"] == "ConditionalGlow"
    assert info["data_position"]["seed"] == 0


def test_bad_input_gives_exit_code_2_and_a_message(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\npath = "missing.h5"\n[training]\nout_dir = "r"\nsteps = 3\nbatchsize = 4\n')
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) ['batchsize']" in err and "'batch_size'" in err
    cfg.write_text('[data]\npath = "missing.h5"\n[training]\nout_dir = "r"\nsteps = 3\n')
    assert main(["train", str(cfg)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    assert main(["sample", str(tmp_path), "--data", "x.h5", "--out", "o.zarr"]) == 2


def test_sample_with_the_temperature_chosen_on_held_out_pairs(demo_dir, tmp_path, capsys):
    data = str(demo_dir / "data.h5")
    out = str(tmp_path / "auto.zarr")
    assert main(["sample", str(demo_dir / "run"), "--data", data, "--indices", "0:2", "--n", "6", "--out", out,
                 "--temperature", "auto", "--calibration-data", data, "--calibration-n", "4"]) == 0
    printed = capsys.readouterr().out
    assert "held-out ratio" in printed and "target 1.6000" in printed
    g = zarr.open_group(out, mode="r")
    fit = g.attrs["temperature_fit"]
    assert g.attrs["temperature"] == fit["temperature"] and abs(fit["ratio"] / fit["target"] - 1) <= 0.002
    report = json.loads((tmp_path / "auto_report.json").read_text())
    assert report["temperature_fit"]["n_samples"] == 4 and report["temperature_fit"]["data"] == data


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "auto"], "--temperature auto needs --calibration-data"),
    (["--temperature", "hot"], "--temperature must be a positive number or 'auto'"),
    (["--temperature", "-1"], "--temperature must be a positive number or 'auto'"),
])
def test_bad_temperatures_are_refused_before_anything_is_written(demo_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "never.zarr"
    assert main(["sample", str(demo_dir / "run"), "--data", str(demo_dir / "data.h5"), "--out", str(out),
                 *extra]) == 2
    assert message in capsys.readouterr().err and not out.exists()
