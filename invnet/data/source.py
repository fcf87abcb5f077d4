"""The batch-source contract of the trainer: anything that serves the next batch and can say
(and restore) where it is, so that a resumed run reads exactly the batches an uninterrupted one
would."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["BatchSource"]


@runtime_checkable
class BatchSource(Protocol):
    """What :class:`invnet.training.Trainer` draws its training batches from.

    * ``next_batch()`` returns this process's batch: any structure of tensors the loss function
      understands (tuples, lists and dicts of tensors are moved to the training device by the
      trainer). The default loss takes ``(x, y)``.
    * ``state_dict()`` / ``load_state_dict(state)``: where the source is, as plain numbers,
      strings and tensors (stored in every checkpoint).

    In a parallel job each process has its own source, built for its
    :class:`~invnet.data.shard.Shard` (its batch group's samples, its subdomain of each), and
    every process's source must yield the same number of batches. :class:`~invnet.data.BatchLoader`
    (pairs from a file) is one; a simulator drawing fresh pairs, seeded by step and batch group,
    is another.

    >>> import numpy as np
    >>> from invnet.data import ArraySource, PairDataset, BatchLoader
    >>> ds = PairDataset(ArraySource(np.zeros((8, 2)), "x"), ArraySource(np.zeros((8, 1)), "y"))
    >>> isinstance(BatchLoader(ds, range(8), 4), BatchSource)
    True
    """

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
