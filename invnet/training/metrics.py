"""Training metrics: JSON lines on disk and the process's memory (the plot: :mod:`invnet.plotting`)."""
from __future__ import annotations

import json
import os
import resource
from typing import Optional

import torch

from ..data.atomic import atomic_file

__all__ = ["MetricsLog", "peak_memory_mb"]


def peak_memory_mb(device: Optional[torch.device] = None) -> float:
    """Peak memory in MiB: the GPU's peak allocation when ``device`` is a CUDA device, else the
    process's peak resident memory."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class MetricsLog:
    """Append-only JSON-lines file of metric records (one dict per line). A last line cut short by
    a kill while appending is ignored when reading (and dropped by the next :meth:`truncate_after`).

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
            lines = [line for line in f if line.strip()]
        records = []
        for k, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if k == len(lines) - 1 and not line.endswith("\n"):  # an append cut short
                    break
                raise ValueError(f"{self.path}, line {k + 1}: not a JSON record: {line[:80]!r}") from None
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records after ``step`` (written after the checkpoint a run resumes from),
        rewriting the file atomically."""
        keep = [r for r in self.read() if r.get("step", 0) <= step]
        with atomic_file(self.path) as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
