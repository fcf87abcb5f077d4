r"""The latent base density and the likelihood losses of a flow network.

A flow :math:`z = f(x; c)` with a standard normal latent has
:math:`\log q(x \mid c) = \log \mathcal N(f(x; c); 0, I) + \log|\det J_f(x; c)|`; its loss is the
negative log-likelihood, in nats or in bits per dimension.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["StandardNormal", "nll", "bits_per_dim"]

_LOG_2PI = math.log(2 * math.pi)


class StandardNormal:
    r"""Standard normal density over every non-batch dimension of the latent:

    .. math:: \log p(z) = -\tfrac12 \sum_i z_i^2 - \tfrac{D}{2}\log 2\pi

    Sampling with temperature :math:`T` draws :math:`z \sim \mathcal N(0, T^2 I)` ("Glow",
    Kingma and Dhariwal, 2018, arXiv:1807.03039).

    >>> import torch
    >>> [round(v, 6) for v in StandardNormal().log_prob(torch.zeros(2, 3)).tolist()]  # -1.5 log(2 pi)
    [-2.756816, -2.756816]
    """

    def log_prob(self, z: Tensor) -> Tensor:
        flat = z.reshape(z.shape[0], -1)
        return -0.5 * (flat * flat).sum(1) - 0.5 * flat.shape[1] * _LOG_2PI

    def sample(
        self,
        shape: tuple[int, ...],
        temperature: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        return temperature * torch.randn(shape, dtype=dtype, device=device, generator=generator)


def nll(log_prob: Tensor) -> Tensor:
    """Mean negative log-likelihood in nats over the batch.

    >>> nll(torch.tensor([-1.0, -3.0])).item()
    2.0
    """
    return -log_prob.mean()


def bits_per_dim(log_prob: Tensor, dims: int, bin_width: float = 1.0) -> Tensor:
    r"""Per-sample bits per dimension :math:`-\log p(x) / (D \ln 2)`; for data discretised into bins
    of width ``bin_width`` (e.g. 1/256 for 8-bit images scaled to [0, 1]) the discrete likelihood
    adds :math:`-D \log(\mathrm{bin\_width})`.

    >>> bits_per_dim(torch.tensor([-2 * math.log(2)]), dims=2).tolist()
    [1.0]
    """
    if dims < 1:
        raise ValueError(f"dims must be a positive count, got {dims}")
    return -(log_prob + dims * math.log(bin_width)) / (dims * math.log(2))
