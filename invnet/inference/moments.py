r"""Streaming moments of posterior samples: memory does not grow with the number of samples.

Welford's update, merged batch-wise as in Chan, Golub and LeVeque, "Updating formulae and a
pairwise algorithm for computing sample variances" (1979).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["RunningMoments"]


class RunningMoments:
    r"""Element-wise running mean and variance over batches of samples, in float64.

    Merging a batch of :math:`m` samples with mean :math:`\mu_b` and sum of squared deviations
    :math:`M_b` into :math:`(n, \mu, M)`:
    :math:`\delta = \mu_b - \mu`, :math:`\mu \leftarrow \mu + \delta m/(n+m)`,
    :math:`M \leftarrow M + M_b + \delta^2 n m/(n+m)`.

    >>> rm = RunningMoments()
    >>> for part in torch.arange(10.0).reshape(5, 2, 1).unbind(0):
    ...     rm.update(part)
    >>> rm.mean.tolist(), round(float(rm.std()), 4)
    ([4.5], 3.0277)
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None

    def update(self, batch: Tensor) -> None:
        """Add samples ``batch`` of shape ``(m, *shape)``."""
        b = batch.detach().to(torch.float64)
        m = b.shape[0]
        mb = b.mean(0)
        m2b = ((b - mb) ** 2).sum(0)
        if self.mean is None:
            self.n, self.mean, self.m2 = m, mb, m2b
            return
        n = self.n + m
        delta = mb - self.mean
        self.mean = self.mean + delta * (m / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * m / n)
        self.n = n

    def variance(self, ddof: int = 1) -> Tensor:
        if self.m2 is None or self.n - ddof < 1:
            raise ValueError(f"need more than {ddof} sample(s) for a variance, have {self.n}")
        return self.m2 / (self.n - ddof)

    def std(self, ddof: int = 1) -> Tensor:
        return self.variance(ddof).sqrt()
