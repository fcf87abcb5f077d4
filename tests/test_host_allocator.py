"""The allocator behind CPU tensors (invnet/host_allocator.py): which one a process has, where
jemalloc is found, the relaunch's environment and rules, and the relaunch itself in a fresh
interpreter (skipped where jemalloc is not installed: `apt install libjemalloc2`)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from invnet import host_allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("import json, os, sys\n"
         "from invnet import host_allocator as h\n"
         "h.relaunch_under_jemalloc(sys.orig_argv)\n"
         "print(json.dumps([h.allocator_in_use(), os.environ.get('LD_PRELOAD'), h.describe()]))\n")


def _fresh_env(**extra: str) -> dict[str, str]:
    drop = ("LD_PRELOAD", "MALLOC_CONF", host_allocator.CHOICE_VARIABLE, host_allocator.PATH_VARIABLE,
            "INVNET_ALLOCATOR_RELAUNCHED")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = ROOT
    env.update(extra)
    return env


def test_the_allocator_is_read_from_the_process_mappings(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert host_allocator.allocator_in_use(str(maps)) == "system"
    maps.write_text(maps.read_text() + "7f20-7f30 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert host_allocator.allocator_in_use(str(maps)) == "jemalloc"
    assert host_allocator.allocator_in_use(str(tmp_path / "missing")) == "unknown"


def test_jemalloc_is_found_where_the_user_says_or_in_the_environment_prefix(tmp_path):
    lib = tmp_path / "lib" / "libjemalloc.so.2"
    lib.parent.mkdir()
    lib.write_bytes(b"\x7fELF" + bytes(60))  # what the check reads: the ELF magic
    assert host_allocator.find_jemalloc({host_allocator.PATH_VARIABLE: str(lib)}) == str(lib)
    assert host_allocator.find_jemalloc({"CONDA_PREFIX": str(tmp_path)}) == str(lib)
    with pytest.raises(FileNotFoundError, match="INVNET_JEMALLOC=.*expected the path of libjemalloc.so.2"):
        host_allocator.find_jemalloc({host_allocator.PATH_VARIABLE: str(tmp_path / "nothing.so")})


def test_the_relaunch_environment_preloads_jemalloc_first_and_keeps_the_users_settings():
    env = host_allocator.relaunch_environment({"LD_PRELOAD": "/a/libx.so", "MALLOC_CONF": "narenas:2"}, "/j.so")
    assert env["LD_PRELOAD"] == "/j.so:/a/libx.so"
    assert env["MALLOC_CONF"] == "narenas:2"  # a user's configuration wins
    env = host_allocator.relaunch_environment({}, "/j.so")
    assert env["LD_PRELOAD"] == "/j.so" and env["MALLOC_CONF"] == host_allocator.MALLOC_CONF
    # the marker stops a second relaunch and carries the user's own values, to be put back
    assert json.loads(env["INVNET_ALLOCATOR_RELAUNCHED"]) == {"library": "/j.so", "LD_PRELOAD": None,
                                                               "MALLOC_CONF": None}


def test_a_bad_allocator_choice_is_a_clear_error_of_the_command(tmp_path):
    env = _fresh_env(**{host_allocator.CHOICE_VARIABLE: "tcmalloc"})
    proc = subprocess.run([sys.executable, "-m", "invnet", "sample", str(tmp_path / "ckpt"), "--data",
                           str(tmp_path / "d.h5"), "--out", str(tmp_path / "o.zarr")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "INVNET_ALLOCATOR='tcmalloc': expected 'jemalloc' or 'system'" in proc.stderr
    assert not (tmp_path / "o.zarr").exists()


def _installed_jemalloc():
    try:
        return host_allocator.find_jemalloc()
    except (ValueError, FileNotFoundError):  # INVNET_JEMALLOC set to something else in the caller's environment
        return None


def _probe(**extra: str) -> list:
    proc = subprocess.run([sys.executable, "-c", PROBE], env=_fresh_env(**extra), capture_output=True, text=True,
                          timeout=120, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines()] + [proc.stderr]


@pytest.mark.skipif(_installed_jemalloc() is None, reason="jemalloc is not installed")
def test_the_relaunch_runs_the_same_command_under_jemalloc_and_gives_children_the_users_environment():
    (allocator, preload, line), stderr = _probe()  # printed once: the relaunched process does not relaunch again
    assert allocator == "jemalloc" and line == "host allocator: jemalloc"
    assert preload is None  # put back as the user had it: processes it starts do not inherit the preload
    (allocator, _, line), _ = _probe(**{host_allocator.CHOICE_VARIABLE: "system"})
    assert allocator == "system" and "INVNET_ALLOCATOR=system" in line


@pytest.mark.skipif(shutil.which("true") is None or not sys.platform.startswith("linux"), reason="needs Linux")
def test_a_library_the_loader_refuses_leaves_glibc_with_one_warning():
    (allocator, _, line), stderr = _probe(**{host_allocator.PATH_VARIABLE: shutil.which("true")})  # an executable
    assert allocator == "system" and "could not be preloaded" in line
    assert stderr.count("invnet: warning:") == 1


def test_a_file_that_is_not_a_library_is_refused_before_any_relaunch(tmp_path):
    text = tmp_path / "libjemalloc.so.2"
    text.write_text("not a library")
    with pytest.raises(ValueError, match="not a shared library"):
        host_allocator.find_jemalloc({host_allocator.PATH_VARIABLE: str(text)})
    with pytest.raises(ValueError, match="blanks"):
        host_allocator.find_jemalloc({host_allocator.PATH_VARIABLE: str(tmp_path / "a b.so")})


def test_only_the_invnet_command_itself_is_started_again(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/bin/my_pipeline.py", "train"])
    assert not host_allocator._started_as_the_command()  # a program calling invnet.cli.main runs once
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/invnet", "train"])
    assert host_allocator._started_as_the_command()
    monkeypatch.setattr(sys, "argv", [os.path.join(ROOT, "invnet", "__main__.py"), "train"])
    assert host_allocator._started_as_the_command()
