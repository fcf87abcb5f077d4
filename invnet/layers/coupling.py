"""Affine (RealNVP/Glow) and additive (NICE) coupling blocks."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..core.module import GradStore, InvertibleModule, Shape, VJPResult
from ..core.shapes import check_condition, sum_per_sample
from ..core.vjp import local_vjp
from .conditioners import expand_condition, make_conditioner

__all__ = ["AffineCoupling", "AdditiveCoupling", "CouplingBase"]


class CouplingBase(InvertibleModule):
    """Shared machinery: split into a passive part ``x_p`` (``channels // 2`` channels, fed to
    the conditioner with the condition) and an active part ``x_a`` (the rest, transformed).
    Odd channel counts give unequal halves. ``swap=True`` makes the *last* ``channels // 2``
    channels passive instead of the first, so alternating couplings touch every channel.
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        ndim: int,
        cond_channels: int,
        out_per_active: int,
        swap: bool,
        conditioner: Optional[nn.Module],
        conditioner_kwargs: dict,
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 channels to split, got {channels}")
        if ndim not in (0, 1, 2, 3):
            raise ValueError(f"ndim must be 0, 1, 2 or 3, got {ndim}")
        if cond_channels < 0:
            raise ValueError(f"cond_channels must be >= 0, got {cond_channels}")
        self.channels = channels
        self.ndim = ndim
        self.cond_channels = cond_channels
        self.swap = swap
        self.n_passive = channels // 2
        self.n_active = channels - self.n_passive
        if conditioner is None:
            conditioner = make_conditioner(
                self.n_passive + cond_channels, out_per_active * self.n_active, hidden, ndim, **conditioner_kwargs
            )
        self.conditioner = conditioner

    def _check_shape(self, shape: Shape, c_shape: Optional[Shape], inverse: bool) -> Shape:
        shape = super()._check_shape(shape, c_shape, inverse)
        check_condition(type(self).__name__, shape, c_shape, self.cond_channels)
        return shape

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.swap:
            x_a, x_p = torch.split(x, [self.n_active, self.n_passive], dim=1)
        else:
            x_p, x_a = torch.split(x, [self.n_passive, self.n_active], dim=1)
        return x_p, x_a

    def _merge(self, x_p: Tensor, x_a: Tensor) -> Tensor:
        return torch.cat([x_a, x_p] if self.swap else [x_p, x_a], dim=1)

    def _condition(self, c: Optional[Tensor]) -> Optional[Tensor]:
        """The condition the conditioner reads: ``c`` if the block takes one, else ``None``
        (a chain hands ``c`` to every block; unconditional ones ignore it)."""
        return c if self.cond_channels else None

    def _conditioner_input(self, x_p: Tensor, c: Optional[Tensor]) -> Tensor:
        if self.cond_channels == 0:
            return x_p
        return torch.cat([x_p, expand_condition(c, x_p)], dim=1)


class AffineCoupling(CouplingBase):
    r"""Affine coupling block (RealNVP/Glow) with a bounded scale.

    From "Density estimation using Real NVP" (Dinh et al., 2016, arXiv:1605.08803) and "Glow"
    (Kingma and Dhariwal, 2018, arXiv:1807.03039).

    .. math::
        y_p = x_p, \qquad (r, t) = \mathrm{NN}([x_p, c]), \qquad
        s = \alpha \tanh(r / \alpha), \qquad y_a = x_a \odot e^{s} + t,
        \qquad \log|\det J| = \textstyle\sum s

    The soft clamp :math:`|s| < \alpha` keeps deep stacks invertible in float32.
    Inverse: :math:`x_a = (y_a - t) \odot e^{-s}` with :math:`(r, t)` computed from
    :math:`y_p = x_p`. Backward (one conditioner pass, reused for the rebuild and the gradient):

    .. math::
        \bar x_a = e^{s} \odot \bar y_a, \quad \bar s = \bar y_a \odot (y_a - t) + \overline{\log\det},
        \quad \bar t = \bar y_a, \quad \bar x_p = \bar y_p + J_{\mathrm{NN}}^T(\bar s, \bar t)

    where the last term (and the conditioner's parameter gradients, and :math:`\bar c`) come from a
    local autograd pass through the conditioner only.

    Args:
        channels: channels of ``x`` (2 or more; odd counts give unequal halves).
        hidden: hidden channels of the conditioner.
        ndim: space dimensions, 0 (vectors, MLP conditioner) to 3.
        cond_channels: channels of the optional condition ``c`` (fed to the conditioner).
        clamp: bound :math:`\alpha` on the log-scale.
        swap: make the last half passive instead of the first.
        conditioner: a custom network mapping ``passive + cond_channels`` channels to
            ``2 * active`` channels (space shape preserved); default: residual conv net / MLP.
        **conditioner_kwargs: passed to the default conditioner (``kernel_size``, ``residual_blocks``).

    >>> import torch
    >>> from invnet.layers import AffineCoupling
    >>> block = AffineCoupling(5, hidden=16, ndim=3, cond_channels=2)
    >>> x, c = torch.randn(2, 5, 4, 4, 4), torch.randn(2, 2, 4, 4, 4)
    >>> y, logdet = block(x, c)
    >>> bool(torch.allclose(block.inverse(y, c)[0], x))
    True
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        ndim: int = 2,
        cond_channels: int = 0,
        clamp: float = 2.0,
        swap: bool = False,
        conditioner: Optional[nn.Module] = None,
        **conditioner_kwargs,
    ) -> None:
        if not clamp > 0:
            raise ValueError(f"clamp must be positive, got {clamp}")
        super().__init__(channels, hidden, ndim, cond_channels, 2, swap, conditioner, conditioner_kwargs)
        self.clamp = float(clamp)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, cond_channels={self.cond_channels}, clamp={self.clamp}, swap={self.swap}"

    def _scale_shift(self, x_p: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        h = self.run_conditioner(self.conditioner, self._conditioner_input(x_p, c))
        raw, t = torch.split(h, [self.n_active, self.n_active], dim=1)
        s = self.clamp * torch.tanh(raw / self.clamp)
        return s, t

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        x_p, x_a = self._split(x)
        s, t = self._scale_shift(x_p, c)
        y_a = x_a * torch.exp(s) + t
        return self._merge(x_p, y_a), sum_per_sample(s)

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        y_p, y_a = self._split(y)
        s, t = self._scale_shift(y_p, c)
        x_a = (y_a - t) * torch.exp(-s)
        return self._merge(y_p, x_a), -sum_per_sample(s)

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        y_p, y_a = self._split(y)
        dy_p, dy_a = self._split(dy)
        with local_vjp(self.conditioner, y_p, self._condition(c), grads=grads) as vjp:
            s, t = self._scale_shift(*vjp.inputs)
            # ds = dy_a * (x_a * exp(s)) + dlogdet = dy_a * (y_a - t) + dlogdet
            ds = torch.addcmul(
                dlogdet.reshape((-1,) + (1,) * (y.dim() - 1)), dy_a, y_a - t.detach()
            )
            dx_p, dc = vjp.grad((s, t), (ds, dy_a))
        # x_a and the active cotangent only once the conditioner's graph is gone: fewer tensors
        # alive at the peak of the backward (this is the step that sets the peak)
        del ds
        scale = torch.exp(s.detach())
        del s
        x_a = (y_a - t.detach()).div_(scale)
        del t
        return self._merge(y_p, x_a), self._merge(dy_p + dx_p, dy_a * scale), dc


class AdditiveCoupling(CouplingBase):
    r"""Additive (volume-preserving) coupling block (NICE).

    From "NICE: Non-linear Independent Components Estimation" (Dinh et al., 2014,
    arXiv:1410.8516).

    .. math::
        y_p = x_p, \qquad y_a = x_a + t(x_p, c), \qquad \log|\det J| = 0

    Backward: :math:`x_a = y_a - t`, :math:`\bar x_a = \bar y_a`,
    :math:`\bar x_p = \bar y_p + J_t^T \bar y_a` (local autograd through the conditioner).

    Args: as :class:`AffineCoupling`, without ``clamp``.

    >>> import torch
    >>> from invnet.layers import AdditiveCoupling
    >>> block = AdditiveCoupling(4, hidden=8, ndim=0)
    >>> y, logdet = block(torch.randn(3, 4))
    >>> logdet.tolist()
    [0.0, 0.0, 0.0]
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        ndim: int = 2,
        cond_channels: int = 0,
        swap: bool = False,
        conditioner: Optional[nn.Module] = None,
        **conditioner_kwargs,
    ) -> None:
        super().__init__(channels, hidden, ndim, cond_channels, 1, swap, conditioner, conditioner_kwargs)

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        x_p, x_a = self._split(x)
        t = self.run_conditioner(self.conditioner, self._conditioner_input(x_p, c))
        return self._merge(x_p, x_a + t), x.new_zeros(x.shape[0])

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        y_p, y_a = self._split(y)
        t = self.run_conditioner(self.conditioner, self._conditioner_input(y_p, c))
        return self._merge(y_p, y_a - t), y.new_zeros(y.shape[0])

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        y_p, y_a = self._split(y)
        dy_p, dy_a = self._split(dy)
        with local_vjp(self.conditioner, y_p, self._condition(c), grads=grads) as vjp:
            x_p, c_in = vjp.inputs
            t = self.run_conditioner(self.conditioner, self._conditioner_input(x_p, c_in))
            dx_p, dc = vjp.grad(t, dy_a)
        return self._merge(y_p, y_a - t.detach()), self._merge(dy_p + dx_p, dy_a), dc
