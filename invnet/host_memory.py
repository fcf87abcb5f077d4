"""Huge pages for the large CPU tensors of a step, so that a large volume costs what its size says.

Why: a training step on a 3D volume allocates its large temporaries (conditioner activations and
their gradients, 16-1000 MB at 128^3-256^3) afresh each time. glibc serves blocks above its
largest mmap threshold (32 MiB on 64-bit Linux) straight from the kernel and gives them back on
``free``, so every such tensor is faulted in again at each step, one 4 KiB page at a time, the
kernel zeroing each page first. Measured on one 3D conditioner (12 -> 16 -> 8 channels, forward and
backward, one thread): 46 ns of kernel time per voxel at 64^3 (activations of 16 MB, below the
threshold, recycled by glibc), 1164 ns at 128^3 (134 MB, faulted in every time) against 1566 ns of
arithmetic. A 3D conditional Glow's step cost 1.63x more per voxel at 256^3 than at 128^3 without
huge pages and 1.11x with them (docs/benchmarks.md, section 4).

With transparent huge pages (2 MiB) the kernel takes 512 times fewer faults. PyTorch asks for them
(``madvise(MADV_HUGEPAGE)`` on every CPU allocation of 2 MiB or more) when the environment variable
``THP_MEM_ALLOC_ENABLE=1`` is set before its first CPU allocation: it reads the variable once, at
that allocation. Importing :mod:`invnet` sets it (unless it is already set, or
``INVNET_HUGE_PAGES=0`` asks not to), which takes effect when invnet is imported before the
program allocates its first tensor: the usual order of imports, and always in ``invnet train``,
``invnet sample`` and the scripts. The kernel's setting decides the rest:
``/sys/kernel/mm/transparent_hugepage/enabled`` must read ``always`` or ``madvise`` (``never``:
no huge pages whatever the program asks). :func:`huge_pages_in_use` says whether it worked.

The cost: a tensor of 2 MiB or more is page aligned and its memory counted in 2 MiB pages, so the
resident size of a process can round up by less than 2 MiB per such tensor. Peak memory measured
with and without: docs/benchmarks.md, section 4.

This module imports nothing heavy at the top: ``invnet/__init__.py`` imports it before torch.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

__all__ = ["PYTORCH_VARIABLE", "OPT_OUT_VARIABLE", "kernel_mode", "huge_pages_in_use", "describe"]

#: the variable PyTorch reads (once, at its first CPU allocation)
PYTORCH_VARIABLE = "THP_MEM_ALLOC_ENABLE"
#: set to 0 to keep invnet from setting :data:`PYTORCH_VARIABLE`
OPT_OUT_VARIABLE = "INVNET_HUGE_PAGES"
_KERNEL_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
_PROBE_BYTES = 4 << 20  # holds at least one whole, aligned 2 MiB page


def _request_huge_pages() -> None:
    if os.environ.get(OPT_OUT_VARIABLE, "1").strip() == "0":
        return
    os.environ.setdefault(PYTORCH_VARIABLE, "1")


def kernel_mode() -> str:
    """The kernel's transparent-huge-page mode (``always``, ``madvise``, ``never``), or
    ``unavailable`` where the system does not say (not Linux, no THP support)."""
    try:
        with open(_KERNEL_SETTING) as f:
            text = f.read()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "unavailable"


def _anon_huge_kib(address: int) -> int:
    """``AnonHugePages`` of the mapping of this process that holds ``address`` (Linux)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if not fields:
                continue
            head = fields[0]
            if "-" in head and not head.endswith(":"):  # a mapping's first line: "lo-hi perms ..."
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                return int(fields[1])
    return 0


def huge_pages_in_use() -> bool:
    """Whether a CPU tensor of a few MiB this process allocates now lies on huge pages: allocates
    and touches one 4 MiB tensor and reads the size of its mapping's huge pages from
    ``/proc/self/smaps``. False off Linux, with the kernel mode ``never``, when PyTorch made its
    first allocation before :data:`PYTORCH_VARIABLE` was set, or with ``INVNET_HUGE_PAGES=0``.

    >>> isinstance(huge_pages_in_use(), bool)
    True
    """
    if not sys.platform.startswith("linux") or kernel_mode() in ("never", "unavailable"):
        return False
    import torch

    probe = torch.ones(_PROBE_BYTES, dtype=torch.uint8)
    try:
        return _anon_huge_kib(probe.data_ptr()) > 0
    except (OSError, ValueError):
        return False


def describe(in_use: Optional[bool] = None) -> str:
    """One line for reports: whether large CPU tensors get huge pages, and if not, why
    (``in_use``: the answer of :func:`huge_pages_in_use` when the caller has it, so that the
    probe is not allocated twice).

    >>> describe().startswith("huge pages for CPU tensors")
    True
    """
    mode = kernel_mode()
    if huge_pages_in_use() if in_use is None else in_use:
        return f"huge pages for CPU tensors of 2 MiB or more: in use (kernel mode {mode})"
    if mode in ("never", "unavailable"):
        why = f"the kernel's transparent-huge-page mode is {mode}"
    elif os.environ.get(PYTORCH_VARIABLE, "0").strip() != "1":
        opted_out = os.environ.get(OPT_OUT_VARIABLE, "").strip() == "0"
        why = f"{PYTORCH_VARIABLE} is not 1" + (f", {OPT_OUT_VARIABLE}=0" if opted_out else "")
    else:
        why = "PyTorch allocated its first CPU tensor before invnet was imported (import invnet first)"
    return f"huge pages for CPU tensors of 2 MiB or more: not in use ({why})"


_request_huge_pages()  # before torch is imported anywhere through invnet (see the module docstring)
