"""Networks: an invertible module with a base density, so it has ``log_prob`` and ``sample``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.module import InvertibleModule
from .density import StandardNormal, bits_per_dim

__all__ = ["FlowNetwork"]


class FlowNetwork(InvertibleModule):
    r"""Base class of invnet's networks: an invertible map :math:`z = f(x; c)` with a standard
    normal latent, so that

    .. math:: \log q(x \mid c) = \log \mathcal N(f(x; c); 0, I) + \log|\det J_f(x; c)|.

    Subclasses implement the block contract (``_forward``, ``_inverse``, ``_vjp``,
    ``_check_shape``); this class adds ``log_prob``, ``bits_per_dim`` and ``sample``.
    """

    base = StandardNormal()

    def latent_shape(self, x_shape: tuple[int, ...], c_shape: Optional[tuple[int, ...]] = None) -> tuple[int, ...]:
        """Shape of the latent for data of shape ``x_shape`` (validates it)."""
        return self.check_shape(tuple(x_shape), c_shape, inverse=False)

    def condition(self, c: Optional[Tensor]) -> Optional[Tensor]:
        """The condition the flow sees, made from what the user passes to :meth:`log_prob`,
        :meth:`bits_per_dim` and :meth:`sample` (identity here; a network with a summary network
        maps an observation to the condition)."""
        return c

    def log_prob(self, x: Tensor, c: Optional[Tensor] = None) -> Tensor:
        """:math:`\\log q(x|c)` per sample, in nats, shape ``(batch,)``."""
        z, logdet = self(x, self.condition(c))
        return self.base.log_prob(z) + logdet

    def bits_per_dim(self, x: Tensor, c: Optional[Tensor] = None, bin_width: float = 1.0) -> Tensor:
        """Negative log-likelihood per sample in bits per dimension (see
        :func:`invnet.networks.density.bits_per_dim`)."""
        return bits_per_dim(self.log_prob(x, c), x[0].numel(), bin_width)

    def sample(
        self,
        n: int,
        c: Optional[Tensor] = None,
        temperature: float = 1.0,
        shape: Optional[tuple[int, ...]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Draw ``n`` samples :math:`x = f^{-1}(T z; c)`, :math:`z \\sim \\mathcal N(0, I)`.

        Args:
            n: number of samples.
            c: condition: one per sample (batch ``n``) or one row serving all ``n``.
            temperature: :math:`T` (1 samples the model; below 1 trades diversity for quality).
            shape: shape of one data sample ``(channels, *space)``; networks that know it
                (``self.data_shape``) or can infer it from ``c`` need not be told.
            generator: optional random generator.
        """
        if n < 1:
            raise ValueError(f"n must be a positive number of samples, got {n}")
        c = self.condition(c)
        if c is not None:
            if c.shape[0] == 1 and n > 1:
                c = c.expand((n,) + tuple(c.shape[1:]))
            elif c.shape[0] != n:
                raise ValueError(f"c must hold one condition per sample ({n}) or a single row, got batch {c.shape[0]}")
        shape = self.sample_shape(c, shape)
        ref = next(iter(self.parameters()), None)
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        device = ref.device if ref is not None else None
        z_shape = self.latent_shape((n,) + tuple(shape), None if c is None else tuple(c.shape))
        z = self.base.sample(z_shape, temperature, dtype=dtype, device=device, generator=generator)
        x, _ = self.inverse(z, c)
        return x

    def sample_shape(self, c: Optional[Tensor] = None, shape: Optional[tuple[int, ...]] = None) -> tuple[int, ...]:
        """Shape ``(channels, *space)`` of one sample that :meth:`sample` draws: ``shape`` when
        given, else ``self.data_shape`` when the network knows it, else ``(channels,)`` for
        vectors, else the space shape of a field condition ``c``.

        >>> from invnet.networks import HINT
        >>> HINT(3, hidden=4, depth=1, ndim=0).sample_shape()
        (3,)
        """
        if shape is not None:
            return tuple(shape)
        known = getattr(self, "data_shape", None)
        if known is not None:
            return tuple(known)
        # One rule for every network: vectors have no space; a field condition carries it.
        channels, ndim = getattr(self, "channels", None), getattr(self, "ndim", None)
        if channels is not None and ndim == 0:
            return (channels,)
        if channels is not None and ndim and c is not None and c.dim() > 2:
            return (channels,) + tuple(c.shape[2:])
        raise ValueError(f"{type(self).__name__}.sample needs shape=(channels, *space) of one sample")
