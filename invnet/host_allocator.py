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
  when jemalloc is not found, off Linux, in a frozen or embedded interpreter, when the process is a
  program that calls :func:`invnet.cli.main` rather than the command itself (its command line is
  not safe to run twice), or once MPI is initialised (an MPI process cannot replace itself; under
  ``mpiexec ... python -m mpi4py`` pass the two variables to mpiexec instead,
  docs/distributed.md). The relaunched process puts ``LD_PRELOAD`` and ``MALLOC_CONF`` back as the
  user had them, so the processes it starts do not inherit the preload, and warns once if the
  loader refused the library (it then runs on glibc's allocator, as before).

The cost: jemalloc configured so keeps the memory of the step's peak mapped until the process ends
(the resident size stays at the peak instead of falling between steps; the peak itself is the same,
docs/benchmarks.md).

This module imports nothing heavy: the command calls it before torch does any work.
"""
from __future__ import annotations

import json
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


def _check_library(path: str, origin: str) -> str:
    """``path`` made absolute, after checking that the dynamic loader can take it in ``LD_PRELOAD``."""
    path = os.path.abspath(path)
    if any(c in path for c in ": \t"):
        raise ValueError(f"{origin}={path}: LD_PRELOAD cannot hold a path with ':' or blanks (expected the path of "
                         f"{_LIBRARY} without them)")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        raise FileNotFoundError(f"{origin}={path}: no such file (expected the path of {_LIBRARY})") from None
    if magic != b"\x7fELF":
        raise ValueError(f"{origin}={path}: not a shared library (expected the path of {_LIBRARY})")
    return path


def find_jemalloc(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The path of ``libjemalloc.so.2``: ``INVNET_JEMALLOC`` if set (it must be a shared library),
    else the first found in this Python's prefix (conda, virtual environments) or the standard
    library folders; None when there is none.

    >>> find_jemalloc({"INVNET_JEMALLOC": "/no/such/libjemalloc.so.2"})
    Traceback (most recent call last):
    ...
    FileNotFoundError: INVNET_JEMALLOC=/no/such/libjemalloc.so.2: no such file (expected the path of libjemalloc.so.2)
    """
    environ = os.environ if environ is None else environ
    given = environ.get(PATH_VARIABLE, "").strip()
    if given:
        return _check_library(given, PATH_VARIABLE)
    prefixes = [environ["CONDA_PREFIX"]] if environ.get("CONDA_PREFIX") else [sys.prefix]
    for folder in [os.path.join(p, "lib") for p in prefixes] + list(_STANDARD_DIRS):
        path = os.path.join(folder, _LIBRARY)
        if os.path.isfile(path):
            try:
                return _check_library(path, "found")
            except (ValueError, FileNotFoundError):
                continue
    return None  # (not the loader's cache: a stale entry names a file that is gone, and only a path can be checked)


def relaunch_environment(environ: Mapping[str, str], library: str) -> dict[str, str]:
    """The environment of the relaunched process: ``library`` first in ``LD_PRELOAD``,
    :data:`MALLOC_CONF` unless the user set one, and the marker that stops a second relaunch and
    carries the user's own two values, which the relaunched process puts back so that the
    processes it starts do not inherit the preload (:func:`relaunch_under_jemalloc`).

    >>> env = relaunch_environment({"LD_PRELOAD": "/x/libfoo.so"}, "/lib/libjemalloc.so.2")
    >>> env["LD_PRELOAD"], env["MALLOC_CONF"].startswith("oversize_threshold:1")
    ('/lib/libjemalloc.so.2:/x/libfoo.so', True)
    """
    env = dict(environ)
    saved = {"library": library, "LD_PRELOAD": env.get("LD_PRELOAD"), "MALLOC_CONF": env.get("MALLOC_CONF")}
    preload = env.get("LD_PRELOAD", "").strip()
    env["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    env.setdefault("MALLOC_CONF", MALLOC_CONF)
    env[_RELAUNCHED_VARIABLE] = json.dumps(saved)
    return env


#: in a relaunched process: the library it was relaunched with, and whether it did load
_relaunched: dict[str, object] = {}


def _settle_after_relaunch(marker: str) -> None:
    """In the relaunched process: put the user's LD_PRELOAD and MALLOC_CONF back (jemalloc is
    loaded by now; child processes should not inherit it), drop the marker, and warn once when the
    loader could not preload the library."""
    try:
        saved = json.loads(marker)
    except ValueError:
        saved = {}
    os.environ.pop(_RELAUNCHED_VARIABLE, None)
    for name in ("LD_PRELOAD", "MALLOC_CONF"):
        if saved.get(name) is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved[name]
    library = str(saved.get("library", "jemalloc"))
    loaded = allocator_in_use() == "jemalloc"
    _relaunched.update(library=library, loaded=loaded)
    if not loaded:
        print(f"invnet: warning: {library} could not be preloaded; running on the C library's malloc "
              f"(invnet/host_allocator.py)", file=sys.stderr, flush=True)


def _skip_reason(environ: Mapping[str, str]) -> Optional[str]:
    """Why the process must keep its allocator, or None when it may relaunch."""
    choice = environ.get(CHOICE_VARIABLE, "jemalloc").strip().lower()
    if choice not in ("jemalloc", "system"):
        raise ValueError(f"{CHOICE_VARIABLE}={choice!r}: expected 'jemalloc' or 'system'")
    if choice == "system":
        return f"{CHOICE_VARIABLE}=system"
    if _relaunched:
        return "relaunched once already"
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if getattr(sys, "frozen", False) or not sys.executable:
        return "not a plain Python interpreter"
    if allocator_in_use() in ("jemalloc", "tcmalloc"):
        return "already preloaded"
    if "mpi4py.MPI" in sys.modules:
        return "MPI is initialised"
    return None


def _started_as_the_command() -> bool:
    """Whether this process is the ``invnet`` command itself (its console script or
    ``python -m invnet``), not a program that calls :func:`invnet.cli.main`: only then is its
    command line safe to run again."""
    first = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    package = os.path.dirname(os.path.abspath(__file__))
    return os.path.basename(first) == "invnet" or first == os.path.join(package, "__main__.py")


def relaunch_under_jemalloc(argv: Optional[Sequence[str]] = None) -> None:
    """Replace this process with the same command line run under jemalloc, when the rules of the
    module docstring allow; otherwise return and do nothing. ``argv``: the full command line to
    run again (default ``sys.orig_argv``, and then only when this process is the ``invnet``
    command). Call it first thing: the process is replaced, so nothing done before survives. In
    the relaunched process it puts the environment back as the user had it and returns."""
    marker = os.environ.get(_RELAUNCHED_VARIABLE)
    if marker is not None and not _relaunched:
        _settle_after_relaunch(marker)
        return
    if _skip_reason(os.environ) is not None or (argv is None and not _started_as_the_command()):
        return
    library = find_jemalloc()
    if library is None:
        return
    args = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, args, relaunch_environment(os.environ, library))
    except OSError:  # no usable interpreter path (embedded Python, noexec): carry on as we are
        return


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
    if _relaunched and not _relaunched["loaded"]:
        return f"host allocator: the C library's malloc ({_relaunched['library']} could not be preloaded)"
    if found is None:
        return ("host allocator: the C library's malloc; large 3D steps pay page faults at every step "
                "(install jemalloc, e.g. `apt install libjemalloc2`, and invnet train and sample use it; "
                "invnet/host_allocator.py)")
    return (f"host allocator: the C library's malloc ({reason or 'not relaunched'}); for large 3D steps "
            f"preload {found} with MALLOC_CONF={MALLOC_CONF} (docs/distributed.md)")
