"""Per-channel normalisation statistics, computed once by streaming, stored with the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .pairs import PairDataset
from .shard import Shard

__all__ = ["Normalization", "compute_normalization", "data_moments", "DataMoments"]


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
        return {
            "x_mean": list(self.x_mean), "x_std": list(self.x_std),
            "y_mean": list(self.y_mean), "y_std": list(self.y_std),
        }

    @classmethod
    def identity(cls, x_channels: int, y_channels: int) -> Normalization:
        """No normalisation (e.g. for simulated pairs, whose simulator chooses the scale).

        >>> Normalization.identity(2, 1).to_dict()
        {'x_mean': [0.0, 0.0], 'x_std': [1.0, 1.0], 'y_mean': [0.0], 'y_std': [1.0]}
        """
        return cls([0.0] * x_channels, [1.0] * x_channels, [0.0] * y_channels, [1.0] * y_channels)

    @classmethod
    def from_dict(cls, d: dict) -> Normalization:
        keys = {"x_mean", "x_std", "y_mean", "y_std"}
        if set(d) != keys:
            raise ValueError(f"normalisation needs exactly the keys {sorted(keys)}, got {sorted(d)}")
        return cls(*(list(map(float, d[k])) for k in ("x_mean", "x_std", "y_mean", "y_std")))


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

    def sum_over_ranks(self, total: Callable[[Tensor], Tensor]) -> None:
        r"""Merge the moments of all ranks (``total`` sums a float64 tensor over them): first the
        global count and mean, then each rank's M2 shifted to the global mean,
        :math:`M_2 = \sum_r M_{2,r} + n_r(\mu_r - \mu)^2`, so no large sums of squares cancel."""
        first = total(torch.from_numpy(np.concatenate([[float(self.n)], self.n * self.mean])))
        n = float(first[0])
        mean = first[1:].numpy() / n if n > 0 else np.zeros_like(self.mean)
        m2 = total(torch.from_numpy(self.m2 + self.n * (self.mean - mean) ** 2)).numpy()
        self.n, self.mean, self.m2 = int(round(n)), mean, m2

    def std(self, floor: float) -> np.ndarray:
        return np.maximum(np.sqrt(self.m2 / max(self.n, 1)), floor)


@dataclass
class DataMoments:
    """Per-channel count, mean and M2 of ``x`` and ``y`` over the samples one process read
    (:func:`data_moments`); :meth:`sum_over_ranks` merges them over the processes of a parallel
    job, :meth:`normalization` turns them into the statistics."""

    x: _ChannelMoments
    y: _ChannelMoments

    def sum_over_ranks(self, total: Callable[[Tensor], Tensor]) -> None:
        """Merge over all ranks; ``total`` sums a float64 tensor over them (collective: every
        rank calls it, and every rank then holds the same moments)."""
        self.x.sum_over_ranks(total)
        self.y.sum_over_ranks(total)

    def normalization(self, floor: float = 1e-8) -> Normalization:
        """Means and standard deviations (floored at ``floor``, so constant channels divide safely)."""
        return Normalization(self.x.mean.tolist(), self.x.std(floor).tolist(), self.y.mean.tolist(),
                             self.y.std(floor).tolist())


def data_moments(dataset: PairDataset, indices: Optional[Sequence[int]] = None, rows: Optional[int] = None,
                 shard: Optional[Shard] = None) -> DataMoments:
    """Per-channel moments of ``x`` and ``y`` over ``indices`` (all samples by default), streamed
    block by block in float64; with a ``shard``, over its batch group's part of ``indices`` and
    its subdomain of each sample only (merge the ranks' moments with
    :meth:`DataMoments.sum_over_ranks`). Doubles as the data check: raises ``ValueError`` naming
    the first sample that holds NaN or Inf (in a parallel job only the rank that read it does:
    share the error with :func:`invnet.distributed.agree_on_errors` before merging)."""
    mx, my = _ChannelMoments(dataset.x.shape[1]), _ChannelMoments(dataset.y.shape[1])
    idx = np.arange(len(dataset)) if indices is None else np.sort(np.asarray(indices, dtype=np.int64))
    if shard is not None:
        idx = shard.samples(idx)
    done = 0
    for xb, yb in dataset.iter_blocks(idx, rows, shard):
        for name, block, src in (("x", xb, dataset.x), ("y", yb, dataset.y)):
            finite = np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)
            if not finite.all():
                bad = int(idx[done + int(np.argmin(finite))])
                raise ValueError(
                    f"{src.name} ({name}) holds NaN or Inf in sample {bad}; clean the data before training"
                )
        mx.add(xb)
        my.add(yb)
        done += len(xb)
    return DataMoments(mx, my)


def compute_normalization(
    dataset: PairDataset, indices: Optional[Sequence[int]] = None, rows: Optional[int] = None, floor: float = 1e-8
) -> Normalization:
    """Per-channel mean and standard deviation of ``x`` and ``y`` over ``indices`` (all samples by
    default), streamed block by block in float64, on one process (:func:`data_moments` and
    :meth:`DataMoments.sum_over_ranks` for a parallel job). Doubles as the data check before
    training: it raises ``ValueError`` naming the first sample that holds NaN or Inf.

    >>> import numpy as np
    >>> from invnet.data.arrays import ArraySource
    >>> ds = PairDataset(ArraySource(np.arange(8.0).reshape(4, 1, 2), "x"), ArraySource(np.ones((4, 1, 2)), "y"))
    >>> n = compute_normalization(ds, rows=3)
    >>> n.x_mean, [round(v, 4) for v in n.x_std]
    ([3.5], [2.2913])
    """
    return data_moments(dataset, indices, rows).normalization(floor)
