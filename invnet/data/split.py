"""Deterministic train/validation split of sample indices."""
from __future__ import annotations

import numpy as np

__all__ = ["train_validation_split"]


def train_validation_split(n: int, validation_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle ``range(n)`` with ``seed`` and cut off ``round(n * validation_fraction)`` samples
    for validation (at least one when the fraction is positive). Both parts come back sorted, so
    reads stay close to the on-disk order.

    >>> tr, va = train_validation_split(10, 0.2, seed=1)
    >>> len(tr), len(va), sorted(set(tr) | set(va)) == list(range(10))
    (8, 2, True)
    """
    if n < 1:
        raise ValueError(f"need at least one sample, got {n}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in [0, 1), got {validation_fraction}")
    n_val = int(round(n * validation_fraction))
    if validation_fraction > 0:
        n_val = max(n_val, 1)
    if n - n_val < 1:
        raise ValueError(f"{n} samples leave none for training with validation_fraction={validation_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
