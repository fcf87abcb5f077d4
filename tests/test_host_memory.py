"""Huge pages for large CPU tensors (invnet/host_memory.py): importing invnet asks PyTorch for them
before its first allocation, ``INVNET_HUGE_PAGES=0`` keeps it from asking, and the status report
says whether they are in use. Each case runs in a fresh interpreter: PyTorch reads the setting
once per process, at its first CPU allocation."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from invnet import host_memory

PROBE = (
    "import json, os, invnet\n"
    "from invnet import host_memory as h\n"
    "print(json.dumps({'variable': os.environ.get(h.PYTORCH_VARIABLE), 'in_use': h.huge_pages_in_use(),"
    " 'describe': h.describe()}))\n"
)


def _probe(extra_env: dict[str, str], allocate_first: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (host_memory.PYTORCH_VARIABLE, host_memory.OPT_OUT_VARIABLE)}
    env.update(extra_env)
    code = ("import torch; torch.ones(10)\n" if allocate_first else "") + PROBE
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_invnet_asks_pytorch_for_huge_pages_unless_told_not_to():
    assert _probe({})["variable"] == "1"
    assert _probe({host_memory.OPT_OUT_VARIABLE: "0"})["variable"] is None
    # a user's own setting wins
    assert _probe({host_memory.PYTORCH_VARIABLE: "0"})["variable"] == "0"


@pytest.mark.skipif(host_memory.kernel_mode() != "madvise", reason="needs the kernel's THP mode 'madvise'")
def test_large_tensors_lie_on_huge_pages_when_asked_and_the_report_says_why_not_otherwise():
    asked = _probe({})
    assert asked["in_use"] and "in use" in asked["describe"]
    opted_out = _probe({host_memory.OPT_OUT_VARIABLE: "0"})
    assert not opted_out["in_use"] and "INVNET_HUGE_PAGES=0" in opted_out["describe"]
    late = _probe({}, allocate_first=True)
    assert not late["in_use"] and "import invnet first" in late["describe"]


def test_kernel_mode_reads_the_bracketed_setting():
    assert host_memory.kernel_mode() in ("always", "madvise", "never", "unavailable")
