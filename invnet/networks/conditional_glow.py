"""Conditional Glow: Glow whose every coupling sees a condition, optionally made by a summary
network from an observation."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .glow import Glow

__all__ = ["ConditionalGlow"]


class ConditionalGlow(Glow):
    r"""Conditional Glow: a density :math:`q(x \mid c)` with

    .. math::
        \log q(x \mid c) = \log\mathcal N(f(x; c); 0, I) + \log|\det J_f(x; c)|, \qquad
        c = h_\phi(y)

    where :math:`f` is :class:`Glow` whose every coupling conditioner also reads :math:`c`
    ("Conditional Invertible Neural Networks for Diverse Image-to-Image Translation", Ardizzone et
    al., 2021, arXiv:2105.02104; "Guided Image Generation with Conditional Invertible Neural
    Networks", Ardizzone et al., 2019, arXiv:1907.02392), and :math:`h_\phi` an optional summary
    network (:mod:`invnet.networks.summary`) from an observation :math:`y` of any shape.

    Condition at each scale: a field ``(N, cond_channels, *space)`` (same space shape as ``x``)
    is squeezed with ``x`` (lossless; the couplings at scale :math:`\ell` see
    :math:`\mathrm{cond\_channels}\cdot 2^{d\ell}` channels); a vector ``(N, cond_channels)``
    (``vector_condition=True``; always for ``ndim = 0``) is broadcast over space.

    Two faces:

    * the block contract ``z, logdet = net(x, c)``, ``net.inverse(z, c)``, ``net.backward(...)``
      take the *condition* ``c`` (the summary's output) and return ``dc``;
    * ``log_prob(x, y)``, ``bits_per_dim(x, y)``, ``sample(n, y, temperature)`` take the
      *observation* ``y`` when a summary network is set (``net.condition(y)`` is the condition),
      else the condition itself. The summary runs before the memory-free engine is entered, so
      its parameters get their gradients by ordinary autograd, through ``dc``.

    Args:
        channels: channels of ``x``.
        cond_channels: channels of the condition (the summary network's output channels).
        hidden, levels, depth, ndim: as :class:`Glow`.
        summary: optional ``nn.Module`` mapping an observation to the condition.
        vector_condition: the condition is a vector ``(N, cond_channels)``.
        **glow_kwargs: the other :class:`Glow` arguments (``squeeze``, ``clamp``, ``conv1x1``,
            ``coupling``, ...).

    >>> import torch
    >>> from invnet.networks import ConditionalGlow, ImageSummary
    >>> net = ConditionalGlow(1, 2, hidden=8, levels=2, depth=1, ndim=2,
    ...                       summary=ImageSummary(1, 2, out_size=(8, 8), hidden=8))
    >>> x, y = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 4, 4)
    >>> net.log_prob(x, y).shape, net.sample(5, y[:1]).shape
    (torch.Size([3]), torch.Size([5, 1, 8, 8]))
    """

    def __init__(
        self,
        channels: int,
        cond_channels: int,
        hidden: int = 64,
        levels: int = 3,
        depth: int = 8,
        ndim: int = 2,
        summary: Optional[nn.Module] = None,
        vector_condition: bool = False,
        **glow_kwargs,
    ) -> None:
        if cond_channels < 1:
            raise ValueError(f"ConditionalGlow needs cond_channels >= 1, got {cond_channels}")
        if summary is not None and not isinstance(summary, nn.Module):
            raise ValueError(f"summary must be an nn.Module, got {type(summary).__name__}")
        super().__init__(
            channels, hidden, levels, depth, ndim, cond_channels=cond_channels,
            vector_condition=vector_condition, **glow_kwargs,
        )
        self.summary = summary

    def condition(self, c: Optional[Tensor]) -> Optional[Tensor]:
        """The flow's condition: ``summary(y)`` when a summary network is set, else ``c``."""
        if c is None:
            raise ValueError(f"{type(self).__name__} needs a condition (or an observation for its summary network)")
        return c if self.summary is None else self.summary(c)
