"""Base densities of the latent space."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["StandardNormal"]

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
