"""Training metrics: JSON lines on disk, a plot, and the process's memory."""
from __future__ import annotations

import json
import os
import resource
from typing import Optional

import torch

__all__ = ["MetricsLog", "peak_memory_mb", "plot_metrics"]


def peak_memory_mb() -> float:
    """Peak memory in MiB: the accelerator's peak allocation on CUDA, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class MetricsLog:
    """Append-only JSON-lines file of metric records (one dict per line).

    >>> import tempfile, os
    >>> log = MetricsLog(os.path.join(tempfile.mkdtemp(), "m.jsonl"))
    >>> log.append({"step": 1, "train_bpd": 2.5}); log.append({"step": 2, "train_bpd": 2.0})
    >>> log.truncate_after(1); [r["step"] for r in log.read()]
    [1]
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records after ``step`` (written after the checkpoint a run resumes from),
        rewriting the file atomically."""
        keep = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, self.path)


def plot_metrics(records: list[dict], path: str, title: Optional[str] = None) -> None:
    """Plot train and validation bits/dim and the step time against the step into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_bpd"]) for r in records if "train_bpd" in r]
    val = [(r["step"], r["val_bpd"]) for r in records if "val_bpd" in r]
    times = [(r["step"], r["step_time_s"]) for r in records if "step_time_s" in r]
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        ax.plot(*zip(*train), lw=0.8, label="train")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="validation")
    ax.set_xlabel("step"), ax.set_ylabel("NLL (bits/dim, normalised data)"), ax.legend()
    if times:
        ax_t.plot(*zip(*times), lw=0.8)
    ax_t.set_xlabel("step"), ax_t.set_ylabel("step time (s)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
