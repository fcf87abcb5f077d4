"""What a run folder (``[training] out_dir``) holds, and the rules for resuming or restarting it.

Every check here only reads; the job calls them all before it writes anything (docs/config.md,
"Resume, restart, interrupt").
"""
from __future__ import annotations

import json
import os
from typing import Optional

from ..data.atomic import check_creatable
from .checkpoint import Checkpoint
from .config import resume_differences

__all__ = ["RUN_FILES", "holds_run", "check_out_dir", "check_resume", "check_restart", "check_same_data"]

#: what a run writes into its out_dir
RUN_FILES = ("checkpoints", "metrics.jsonl", "metrics.png", "config.json")


def holds_run(out_dir: str) -> bool:
    """Whether ``out_dir`` holds (part of) a run: checkpoints, metrics or a stored config.

    >>> import tempfile
    >>> holds_run(tempfile.mkdtemp())
    False
    """
    return any(os.path.exists(os.path.join(out_dir, n)) for n in RUN_FILES)


def _within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out_dir(out_dir: str) -> None:
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"[training] out_dir {out_dir!r} exists and is not a folder; point out_dir at a folder "
                         "(it is created if missing)")
    check_creatable(out_dir, "[training] out_dir")


def _stored_config(out_dir: str) -> Optional[dict]:
    path = os.path.join(out_dir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err}); it records the run's settings. Restore it, or start over "
                         "with --restart (the previous run is moved aside)") from None


def check_resume(cfg: dict, out_dir: str) -> None:
    """Refuse to resume a run with settings that change what it learns (see resume_differences)."""
    stored = _stored_config(out_dir)
    if stored is None:
        return
    diffs = resume_differences(stored, cfg)
    if diffs:
        raise ValueError(
            f"the config differs from the run in {out_dir} it would resume ({os.path.join(out_dir, 'config.json')}): "
            + "; ".join(diffs) + ". A resumed run may change only how long, how often and how it logs, validates, "
            "checkpoints and reads (docs/config.md). Undo the change, give the new settings another out_dir, or "
            "start over with --restart (the previous run is moved aside)")


def check_restart(cfg: dict, config_path: Optional[str]) -> None:
    """A restart moves the whole previous out_dir aside: refuse when that would move what this job needs."""
    out_dir = cfg["training"]["out_dir"]
    inside = [(what, p) for what, p in (("the data", cfg["data"]["path"]), ("the config file", config_path),
                                         ("the current folder", os.getcwd())) if p and _within(p, out_dir)]
    if inside:
        what, p = inside[0]
        raise ValueError(f"--restart moves the previous run in {out_dir} aside as a whole, but it also holds {what} "
                         f"({p}); give the run an out_dir of its own, or move the previous run away yourself")


def check_same_data(ckpt: Checkpoint, now: dict, where: str) -> None:
    """On resume the data may have moved (``[data] path`` may change), but they must look the same:
    ``now`` (the run's data description, as checkpoints store it) must agree with the stored one
    in the shapes and sample counts."""
    stored = ckpt.meta.get("data") or {}
    keys = ("x_shape", "y_shape", "n_train", "n_validation")
    differ = [f"{k} {stored[k]} -> {now[k]}" for k in keys if k in stored and k in now and stored[k] != now[k]]
    if differ:
        raise ValueError(f"the data of {where} differ from those the run in {ckpt.path} was trained on: "
                         + ", ".join(differ) + "; point [data] at the run's data, or start over with --restart")
