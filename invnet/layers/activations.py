r"""Invertible elementwise activations with log-determinant.

For an elementwise bijection :math:`y = f(x)`:

.. math::
    \log|\det J| = \sum_i \log f'(x_i), \qquad
    \bar x = f'(x)\,\bar y + \overline{\log\det}\,(\log f')'(x)

Each class gives :math:`f, f^{-1}, f'` and :math:`(\log f')'`; the base writes forward, inverse and
both backwards out from those.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..core.module import GradStore, InvertibleModule, VJPResult
from ..core.shapes import sum_per_sample
from ..core.value_checks import value_checks_enabled

__all__ = ["LeakyReLU", "Sigmoid", "Logit"]


class _Elementwise(InvertibleModule):
    def __init__(self, ndim: Optional[int] = None) -> None:
        super().__init__()
        self.ndim = ndim

    # f, f^{-1}, log f'(x), d/dx log f'(x), f'(x)
    def f(self, x: Tensor) -> Tensor: raise NotImplementedError
    def f_inv(self, y: Tensor) -> Tensor: raise NotImplementedError
    def log_df(self, x: Tensor) -> Tensor: raise NotImplementedError
    def dlog_df(self, x: Tensor) -> Tensor: raise NotImplementedError

    def df(self, x: Tensor) -> Tensor:
        return torch.exp(self.log_df(x))

    def _check_range(self, y: Tensor) -> None:
        """Validate that ``y`` lies in the range of ``f`` (for the inverse)."""

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self.f(x), sum_per_sample(self.log_df(x))

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        self._check_range(y)
        x = self.f_inv(y)
        return x, -sum_per_sample(self.log_df(x))

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        x = self.f_inv(y)
        w = dlogdet.reshape((-1,) + (1,) * (y.dim() - 1))
        return x, dy * self.df(x) + w * self.dlog_df(x), None

    def _vjp_inverse(
        self, x: Tensor, dx: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore
    ) -> VJPResult:
        # g = f^{-1}: g'(y) = 1/f'(x); log g'(y) = -log f'(x); d/dy = -(log f')'(x) / f'(x)
        y = self.f(x)
        dfx = self.df(x)
        w = dlogdet.reshape((-1,) + (1,) * (x.dim() - 1))
        return y, dx / dfx - w * self.dlog_df(x) / dfx, None


class LeakyReLU(_Elementwise):
    r"""Invertible leaky ReLU :math:`f(x) = x` for :math:`x \ge 0`, :math:`a x` otherwise
    (:math:`0 < a`, :math:`a \ne 1`); :math:`\log f'(x) = \log a\,[x < 0]`.

    >>> import torch
    >>> LeakyReLU(0.5)(torch.tensor([[-2.0, 3.0]]))
    (tensor([[-1.,  3.]]), tensor([-0.6931]))
    """

    def __init__(self, slope: float = 0.1, ndim: Optional[int] = None) -> None:
        super().__init__(ndim)
        if not slope > 0:
            raise ValueError(f"LeakyReLU slope must be positive to be invertible, got {slope}")
        self.slope = float(slope)

    def f(self, x: Tensor) -> Tensor: return torch.where(x >= 0, x, self.slope * x)
    def f_inv(self, y: Tensor) -> Tensor: return torch.where(y >= 0, y, y / self.slope)
    def log_df(self, x: Tensor) -> Tensor: return (x < 0).to(x.dtype) * math.log(self.slope)
    def dlog_df(self, x: Tensor) -> Tensor: return torch.zeros_like(x)


class Sigmoid(_Elementwise):
    r"""Logistic sigmoid :math:`f(x) = 1/(1+e^{-x})`, mapping the reals onto :math:`(0, 1)`.

    :math:`\log f'(x) = \log\sigma(x) + \log\sigma(-x)`, :math:`(\log f')'(x) = 1 - 2\sigma(x)`.
    The inverse needs ``y`` strictly inside ``(0, 1)``.

    >>> import torch
    >>> Sigmoid()(torch.zeros(1, 2))[0]
    tensor([[0.5000, 0.5000]])
    """

    def f(self, x: Tensor) -> Tensor: return torch.sigmoid(x)
    def f_inv(self, y: Tensor) -> Tensor: return torch.logit(y)
    def log_df(self, x: Tensor) -> Tensor: return torch.nn.functional.logsigmoid(x) + torch.nn.functional.logsigmoid(-x)
    def dlog_df(self, x: Tensor) -> Tensor: return 1 - 2 * torch.sigmoid(x)

    def _check_range(self, y: Tensor) -> None:
        if value_checks_enabled() and bool(((y <= 0) | (y >= 1)).any()):
            raise ValueError("Sigmoid.inverse needs values strictly inside (0, 1)")


class Logit(_Elementwise):
    r"""Logit :math:`f(x) = \log(x / (1 - x))`, the inverse of :class:`Sigmoid`: maps data in
    :math:`(0, 1)` (e.g. dequantised images) to the reals.

    :math:`\log f'(x) = -\log x - \log(1 - x)`, :math:`(\log f')'(x) = -1/x + 1/(1 - x)`.

    >>> import torch
    >>> Logit()(torch.full((1, 2), 0.5))[0]
    tensor([[0., 0.]])
    """

    def f(self, x: Tensor) -> Tensor: return torch.logit(x)
    def f_inv(self, y: Tensor) -> Tensor: return torch.sigmoid(y)
    def log_df(self, x: Tensor) -> Tensor: return -torch.log(x) - torch.log1p(-x)
    def dlog_df(self, x: Tensor) -> Tensor: return -1 / x + 1 / (1 - x)

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        if value_checks_enabled() and bool(((x <= 0) | (x >= 1)).any()):
            raise ValueError("Logit needs inputs strictly inside (0, 1)")
        return super()._forward(x, c)
