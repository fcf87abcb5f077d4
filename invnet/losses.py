"""Likelihood losses: negative log-likelihood in nats and in bits per dimension."""
from __future__ import annotations

import math

from torch import Tensor

__all__ = ["nll", "bits_per_dim"]


def nll(log_prob: Tensor) -> Tensor:
    """Mean negative log-likelihood in nats over the batch.

    >>> import torch
    >>> nll(torch.tensor([-1.0, -3.0])).item()
    2.0
    """
    return -log_prob.mean()


def bits_per_dim(log_prob: Tensor, dims: int, bin_width: float = 1.0) -> Tensor:
    r"""Per-sample bits per dimension :math:`-\log p(x) / (D \ln 2)`; for data discretised into bins
    of width ``bin_width`` (e.g. 1/256 for 8-bit images scaled to [0, 1]) the discrete likelihood
    adds :math:`-D \log(\mathrm{bin\_width})`.

    >>> import torch, math
    >>> bits_per_dim(torch.tensor([-2 * math.log(2)]), dims=2).tolist()
    [1.0]
    """
    if dims < 1:
        raise ValueError(f"dims must be a positive count, got {dims}")
    return -(log_prob + dims * math.log(bin_width)) / (dims * math.log(2))
