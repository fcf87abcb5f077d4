"""The C allocator behind CPU tensors: jemalloc for ``invnet train`` and ``invnet sample`` where it
is installed, because glibc makes a large 3D step pay for its memory again at every step.

Why: a training step on a 3D volume allocates its large temporaries (conditioner activations and
their gradients, 100 MB and more from 256^3 on) afresh each time. glibc serves every block above
32 MiB (its largest mmap threshold on 64-bit Linux, a limit ``mallopt`` cannot raise) with a new
``mmap`` and returns it with ``munmap`` on ``free``, so the kernel faults each such tensor in again
and zeroes every page of it before the step writes it. Huge pages (:mod:`invnet.host_memory`) cut
the number of faults, not the zeroing. Measured on a 3D conditional HINT step, one thread, batch 1
(docs/benchmarks.md, section 4): 980 ns per voxel at 128^3 and 1500-1530 ns at 256^3 under glibc
with huge pages, of which 570-590 ns are kernel time; under jemalloc, which keeps freed memory
mapped and hands it out again, 977-984 ns at 128^3 and 978-988 ns at 256^3 with no page faults.

What this module does:

* :func:`allocator_in_use` names the allocator of this process (a preloaded jemalloc or tcmalloc
  shows in ``/proc/self/maps``; otherwise the C library's).
* :func:`find_jemalloc` looks for ``libjemalloc.so.2`` where Linux distributions and conda put it
  (Debian/Ubuntu: ``apt install libjemalloc2``; conda: ``conda install jemalloc``), or takes
  ``INVNET_JEMALLOC=/path/to/libjemalloc.so.2``.
* :func:`relaunch_under_jemalloc` restarts the command line that started this process with
  jemalloc preloaded (``LD_PRELOAD``) and configured by :data:`MALLOC_CONF` (freed memory kept for
  reuse; the settings of PyTorch's own CPU launcher, ``torch.backends.xeon.run_cpu``). The
  ``invnet`` command calls it for ``train`` and ``sample`` before it does anything else. It does
  nothing when the allocator is already jemalloc or tcmalloc, when ``INVNET_ALLOCATOR=system``,
  when jemalloc is not found, off Linux, or once MPI is initialised (an MPI process cannot replace
  itself; under ``mpiexec ... python -m mpi4py`` pass the two variables to mpiexec instead,
  docs/distributed.md).

The cost: jemalloc configured so keeps the memory of the step's peak mapped until the process ends
(the resident size stays at the peak instead of falling between steps; the peak itself is the same,
docs/benchmarks.md).

This module imports nothing heavy: the command calls it before torch does any work.
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from typing import Mapping, Optional, Sequence

__all__ = [
    "MALLOC_CONF", "CHOICE_VARIABLE", "PATH_VARIABLE", "allocator_in_use", "find_jemalloc",
    "relaunch_environment", "relaunch_under_jemalloc", "describe",
]

#: jemalloc's settings: large blocks in their own arena, freed pages never handed back to the kernel
MALLOC_CONF = "oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"
#: ``system`` keeps the C library's allocator; ``jemalloc`` (the default) uses jemalloc where found
CHOICE_VARIABLE = "INVNET_ALLOCATOR"
#: where jemalloc lies, when it is not in a standard place
PATH_VARIABLE = "INVNET_JEMALLOC"
#: set in the relaunched process, so that it never relaunches again
_RELAUNCHED_VARIABLE = "INVNET_ALLOCATOR_RELAUNCHED"
_LIBRARY = "libjemalloc.so.2"
_STANDARD_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                  "/usr/local/lib", "/usr/local/lib64")


def allocator_in_use(maps_path: str = "/proc/self/maps") -> str:
    """``jemalloc``, ``tcmalloc`` (either loaded into this process), ``system`` (the C library's
    malloc), or ``unknown`` where the process's mappings cannot be read (not Linux).

    >>> allocator_in_use() in ("jemalloc", "tcmalloc", "system", "unknown")
    True
    """
    try:
        with open(maps_path) as f:
            text = f.read()
    except OSError:
        return "unknown"
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in text:
            return name
    return "system"


def find_jemalloc(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The path of ``libjemalloc.so.2``: ``INVNET_JEMALLOC`` if set (it must exist), else the
    first found in the active conda environment, the standard library folders, or by the
    dynamic linker's cache; None when there is none.

    >>> find_jemalloc({"INVNET_JEMALLOC": "/no/such/libjemalloc.so.2"})
    Traceback (most recent call last):
    ...
    FileNotFoundError: INVNET_JEMALLOC=/no/such/libjemalloc.so.2: no such file (expected the path of libjemalloc.so.2)
    """
    environ = os.environ if environ is None else environ
    given = environ.get(PATH_VARIABLE, "").strip()
    if given:
        if not os.path.isfile(given):
            raise FileNotFoundError(f"{PATH_VARIABLE}={given}: no such file (expected the path of {_LIBRARY})")
        return given
    dirs = [os.path.join(environ[v], "lib") for v in ("CONDA_PREFIX", "VIRTUAL_ENV") if environ.get(v)]
    for folder in dirs + list(_STANDARD_DIRS):
        path = os.path.join(folder, _LIBRARY)
        if os.path.isfile(path):
            return path
    name = ctypes.util.find_library("jemalloc")  # e.g. "libjemalloc.so.2", resolvable by the loader
    return name or None


def relaunch_environment(environ: Mapping[str, str], library: str) -> dict[str, str]:
    """The environment of the relaunched process: ``library`` first in ``LD_PRELOAD``,
    :data:`MALLOC_CONF` unless the user set one, and the marker that stops a second relaunch.

    >>> env = relaunch_environment({"LD_PRELOAD": "/x/libfoo.so"}, "/lib/libjemalloc.so.2")
    >>> env["LD_PRELOAD"], env["MALLOC_CONF"].startswith("oversize_threshold:1")
    ('/lib/libjemalloc.so.2:/x/libfoo.so', True)
    """
    env = dict(environ)
    preload = env.get("LD_PRELOAD", "").strip()
    env["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    env.setdefault("MALLOC_CONF", MALLOC_CONF)
    env[_RELAUNCHED_VARIABLE] = "1"
    return env


def _skip_reason(environ: Mapping[str, str]) -> Optional[str]:
    """Why the process must keep its allocator, or None when it may relaunch."""
    choice = environ.get(CHOICE_VARIABLE, "jemalloc").strip().lower()
    if choice not in ("jemalloc", "system"):
        raise ValueError(f"{CHOICE_VARIABLE}={choice!r}: expected 'jemalloc' or 'system'")
    if choice == "system":
        return f"{CHOICE_VARIABLE}=system"
    if environ.get(_RELAUNCHED_VARIABLE) == "1":
        return "already relaunched"
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if allocator_in_use() in ("jemalloc", "tcmalloc"):
        return "already preloaded"
    if "mpi4py.MPI" in sys.modules:
        return "MPI is initialised"
    return None


def relaunch_under_jemalloc(argv: Optional[Sequence[str]] = None) -> None:
    """Replace this process with the same command line (``argv``, default ``sys.orig_argv``) run
    under jemalloc, when the rules of the module docstring allow; otherwise return and do nothing.
    Call it first thing: the process is replaced, so nothing done before survives."""
    if _skip_reason(os.environ) is not None:
        return
    library = find_jemalloc()
    if library is None:
        return
    args = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, relaunch_environment(os.environ, library))


def describe() -> str:
    """One line for reports: the allocator in use and, under glibc, what to do about it.

    >>> describe().startswith("host allocator: ")
    True
    """
    name = allocator_in_use()
    if name != "system":
        return f"host allocator: {name}"
    try:
        reason = _skip_reason(os.environ)
        found = find_jemalloc()
    except (ValueError, FileNotFoundError) as err:
        return f"host allocator: the C library's malloc ({err})"
    if reason == f"{CHOICE_VARIABLE}=system":
        return f"host allocator: the C library's malloc ({reason})"
    if found is None:
        return ("host allocator: the C library's malloc; large 3D steps pay page faults at every step "
                "(install jemalloc, e.g. `apt install libjemalloc2`, and invnet train and sample use it; "
                "invnet/host_allocator.py)")
    return (f"host allocator: the C library's malloc ({reason or 'not relaunched'}); for large 3D steps "
            f"preload {found} with MALLOC_CONF={MALLOC_CONF} (docs/distributed.md)")
