"""Shuffled mini-batches whose position is a small, exactly restorable state."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .normalization import Normalization
from .pairs import PairDataset

__all__ = ["BatchLoader"]


class BatchLoader:
    r"""Endless shuffled mini-batches of a :class:`PairDataset`, normalised, as torch tensors.

    The order of epoch :math:`e` is a permutation drawn from ``numpy.random.default_rng([seed, e])``
    and patch corners of the batch at position :math:`p` from ``default_rng([seed, e, p])``, so the
    whole stream is a function of ``(seed, epoch, position)``: :meth:`state_dict` is those numbers,
    and a resumed run reads exactly the batches an uninterrupted one would. The last incomplete
    batch of an epoch is dropped.

    Distributed hook: with ``rank``/``size`` set, each step takes a global batch of
    ``batch_size * size`` samples and rank ``r`` keeps its ``r``-th contiguous part.

    Args:
        dataset: the pairs.
        indices: the samples to draw from (e.g. the training split).
        batch_size: samples per rank and step.
        seed: seed of the order.
        normalization: applied to every batch (optional).
        dtype: dtype of the tensors.
        rank, size: this process's share of each global batch.

    >>> import numpy as np
    >>> from invnet.data.arrays import ArraySource
    >>> ds = PairDataset(ArraySource(np.arange(10.0).reshape(10, 1), "x"), ArraySource(np.zeros((10, 1)), "y"))
    >>> loader = BatchLoader(ds, range(10), batch_size=4, seed=0)
    >>> a = loader.next_batch()[0]; state = loader.state_dict(); b = loader.next_batch()[0]
    >>> loader.load_state_dict(state); bool((loader.next_batch()[0] == b).all())
    True
    """

    def __init__(
        self,
        dataset: PairDataset,
        indices: Sequence[int],
        batch_size: int,
        seed: int = 0,
        normalization: Optional[Normalization] = None,
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        size: int = 1,
    ) -> None:
        self.indices = np.asarray(list(indices), dtype=np.int64)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < size:
            raise ValueError(f"rank must lie in [0, size={size}), got {rank}")
        if len(self.indices) < batch_size * size:
            raise ValueError(
                f"{len(self.indices)} training samples are fewer than one global batch ({batch_size} x {size} ranks)"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, int(seed)
        self.normalization, self.dtype, self.rank, self.size = normalization, dtype, rank, size
        self.epoch, self.position = 0, 0
        self._perm: Optional[np.ndarray] = None

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader uses {self.seed}")
        self.epoch, self.position, self._perm = int(state["epoch"]), int(state["position"]), None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            self._perm = self.indices[np.random.default_rng([self.seed, self.epoch]).permutation(len(self.indices))]
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)`` batch of this rank (normalised when a normalisation is set)."""
        global_batch = self.batch_size * self.size
        if self.position + global_batch > len(self.indices):
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        chosen = self._permutation()[self.position:self.position + global_batch]
        corners = None
        if self.dataset.patch is not None:
            rng = np.random.default_rng([self.seed, self.epoch, self.position])
            space = self.dataset.x.shape[2:]
            corners = [[int(rng.integers(0, s - p + 1)) for s, p in zip(space, self.dataset.patch)] for _ in chosen]
            corners = corners[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        mine = chosen[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        self.position += global_batch
        x, y = self.dataset.read(mine, corners)
        xt, yt = torch.from_numpy(x).to(self.dtype), torch.from_numpy(y).to(self.dtype)
        if self.normalization is not None:
            xt, yt = self.normalization.x_to_normal(xt), self.normalization.y_to_normal(yt)
        return xt, yt
