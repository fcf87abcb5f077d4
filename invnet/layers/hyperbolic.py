"""Leapfrog (second-order, hyperbolic) invertible layer of Lensink, Peters and Haber."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.module import GradStore, InvertibleModule, VJPResult
from ..core.vjp import local_vjp
from . import kernels
from .conditioners import ZeroPad

__all__ = ["HyperbolicLayer", "TiedConvResidual"]

_ACT = {"tanh": torch.tanh, "relu": torch.relu, "leaky_relu": lambda z: F.leaky_relu(z, 0.2)}


class TiedConvResidual(nn.Module):
    r"""The symmetric residual :math:`F(u) = K^T \sigma(K u + \beta)` with one weight tensor:
    :math:`K` a convolution (after a :class:`~invnet.layers.ZeroPad` of half its width) and
    :math:`K^T` its adjoint, computed as a convolution with the transposed, flipped kernel after
    the same padding (exact for odd kernels and stride 1). For ``ndim == 0``, :math:`K` is a matrix.

    Its Jacobian :math:`K^T \mathrm{diag}(\sigma'(Ku+\beta)) K` is symmetric (negative-semidefinite
    forcing for monotone :math:`\sigma`), the structure the hyperbolic network discretises.

    Args:
        channels: channels of ``u``.
        hidden: channels of ``K u``.
        ndim: space dimensions (0 to 3).
        kernel_size: odd kernel size (ignored for ``ndim == 0``).
        activation: ``"tanh"``, ``"relu"`` or ``"leaky_relu"`` (slope 0.2).

    >>> import torch
    >>> TiedConvResidual(3, 8, ndim=2)(torch.randn(2, 3, 5, 5)).shape
    torch.Size([2, 3, 5, 5])
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        ndim: int,
        kernel_size: int = 3,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if ndim not in (0, 1, 2, 3):
            raise ValueError(f"ndim must be 0, 1, 2 or 3, got {ndim}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if activation not in _ACT:
            raise ValueError(f"activation must be one of {sorted(_ACT)}, got {activation!r}")
        if channels < 1 or hidden < 1:
            raise ValueError(f"channels and hidden must be positive, got {channels} and {hidden}")
        self.ndim = ndim
        self.activation = activation
        k = (kernel_size,) * ndim
        fan_in = channels * math.prod(k)
        self.weight = nn.Parameter(torch.randn((hidden, channels) + k) / math.sqrt(fan_in))
        self.bias = nn.Parameter(torch.zeros(hidden))
        width = kernel_size // 2 if ndim else 0
        #: cells the residual reaches (halo width a domain decomposition needs)
        self.reach = 2 * width
        self.pad_in = ZeroPad(ndim, width) if ndim else nn.Identity()
        self.pad_out = ZeroPad(ndim, width) if ndim else nn.Identity()

    def forward(self, u: Tensor) -> Tensor:
        act = _ACT[self.activation]
        if self.ndim == 0:
            return F.linear(act(F.linear(u, self.weight, self.bias)), self.weight.T)
        # through the kernel rule of invnet.layers.kernels (no reference kernel at any shape)
        z = kernels.conv(self.pad_in(u), self.weight, self.bias)
        adjoint_weight = self.weight.transpose(0, 1).flip(list(range(2, 2 + self.ndim)))
        return kernels.conv(self.pad_out(act(z)), adjoint_weight, None).contiguous()


class HyperbolicLayer(InvertibleModule):
    r"""One leapfrog step of a fully hyperbolic network, acting on a pair of states.

    From "Fully Hyperbolic Convolutional Neural Networks" (Lensink, Peters and Haber, 2019/2022,
    arXiv:1905.10484): a second-order (telegraph/wave-type) ODE
    :math:`\ddot u = -K^T\sigma(Ku + \beta)` discretised by the leapfrog scheme

    .. math::
        u_{j+1} = 2u_j - u_{j-1} - h^2 K_j^T \sigma(K_j u_j + \beta_j).

    The block's input holds the pair :math:`x = (u_{j-1}, u_j)` (first and second half of the
    channels) and its output the next pair :math:`y = (u_j, u_{j+1})`. Inverse (the scheme run
    backwards in time): :math:`u_{j-1} = 2u_j - u_{j+1} - h^2 F(u_j)`, with
    :math:`F(u) = K^T\sigma(Ku + \beta)` (:class:`TiedConvResidual`).

    **Volume preservation** (``logdet = 0``). Write the map as :math:`(a, b) \mapsto (b, 2b - a -
    h^2F(b))`. Its Jacobian is :math:`J = \begin{pmatrix} 0 & I \\ -I & 2I - h^2 F'(b)\end{pmatrix}`.
    Swapping the two block columns (:math:`n` column transpositions, a factor :math:`(-1)^n`)
    gives the block lower-triangular :math:`\begin{pmatrix} I & 0 \\ 2I - h^2F'(b) & -I\end{pmatrix}`
    with determinant :math:`(-1)^n`. Hence :math:`\det J = (-1)^n(-1)^n = 1` for every
    :math:`F`, and :math:`\log|\det J| = 0`: no parameter or activation can make the step
    contract or blow up volume, which keeps deep stacks stable to invert.

    Backward (from the output alone): with :math:`y = (b, c)` and cotangents
    :math:`(\bar b_y, \bar c)`, rebuild :math:`a = 2b - c - h^2F(b)`, then
    :math:`\bar a = -\bar c` and :math:`\bar b = \bar b_y + 2\bar c - h^2 F'(b)^T\bar c`; the last
    term and the gradients of :math:`K, \beta` come from one local autograd pass through
    :math:`F` (the leapfrog arithmetic is written out).

    Args:
        channels: channels of the pair (even: ``2 C`` for states of ``C`` channels).
        hidden: channels of :math:`K u`.
        ndim: space dimensions (0 to 3).
        step: the time step :math:`h`.
        kernel_size, activation: see :class:`TiedConvResidual`.

    >>> import torch
    >>> layer = HyperbolicLayer(4, hidden=8, ndim=3)
    >>> x = torch.randn(2, 4, 4, 4, 4)
    >>> y, logdet = layer(x)
    >>> bool(torch.allclose(layer.inverse(y)[0], x, atol=1e-5)), logdet.tolist()
    (True, [0.0, 0.0])
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 32,
        ndim: int = 2,
        step: float = 0.5,
        kernel_size: int = 3,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if channels < 2 or channels % 2:
            raise ValueError(f"HyperbolicLayer needs an even channel count (a pair of states), got {channels}")
        if not step > 0:
            raise ValueError(f"step must be positive, got {step}")
        self.channels = channels
        self.ndim = ndim
        self.step = float(step)
        self.residual = TiedConvResidual(channels // 2, hidden, ndim, kernel_size, activation)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, step={self.step}"

    def _halves(self, t: Tensor) -> tuple[Tensor, Tensor]:
        c = self.channels // 2
        return t[:, :c], t[:, c:]

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        a, b = self._halves(x)
        new = 2 * b - a - self.step**2 * self.run_conditioner(self.residual, b)
        return torch.cat([b, new], dim=1), x.new_zeros(x.shape[0])

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        b, new = self._halves(y)
        a = 2 * b - new - self.step**2 * self.run_conditioner(self.residual, b)
        return torch.cat([a, b], dim=1), y.new_zeros(y.shape[0])

    def _residual_vjp(self, b: Tensor, cotangent: Tensor, grads: GradStore) -> tuple[Tensor, Tensor]:
        """F(b) and F'(b)^T cotangent, with the parameter gradients added to ``grads``."""
        with local_vjp(self.residual, b, grads=grads) as vjp:
            fb = self.run_conditioner(self.residual, *vjp.inputs)
            (jt,) = vjp.grad(fb, cotangent)
        return fb.detach(), jt

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        b, new = self._halves(y)
        db_y, dnew = self._halves(dy)
        h2 = self.step**2
        fb, jt = self._residual_vjp(b, -h2 * dnew, grads)
        a = 2 * b - new - h2 * fb
        return torch.cat([a, b], dim=1), torch.cat([-dnew, db_y + 2 * dnew + jt], dim=1), None

    def _vjp_inverse(
        self, x: Tensor, dx: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore
    ) -> VJPResult:
        # inverse map (b, new) -> (a, b) with a = 2b - new - h^2 F(b); rebuild new from (a, b)
        a, b = self._halves(x)
        da, db_x = self._halves(dx)
        h2 = self.step**2
        fb, jt = self._residual_vjp(b, -h2 * da, grads)
        new = 2 * b - a - h2 * fb
        return torch.cat([b, new], dim=1), torch.cat([db_x + 2 * da + jt, -da], dim=1), None
