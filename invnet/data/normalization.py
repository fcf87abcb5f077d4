"""Per-channel normalisation statistics, computed once by streaming, stored with the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .pairs import PairDataset

__all__ = ["Normalization", "compute_normalization"]


def _channel_view(t: Tensor, v: Sequence[float]) -> Tensor:
    return torch.as_tensor(v, dtype=t.dtype, device=t.device).reshape((1, -1) + (1,) * (t.dim() - 2))


@dataclass
class Normalization:
    r"""Per-channel affine normalisation :math:`\hat x = (x - \mu_x) / \sigma_x` (likewise for y).

    Stored as plain lists (JSON in checkpoints). The log-density of raw data follows from that of
    normalised data by :math:`\log p(x) = \log p(\hat x) - |S| \sum_c \log\sigma_{x,c}`.

    >>> import torch
    >>> norm = Normalization([1.0], [2.0], [0.0], [1.0])
    >>> norm.x_to_raw(norm.x_to_normal(torch.tensor([[[3.0]]]))).tolist()
    [[[3.0]]]
    """

    x_mean: list[float]
    x_std: list[float]
    y_mean: list[float]
    y_std: list[float]

    def x_to_normal(self, x: Tensor) -> Tensor:
        return (x - _channel_view(x, self.x_mean)) / _channel_view(x, self.x_std)

    def x_to_raw(self, x: Tensor) -> Tensor:
        return x * _channel_view(x, self.x_std) + _channel_view(x, self.x_mean)

    def x_std_to_raw(self, s: Tensor) -> Tensor:
        """Scale a standard deviation of normalised x back to raw units."""
        return s * _channel_view(s, self.x_std)

    def y_to_normal(self, y: Tensor) -> Tensor:
        return (y - _channel_view(y, self.y_mean)) / _channel_view(y, self.y_std)

    def to_dict(self) -> dict:
        return {"x_mean": list(self.x_mean), "x_std": list(self.x_std), "y_mean": list(self.y_mean), "y_std": list(self.y_std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        keys = {"x_mean", "x_std", "y_mean", "y_std"}
        if set(d) != keys:
            raise ValueError(f"normalisation needs exactly the keys {sorted(keys)}, got {sorted(d)}")
        return cls(*(list(map(float, d[k])) for k in ("x_mean", "x_std", "y_mean", "y_std")))

    @classmethod
    def identity(cls, x_channels: int, y_channels: int) -> "Normalization":
        return cls([0.0] * x_channels, [1.0] * x_channels, [0.0] * y_channels, [1.0] * y_channels)


class _ChannelMoments:
    """Streaming per-channel count, mean and M2 (Chan et al.'s pairwise merge of Welford sums)."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def add(self, block: np.ndarray) -> None:
        axes = (0,) + tuple(range(2, block.ndim))
        nb = block.size // block.shape[1]
        mb = block.mean(axis=axes)
        m2b = ((block - mb.reshape((1, -1) + (1,) * (block.ndim - 2))) ** 2).sum(axis=axes)
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * nb / n
        self.m2 = self.m2 + m2b + delta**2 * self.n * nb / n
        self.n = n

    def std(self, floor: float) -> np.ndarray:
        return np.maximum(np.sqrt(self.m2 / max(self.n, 1)), floor)


def compute_normalization(
    dataset: PairDataset, indices: Optional[Sequence[int]] = None, rows: Optional[int] = None, floor: float = 1e-8
) -> Normalization:
    """Per-channel mean and standard deviation of ``x`` and ``y`` over ``indices`` (all samples by
    default), streamed block by block in float64. Doubles as the data check before training: it
    raises ``ValueError`` naming the first sample that holds NaN or Inf.

    >>> import numpy as np
    >>> from invnet.data.arrays import ArraySource
    >>> ds = PairDataset(ArraySource(np.arange(8.0).reshape(4, 1, 2), "x"), ArraySource(np.ones((4, 1, 2)), "y"))
    >>> n = compute_normalization(ds, rows=3)
    >>> n.x_mean, [round(v, 4) for v in n.x_std]
    ([3.5], [2.2913])
    """
    mx, my = _ChannelMoments(dataset.x.shape[1]), _ChannelMoments(dataset.y.shape[1])
    idx = np.arange(len(dataset)) if indices is None else np.sort(np.asarray(indices, dtype=np.int64))
    done = 0
    for xb, yb in dataset.iter_blocks(idx, rows):
        for name, block, src in (("x", xb, dataset.x), ("y", yb, dataset.y)):
            finite = np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)
            if not finite.all():
                bad = int(idx[done + int(np.argmin(finite))])
                raise ValueError(f"{src.name} ({name}) holds NaN or Inf in sample {bad}; clean the data before training")
        mx.add(xb)
        my.add(yb)
        done += len(xb)
    return Normalization(mx.mean.tolist(), mx.std(floor).tolist(), my.mean.tolist(), my.std(floor).tolist())
