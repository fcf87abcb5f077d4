"""Affine map of all channels whose scale and shift depend only on the condition."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..core.module import GradStore, InvertibleModule, Shape, VJPResult
from ..core.shapes import check_condition, sum_per_sample
from ..core.vjp import local_vjp
from .conditioners import expand_condition, make_conditioner

__all__ = ["ConditionalAffine"]


class ConditionalAffine(InvertibleModule):
    r"""Affine map of every channel of ``x`` with a scale and shift computed from the condition:

    .. math::
        (r, t) = \mathrm{NN}(c), \quad s = \alpha \tanh(r / \alpha), \quad
        y = x \odot e^{s} + t, \quad \log|\det J| = \textstyle\sum s

    This is the coupling between the two lanes of a conditional HINT ("HINT: Hierarchical
    Invertible Neural Transport for Density Estimation and Bayesian Inference", Kruse et al.,
    2021, arXiv:1905.10687): the :math:`y`-lane plays the passive half, ``x`` the active one, so
    the whole of ``x`` is shifted and scaled by the observation at every step.

    Backward (one conditioner pass): :math:`x = (y - t) e^{-s}`, :math:`\bar x = e^{s} \bar y`,
    :math:`\bar s = \bar y (y - t) + \overline{\log\det}`, :math:`\bar t = \bar y`, and
    :math:`\bar c` with the parameter gradients from one local autograd pass.

    Args:
        channels: channels of ``x`` (1 or more).
        cond_channels: channels of ``c`` (a field of the same space shape, or a vector).
        hidden: hidden channels of the conditioner.
        ndim: space dimensions (0 to 3).
        clamp: bound :math:`\alpha` on the log-scale.
        conditioner: custom network ``cond_channels -> 2 * channels`` (space shape preserved).
        **conditioner_kwargs: passed to the default conditioner.

    >>> import torch
    >>> from invnet.layers import ConditionalAffine
    >>> block = ConditionalAffine(3, cond_channels=2, hidden=8, ndim=1)
    >>> x, c = torch.randn(2, 3, 6), torch.randn(2, 2, 6)
    >>> y, logdet = block(x, c)
    >>> bool(torch.allclose(block.inverse(y, c)[0], x))
    True
    """

    def __init__(
        self,
        channels: int,
        cond_channels: int,
        hidden: int = 64,
        ndim: int = 2,
        clamp: float = 2.0,
        conditioner: Optional[nn.Module] = None,
        **conditioner_kwargs,
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"ConditionalAffine needs at least 1 channel, got {channels}")
        if cond_channels < 1:
            raise ValueError(f"ConditionalAffine needs cond_channels >= 1, got {cond_channels}")
        if ndim not in (0, 1, 2, 3):
            raise ValueError(f"ndim must be 0, 1, 2 or 3, got {ndim}")
        if not clamp > 0:
            raise ValueError(f"clamp must be positive, got {clamp}")
        self.channels = channels
        self.cond_channels = cond_channels
        self.ndim = ndim
        self.clamp = float(clamp)
        if conditioner is None:
            conditioner = make_conditioner(cond_channels, 2 * channels, hidden, ndim, **conditioner_kwargs)
        self.conditioner = conditioner

    def _check_shape(self, shape: Shape, c_shape: Optional[Shape], inverse: bool) -> Shape:
        shape = super()._check_shape(shape, c_shape, inverse)
        check_condition(type(self).__name__, shape, c_shape, self.cond_channels)
        return shape

    def _scale_shift(self, c: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        h = self.run_conditioner(self.conditioner, expand_condition(c, like))
        raw, t = torch.split(h, [self.channels, self.channels], dim=1)
        return self.clamp * torch.tanh(raw / self.clamp), t

    def _logdet(self, s: Tensor, like: Tensor) -> Tensor:
        return sum_per_sample(s.expand_as(like))

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(c, x)
        return x * torch.exp(s) + t, self._logdet(s, x)

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(c, y)
        return (y - t) * torch.exp(-s), -self._logdet(s, y)

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        with local_vjp(self.conditioner, c, grads=grads) as vjp:
            s, t = self._scale_shift(vjp.inputs[0], y)
            scale = torch.exp(s.detach())
            y_minus_t = y - t.detach()
            ds = dy * y_minus_t + dlogdet.reshape((-1,) + (1,) * (y.dim() - 1))
            (dc,) = vjp.grad((s, t), (ds, dy))
        return y_minus_t / scale, dy * scale, dc
