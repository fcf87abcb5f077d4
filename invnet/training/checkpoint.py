"""Checkpoints: a directory per step, written atomically, loaded without executing code.

Layout of ``<run>/checkpoints/step-00000120/``:

* ``model.safetensors``: the network's state dict (weights and buffers);
* ``state.pt``: optimizer, scheduler, RNG states, data position (``torch.save``, read back with
  ``torch.load(weights_only=True)``, which unpickles only tensors and plain containers);
* ``meta.json``: step, network spec, normalisation, timestamps (human-readable).

Beside them, ``<run>/checkpoints/best/`` holds the weights with the lowest validation loss so far
(:func:`save_best`; its ``meta.json`` says at which step, under ``"best"``). It is not a step
checkpoint: ``keep_last`` never counts or deletes it, resuming never starts from it, and its
``state.pt`` holds only the step and the data position (no optimizer: it is for sampling, not for
resuming).

The directory is assembled under a hidden temporary name and renamed into place
(:func:`invnet.data.atomic.atomic_dir`), so a checkpoint directory either exists complete or not
at all: a crash or kill while writing leaves the previous checkpoints untouched (and a hidden
``.step-*.tmp-*`` directory that the next save removes). A checkpoint damaged afterwards (a
truncated copy, a full disk) is reported by :func:`read_checkpoint` as a :class:`CheckpointError`
naming the file; :func:`latest_readable_checkpoint` skips such checkpoints.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..data.atomic import atomic_dir, move_aside, remove_leftovers

__all__ = [
    "Checkpoint", "CheckpointError", "save_checkpoint", "read_checkpoint", "list_checkpoints", "latest_checkpoint",
    "latest_readable_checkpoint", "set_aside", "resolve_checkpoint", "capture_rng", "restore_rng", "BEST",
    "save_best", "best_checkpoint", "read_meta",
]

_NAME = re.compile(r"^step-(\d{8,})$")
#: the folder of the best-by-validation weights, beside the step checkpoints
BEST = "best"


def capture_rng(generators: Optional[dict[str, torch.Generator]] = None) -> dict:
    """The global torch, numpy and python RNG states and those of named generators, as plain
    containers of tensors and numbers (safe for ``weights_only`` loading)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }


def restore_rng(state: dict, generators: Optional[dict[str, torch.Generator]] = None) -> None:
    """Inverse of :func:`capture_rng`.

    >>> s = capture_rng(); a = torch.rand(2); restore_rng(s); bool((torch.rand(2) == a).all())
    True
    """
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for k, g in (generators or {}).items():
        if k not in state["generators"]:
            raise ValueError(f"checkpoint has no state for generator {k!r}; it has {sorted(state['generators'])}")
        g.set_state(state["generators"][k])


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``meta`` (JSON), ``weights`` (state dict) and ``state`` (the rest)."""

    path: str
    meta: dict
    weights: dict
    state: dict

    @property
    def step(self) -> int:
        return int(self.meta["step"])


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or corrupt (the message names the file)."""


def _write_files(tmp: str, weights: dict, state: dict, meta: dict) -> None:
    save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"invnet_meta": json.dumps(meta)})
    torch.save(state, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def _write_folder(final: str, step: int, weights: dict, state: dict, meta: dict) -> str:
    """Write one checkpoint folder atomically (replacing one of the same name)."""
    meta = dict(meta, step=int(step), saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    weights = {k: v.detach().to("cpu").clone().contiguous() for k, v in weights.items()}
    with atomic_dir(final, replace=True) as tmp:
        _write_files(tmp, weights, state, meta)
    return final


def list_checkpoints(directory: str) -> list[str]:
    """Complete checkpoint directories under ``directory``, oldest step first."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(directory) if (m := _NAME.match(n))]
    return [os.path.join(directory, n) for _, n in sorted(found)]


def latest_checkpoint(directory: str) -> Optional[str]:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def resolve_checkpoint(path: str) -> str:
    """Accept a checkpoint directory, a ``checkpoints`` directory or a run directory (then the
    latest checkpoint is taken)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    for d in (path, os.path.join(path, "checkpoints")):
        latest = latest_checkpoint(d)
        if latest:
            return latest
    raise ValueError(f"{path!r} is neither a checkpoint (no meta.json) nor a run directory with checkpoints")


def save_checkpoint(
    directory: str, step: int, weights: dict, state: dict, meta: dict, keep_last: Optional[int] = None
) -> str:
    """Write checkpoint ``step`` atomically into ``directory`` and keep only the last
    ``keep_last`` ones. ``weights`` is a state dict, ``state`` plain containers of tensors and
    numbers, ``meta`` JSON-serialisable. Returns the checkpoint's path.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> for s in (1, 2, 3):
    ...     _ = save_checkpoint(d, s, {"w": torch.ones(2) * s}, {"k": s}, {"note": "x"}, keep_last=2)
    >>> [os.path.basename(p) for p in list_checkpoints(d)], read_checkpoint(d).weights["w"].tolist()
    (['step-00000002', 'step-00000003'], [3.0, 3.0])
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    os.makedirs(directory, exist_ok=True)
    remove_leftovers(directory)  # of a write that was killed
    # the same step saved again after a resume is swapped
    final = _write_folder(os.path.join(directory, f"step-{int(step):08d}"), step, weights, state, meta)
    if keep_last is not None:
        for old in list_checkpoints(directory)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(directory: str, step: int, weights: dict, meta: dict, state: Optional[dict] = None) -> str:
    """Write the best-by-validation weights (those of ``step``) atomically to ``directory/best``,
    replacing the previous best; ``meta`` should say why (``{"best": {"step": .., "val_loss": ..}}``),
    ``state`` what else is worth knowing at that step (e.g. the data position; no optimizer).
    Returns the folder's path.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = save_checkpoint(d, 5, {"w": torch.ones(1)}, {}, {}, keep_last=1)
    >>> _ = save_best(d, 3, {"w": torch.zeros(1)}, {"best": {"step": 3, "val_loss": 0.5}})
    >>> _ = save_checkpoint(d, 6, {"w": torch.ones(1)}, {}, {}, keep_last=1)
    >>> [os.path.basename(p) for p in list_checkpoints(d)], read_checkpoint(best_checkpoint(d)).step
    (['step-00000006'], 3)
    """
    os.makedirs(directory, exist_ok=True)
    return _write_folder(os.path.join(directory, BEST), step, weights, dict(state or {}, step=int(step)), meta)


def best_checkpoint(directory: str) -> Optional[str]:
    """The best-by-validation checkpoint folder under ``directory`` (a ``checkpoints`` folder),
    or ``None`` when the run has none (no validation yet, or none at all)."""
    path = os.path.join(directory, BEST)
    return path if os.path.isfile(os.path.join(path, "meta.json")) else None


def _load(folder: str, name: str, loader: Callable[[str], Any]) -> Any:
    file = os.path.join(folder, name)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
    try:
        return loader(file)
    except Exception as err:  # safetensors, pickle, zip and JSON readers raise many types for a bad file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"{file} is unreadable (truncated or corrupt?): {reason}") from None


def _load_meta(file: str) -> dict:
    with open(file) as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise ValueError("expected a JSON object with an integer 'step'")
    return meta


def read_meta(folder: str) -> dict:
    """Only the small JSON part (``meta.json``) of the checkpoint ``folder``: step, spec, best, ...
    Raises :class:`CheckpointError` naming a missing or damaged file."""
    return _load(folder, "meta.json", _load_meta)


def read_checkpoint(path: str) -> Checkpoint:
    """Load a checkpoint (see :func:`resolve_checkpoint` for accepted paths) without running any
    pickled code: safetensors for the weights, ``torch.load(weights_only=True)`` for the rest.
    Raises :class:`CheckpointError` (a ``ValueError``) naming a missing or damaged file."""
    path = resolve_checkpoint(path)
    meta = _load(path, "meta.json", _load_meta)
    weights = _load(path, "model.safetensors", load_file)
    state = _load(path, "state.pt", lambda f: torch.load(f, weights_only=True))
    if not isinstance(state, dict):
        raise CheckpointError(f"{os.path.join(path, 'state.pt')} holds {type(state).__name__}, not a dict")
    return Checkpoint(path, meta, weights, state)


def latest_readable_checkpoint(directory: str) -> tuple[Optional[Checkpoint], list[tuple[str, str]]]:
    """The newest checkpoint under ``directory`` that reads completely (``None`` if none does),
    and the newer ones that did not, as ``(path, reason)`` pairs, newest first.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> for s in (1, 2):
    ...     _ = save_checkpoint(d, s, {"w": torch.ones(1)}, {}, {})
    >>> _ = open(os.path.join(d, "step-00000002", "state.pt"), "wb").write(b"truncat")
    >>> ckpt, skipped = latest_readable_checkpoint(d)
    >>> ckpt.step, [os.path.basename(p) for p, _ in skipped]
    (1, ['step-00000002'])
    """
    skipped = []
    for path in reversed(list_checkpoints(directory)):
        try:
            return read_checkpoint(path), skipped
        except CheckpointError as err:
            skipped.append((path, str(err)))
    return None, skipped


def set_aside(path: str) -> str:
    """Rename an unreadable checkpoint to ``step-NNNNNNNN.unreadable-DATE`` (kept for inspection,
    no longer listed, so it is neither resumed from nor counted by ``keep_last``); returns the new path."""
    return move_aside(path, tag="unreadable")
