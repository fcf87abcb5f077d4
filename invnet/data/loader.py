"""Shuffled mini-batches whose position is a small, exactly restorable state."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .normalization import Normalization
from .pairs import PairDataset
from .shard import Shard

__all__ = ["BatchLoader"]


class BatchLoader:
    r"""Endless shuffled mini-batches of a :class:`PairDataset`, normalised, as torch tensors.

    The order of epoch :math:`e` is a permutation drawn from ``numpy.random.default_rng([seed, e])``
    and patch corners of the batch at position :math:`p` from ``default_rng([seed, e, p])``, so the
    whole stream is a function of ``(seed, epoch, position)``: :meth:`state_dict` is those numbers,
    and a resumed run reads exactly the batches an uninterrupted one would. The last incomplete
    batch of an epoch is dropped.

    Parallel jobs: with a ``shard`` of ``groups`` batch groups, each step takes a global batch of
    ``batch_size * groups`` samples and group ``g`` keeps its ``g``-th contiguous part; when the
    shard splits space, only its subdomain of each sample (and of ``y`` when it lives on the grid
    of ``x``) is read. Every rank draws the same order and patch corners, so the ranks that share
    a sample read matching pieces of it.

    Args:
        dataset: the pairs.
        indices: the samples to draw from (e.g. the training split).
        batch_size: samples per batch group and step.
        seed: seed of the order.
        normalization: applied to every batch (optional).
        dtype: dtype of the tensors.
        shard: this process's part (:meth:`invnet.distributed.ParallelStrategy.shard`); serial by default.
        pin_memory: return page-locked tensors, so that copies to a GPU can be non-blocking.

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
        shard: Optional[Shard] = None,
        pin_memory: bool = False,
    ) -> None:
        self.indices = np.asarray(list(indices), dtype=np.int64)
        self.shard = shard or Shard()
        groups = self.shard.groups
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(self.indices) < batch_size * groups:
            raise ValueError(
                f"{len(self.indices)} training samples are fewer than one global batch ({batch_size} x {groups} "
                "batch groups)"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, int(seed)
        self.normalization, self.dtype, self.pin_memory = normalization, dtype, pin_memory
        self.epoch, self.position = 0, 0
        self._perm: Optional[np.ndarray] = None

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "groups": self.shard.groups}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader uses {self.seed}")
        if int(state.get("groups", self.shard.groups)) != self.shard.groups:  # (older checkpoints do not say)
            raise ValueError(
                f"the run was trained with {state['groups']} batch group(s) and resumes with {self.shard.groups}: the "
                f"global batch would change; use a grid with {state['groups']} batch ranks ([distributed] grid)"
            )
        self.epoch, self.position, self._perm = int(state["epoch"]), int(state["position"]), None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            self._perm = self.indices[np.random.default_rng([self.seed, self.epoch]).permutation(len(self.indices))]
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)`` batch of this rank (normalised when a normalisation is set)."""
        global_batch = self.batch_size * self.shard.groups
        if self.position + global_batch > len(self.indices):
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        chosen = self._permutation()[self.position:self.position + global_batch]
        corners = None
        if self.dataset.patch is not None:
            rng = np.random.default_rng([self.seed, self.epoch, self.position])
            space = self.dataset.x.shape[2:]
            corners = [[int(rng.integers(0, s - p + 1)) for s, p in zip(space, self.dataset.patch)] for _ in chosen]
        mine = slice(self.shard.group * self.batch_size, (self.shard.group + 1) * self.batch_size)
        if corners is not None:
            corners = corners[mine]
        self.position += global_batch
        x, y = self.dataset.read(chosen[mine], corners, self.shard)
        xt, yt = torch.from_numpy(x).to(self.dtype), torch.from_numpy(y).to(self.dtype)
        if self.normalization is not None:
            xt, yt = self.normalization.x_to_normal(xt), self.normalization.y_to_normal(yt)
        if self.pin_memory:
            xt, yt = xt.pin_memory(), yt.pin_memory()
        return xt, yt
