"""Which checkpoint of a run a job uses: ``best`` (by validation, the default), ``last`` or ``step-N``.

``invnet sample`` and ``invnet info`` take a run folder and use its best-by-validation weights
unless told otherwise: the last weights of a run that trained past its best validation loss are
over-fitted, and their posteriors too narrow. A run without validation has no best; then the
last checkpoint is used and the note says so.
"""
from __future__ import annotations

import os
import re
from typing import Optional

from .checkpoint import CheckpointError, best_checkpoint, list_checkpoints, read_meta

__all__ = ["choose_checkpoint", "available_checkpoints"]

_STEP = re.compile(r"^step-(\d+)$")


def _checkpoints_folder(path: str) -> Optional[str]:
    for d in (os.path.join(path, "checkpoints"), path):
        if list_checkpoints(d) or best_checkpoint(d):
            return d
    return None


def _step_of(folder: str) -> Optional[int]:
    m = _STEP.match(os.path.basename(folder))
    return int(m.group(1)) if m else None


def _best_meta(folder: str) -> dict:
    try:
        return read_meta(folder)
    except CheckpointError:  # a damaged one: reading the checkpoint later names the file
        return {}


def available_checkpoints(checkpoints: str) -> list[str]:
    """What ``--checkpoint`` can pick in a ``checkpoints`` folder, in words: ``best (step B)``,
    ``last (step L)``, then every ``step-N``."""
    steps = list_checkpoints(checkpoints)
    found = []
    best = best_checkpoint(checkpoints)
    if best:
        found.append(f"best (step {_best_meta(best).get('step', '?')})")
    if steps:
        found.append(f"last (step {_step_of(steps[-1])})")
    return found + [f"step-{_step_of(p)}" for p in steps]


def choose_checkpoint(path: str, which: Optional[str] = None) -> tuple[str, str]:
    """The checkpoint folder ``which`` names in the run at ``path``, and a line saying which it is.

    ``path`` is a run folder (or its ``checkpoints`` folder), or one checkpoint folder (then
    ``which`` must be ``None``). ``which``: ``"best"`` (lowest validation loss), ``"last"`` (the
    newest step checkpoint), ``"step-N"``; ``None`` means best, or last when the run has no best
    (no validation), which the line then says. A choice the run does not hold raises
    ``ValueError`` listing what it holds.

    >>> import tempfile, torch
    >>> from invnet.training.checkpoint import save_checkpoint, save_best
    >>> run = tempfile.mkdtemp(); ck = os.path.join(run, "checkpoints")
    >>> for s in (10, 20):
    ...     _ = save_checkpoint(ck, s, {"w": torch.ones(1)}, {}, {})
    >>> choose_checkpoint(run)[1]
    'last checkpoint, step 20 (the run has no best-by-validation checkpoint: it ran without validation)'
    >>> _ = save_best(ck, 10, {"w": torch.ones(1)}, {"best": {"step": 10, "val_loss": 1.5}, "loss_name": "bpd"})
    >>> os.path.basename(choose_checkpoint(run)[0]), choose_checkpoint(run, "step-20")[1]
    ('best', 'checkpoint step-20')
    >>> choose_checkpoint(run, "step-5")
    Traceback (most recent call last):
    ...
    ValueError: the run has no checkpoint step-5; it holds: best (step 10), last (step 20), step-10, step-20
    """
    if which is not None and which not in ("best", "last") and not _STEP.match(which):
        raise ValueError(f"--checkpoint must be best, last or step-N (N a step number), got {which!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isfile(os.path.join(path, "meta.json")):
        if which is not None:
            raise ValueError(f"{path} is one checkpoint already; --checkpoint {which} picks one of a run: give the "
                             "run folder instead")
        return path, f"checkpoint {path}"
    folder = _checkpoints_folder(path)
    if folder is None:
        raise ValueError(f"{path!r} is neither a checkpoint (no meta.json) nor a run folder with checkpoints")
    steps, best = list_checkpoints(folder), best_checkpoint(folder)
    if which in (None, "best") and best:
        meta = _best_meta(best)
        record = meta.get("best") or {}
        loss = record.get("val_loss")
        value = f", validation {meta.get('loss_name', 'loss')} {loss:.6g}" if isinstance(loss, (int, float)) else ""
        return best, f"best checkpoint by validation, step {meta.get('step', '?')}{value}"
    if which is None and steps:
        return steps[-1], (f"last checkpoint, step {_step_of(steps[-1])} (the run has no best-by-validation "
                           "checkpoint: it ran without validation)")
    if which == "last" and steps:
        return steps[-1], f"last checkpoint, step {_step_of(steps[-1])}"
    if which is not None and _STEP.match(which):
        wanted = int(_STEP.match(which).group(1))
        chosen = [p for p in steps if _step_of(p) == wanted]
        if chosen:
            return chosen[0], f"checkpoint step-{wanted}"
    held = ", ".join(available_checkpoints(folder)) or "nothing"
    what = f"{which} checkpoint" if which in ("best", "last") else f"checkpoint {which}"
    raise ValueError(f"the run has no {what}; it holds: {held}")
