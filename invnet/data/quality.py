"""Data that train but mislead: integers and constant channels (warnings, training goes on)."""
from __future__ import annotations

import warnings

from .normalization import Normalization
from .pairs import PairDataset

__all__ = ["DataWarning", "warn_about_data"]


class DataWarning(UserWarning):
    """Training data that train but mislead (integers, constant channels)."""


def warn_about_data(dataset: PairDataset, normalization: Normalization, floor: float = 1e-8) -> None:
    """Warn about data a continuous density cannot describe honestly (training goes on): integer
    ``x``, and channels of ``x`` or ``y`` whose standard deviation is at the ``floor``.

    >>> import numpy as np, warnings
    >>> from invnet.data import ArraySource, PairDataset
    >>> ds = PairDataset(ArraySource(np.zeros((4, 1, 2), "i2"), "x"), ArraySource(np.ones((4, 1, 2)), "y"))
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_about_data(ds, Normalization([0.0], [1e-8], [1.0], [1e-8]))
    >>> [str(w.message)[:24] for w in caught]
    ['x (x) holds integers (in', 'x (x): channel(s) [0] ar', 'y (y): channel(s) [0] ar']
    """
    if dataset.x.dtype.kind in "iu":
        warnings.warn(f"{dataset.x.name} (x) holds integers ({dataset.x.dtype}): a continuous density of integer "
                      "values is degenerate (the flow can squeeze its mass onto the integers and the bits/dim fall "
                      "without bound). Dequantize: store x + uniform noise in [0, 1) as float32 (or convert to float "
                      "if the values are measurements rounded for storage)", DataWarning, stacklevel=2)
    for name, stds in (("x", normalization.x_std), ("y", normalization.y_std)):
        flat = [c for c, s in enumerate(stds) if s <= floor]
        if flat:
            src = dataset.x if name == "x" else dataset.y
            consequence = ("the flow can put all its mass on one value, so the bits/dim fall without bound and mean "
                           "nothing; drop the channel(s) or add noise of the measurement's size" if name == "x" else
                           "it carries no information; drop the channel(s)")
            warnings.warn(f"{src.name} ({name}): channel(s) {flat} are constant over the training samples (std below "
                          f"{floor:g}, floored): {consequence}", DataWarning, stacklevel=2)
