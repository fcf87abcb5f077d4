"""Atomic writes: a file or a folder exists complete or not at all.

Everything invnet writes goes through here: the output is assembled under a hidden temporary name
in the same folder (``.NAME.tmp-XXXXXX``, so the final rename never crosses a file system) and
moved into place with :func:`os.replace` only when complete. A crash, a ``kill -9`` or an
exception leaves the previous version untouched; an exception also removes the temporary, and a
killed writer's leftovers are removed by :func:`remove_leftovers`. ``durable=True`` (the default)
flushes the data to disk (``fsync``) before the rename and the folder after it, so a power cut
cannot leave a renamed but empty file; use ``durable=False`` for outputs cheap to remake (figures).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from typing import IO, Iterator, Optional

__all__ = ["atomic_file", "atomic_path", "atomic_dir", "move_aside", "remove_leftovers", "is_leftover", "fsync_path",
           "check_creatable"]

_TMP_MARK = ".tmp-"


def fsync_path(path: str) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def _temporary_name(path: str) -> tuple[str, str]:
    folder, name = os.path.split(os.path.abspath(path))
    if not name:
        raise ValueError(f"{path!r} names no file or folder")
    return folder, f".{name}{_TMP_MARK}"


def is_leftover(name: str) -> bool:
    """Whether ``name`` (a base name) is a temporary of this module.

    >>> is_leftover(".model.safetensors.tmp-ab12cd"), is_leftover("model.safetensors")
    (True, False)
    """
    return name.startswith(".") and _TMP_MARK in name


def remove_leftovers(folder: str, of: Optional[str] = None) -> list[str]:
    """Remove the temporaries a killed writer left in ``folder`` (only those of the output named
    ``of`` when given); returns their names. Call it only where no other process is writing the
    same output at the same time (e.g. the one process that saves checkpoints).

    >>> d = tempfile.mkdtemp(); _ = [os.mkdir(os.path.join(d, n)) for n in (".a.zarr.tmp-x1", ".b.zarr.tmp-y")]
    >>> remove_leftovers(d, of="a.zarr"), sorted(os.listdir(d))
    (['.a.zarr.tmp-x1'], ['.b.zarr.tmp-y'])
    """
    if not os.path.isdir(folder):
        return []
    removed = []
    mine = None if of is None else f".{of}{_TMP_MARK}"
    for name in sorted(os.listdir(folder)):
        if is_leftover(name) and (mine is None or name.startswith(mine)):
            target = os.path.join(folder, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(target)
            removed.append(name)
    return removed


def check_creatable(path: str, what: str) -> None:
    """Raise ``ValueError`` (naming ``what``, e.g. ``"--out"``) unless ``path`` can be created: its
    nearest existing ancestor must be a writable folder (missing folders between are created later).

    >>> a_file = tempfile.mkstemp()[1]
    >>> check_creatable(os.path.join(a_file, "results.zarr"), "--out")
    Traceback (most recent call last):
    ...
    ValueError: --out '.../results.zarr' cannot be created: '...' is not a writable folder
    """
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path!r} cannot be created: {existing!r} is not a writable folder")


@contextlib.contextmanager
def atomic_path(path: str, durable: bool = True) -> Iterator[str]:
    """Yield a temporary path next to ``path`` (same extension, so libraries that judge the format
    from the name, such as matplotlib or h5py, still do); when the block ends without an exception
    the file is moved onto ``path``, otherwise it is removed.

    >>> import tempfile, os
    >>> target = os.path.join(tempfile.mkdtemp(), "a.txt")
    >>> with atomic_path(target) as tmp:
    ...     _ = open(tmp, "w").write("hello")
    ...     os.path.exists(target)
    False
    >>> open(target).read()
    'hello'
    """
    folder, prefix = _temporary_name(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    if durable:
        fsync_path(folder)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", durable: bool = True) -> Iterator[IO]:
    """Open a temporary file for writing (``mode`` ``"w"`` or ``"wb"``) that replaces ``path`` when
    the block ends without an exception (see :func:`atomic_path`).

    >>> import tempfile, os, json
    >>> target = os.path.join(tempfile.mkdtemp(), "a.json")
    >>> with atomic_file(target) as f:
    ...     json.dump({"step": 3}, f)
    >>> json.load(open(target))
    {'step': 3}
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path, durable) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()


@contextlib.contextmanager
def atomic_dir(path: str, replace: bool = False, durable: bool = True) -> Iterator[str]:
    """Yield a fresh temporary folder next to ``path`` (named like it, so ``results.zarr`` stays a
    ``.zarr``); when the block ends without an exception it is renamed to ``path``, otherwise it is
    removed. An existing ``path`` is an error unless ``replace``: then the old folder is first
    renamed aside, the new one renamed in, and the old one removed last, so at every instant one
    complete version exists under ``path`` or under the side name (a crash between the two renames
    leaves the old version at ``.NAME.tmp-old-*``, not lost).

    >>> import tempfile, os
    >>> target = os.path.join(tempfile.mkdtemp(), "store")
    >>> with atomic_dir(target) as tmp:
    ...     _ = open(os.path.join(tmp, "part"), "w").write("1")
    >>> os.listdir(target)
    ['part']
    """
    folder, prefix = _temporary_name(path)
    if os.path.lexists(path) and not replace:
        raise FileExistsError(f"{path!r} already exists")
    if os.path.lexists(path) and (os.path.islink(path) or not os.path.isdir(path)):
        raise FileExistsError(f"{path!r} exists and is not a folder; a folder does not replace it")
    suffix = os.path.splitext(path)[1]
    tmp = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        yield tmp
        if durable:
            _fsync_tree(tmp)
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=prefix + "old-", dir=folder)
            os.replace(path, old)  # a folder may replace an empty folder
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if durable:
        fsync_path(folder)


def move_aside(path: str, tag: str = "previous") -> str:
    """Rename ``path`` (a file or folder) to a free sibling name ``NAME.TAG-YYYYmmdd-HHMMSS`` in one
    atomic step and return the new path (a counter is appended when that name is taken).

    >>> import tempfile, os
    >>> d = os.path.join(tempfile.mkdtemp(), "run"); os.mkdir(d)
    >>> moved = move_aside(d); os.path.basename(moved).startswith("run.previous-"), os.path.exists(d)
    (True, False)
    """
    path = os.path.abspath(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, k = f"{path}.{tag}-{stamp}", 1
    while os.path.lexists(target):
        k += 1
        target = f"{path}.{tag}-{stamp}-{k}"
    os.rename(path, target)  # rename, not replace: never onto an existing name
    fsync_path(os.path.dirname(path))
    return target
