"""Learnable invertible downsampling (orthogonal, initialised as the Haar wavelet squeeze)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..core.module import GradStore, Shape, VJPResult
from ..core.vjp import local_vjp
from .squeeze import SqueezeBase, depth_to_space, haar_matrix, space_to_depth

__all__ = ["LearnableDownsample"]


class LearnableDownsample(SqueezeBase):
    r"""Learnable orthogonal downsampling: a space-to-depth followed by an orthogonal mixing of
    all resulting channels, initialised so that it equals :class:`~invnet.layers.HaarSqueeze`.

    From "iUNet: a fully invertible U-Net" (Etmann, Ke and Schönlieb, 2020, arXiv:2005.05220),
    whose learnable invertible down/upsampling are orthogonal stride-2 convolutions. Here

    .. math::
        y = W\,\mathrm{s2d}(x), \qquad W = \exp(S - S^T)\, (I_C \otimes H_d),

    with :math:`H_d` the orthonormal Haar matrix on the :math:`2^d` cells of a block, :math:`S`
    a learnable :math:`C2^d \times C2^d` matrix starting at zero (so :math:`W` starts as the Haar
    transform) and the matrix exponential of a skew-symmetric matrix orthogonal. Hence
    :math:`\log|\det J| = 0` and :math:`x = \mathrm{s2d}^{-1}(W^T y)`.

    Backward from the output: :math:`t = W^T y`, :math:`x = \mathrm{s2d}^{-1}(t)`,
    :math:`\bar x = \mathrm{s2d}^{-1}(W^T\bar y)`, :math:`\bar W = \sum \bar y\, t^T` (over batch
    and space), and :math:`\bar S` from :math:`\bar W` by a local autograd pass through the small
    matrix function only.

    Args:
        channels: channels of the input ``x`` (the output has ``channels * 2^ndim``).
        ndim: space dimensions, 1 to 3.

    >>> import torch
    >>> from invnet.layers import HaarSqueeze
    >>> down = LearnableDownsample(2, ndim=2)
    >>> x = torch.randn(1, 2, 4, 4)
    >>> bool(torch.allclose(down(x)[0], HaarSqueeze()(x)[0], atol=1e-6))
    True
    """

    def __init__(self, channels: int, ndim: int) -> None:
        super().__init__(ndim)
        if ndim not in (1, 2, 3):
            raise ValueError(f"LearnableDownsample needs 1, 2 or 3 space dimensions, got {ndim}")
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        self.channels = channels
        k = channels * 2**ndim
        self.skew = nn.Parameter(torch.zeros(k, k))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, ndim={self.ndim}"

    def _check_shape(self, shape: Shape, c_shape: Optional[Shape], inverse: bool) -> Shape:
        expected = self.channels * 2**self.ndim if inverse else self.channels
        if shape[1] != expected:
            raise ValueError(
                f"LearnableDownsample{'.inverse' if inverse else ''} expects {expected} channels, got {shape[1]}"
            )
        return super()._check_shape(shape, c_shape, inverse)

    def _haar(self, like: Tensor) -> Tensor:
        # built in the parameter's dtype each time: a stored float32 copy would not be orthogonal in float64
        eye = torch.eye(self.channels, dtype=like.dtype, device=like.device)
        return torch.kron(eye, haar_matrix(self.ndim, like.dtype, like.device))

    def matrix(self) -> Tensor:
        """The orthogonal mixing matrix :math:`W` (differentiable in the parameter)."""
        return torch.linalg.matrix_exp(self.skew - self.skew.T) @ self._haar(self.skew)

    @staticmethod
    def _mix(w: Tensor, t: Tensor) -> Tensor:
        n, k = t.shape[:2]
        return torch.matmul(w, t.reshape(n, k, -1)).reshape(t.shape)

    def squeeze(self, x: Tensor) -> Tensor:
        return self._mix(self.matrix(), space_to_depth(x, "checkerboard"))

    def unsqueeze(self, y: Tensor) -> Tensor:
        return depth_to_space(self._mix(self.matrix().T, y), "checkerboard")

    @staticmethod
    def _outer(a: Tensor, b: Tensor) -> Tensor:
        n, k = a.shape[:2]
        return torch.einsum("nip,njp->ij", a.reshape(n, k, -1), b.reshape(n, k, -1))

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        # W built once: t = W^T y, the cotangent W^T dy, and dW = sum dy t^T handed to the skew
        # parameter by a local pass through the small matrix map
        with local_vjp(self, grads=grads) as vjp:
            w = self.matrix()
            wt = w.detach().T
            t = self._mix(wt, y)
            if w.requires_grad:
                vjp.grad(w, self._outer(dy, t))
        return depth_to_space(t, "checkerboard"), depth_to_space(self._mix(wt, dy), "checkerboard"), None

    def _vjp_inverse(
        self, x: Tensor, dx: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore
    ) -> VJPResult:
        # inverse map y -> x = s2d^{-1}(W^T y): dy = W s2d(dx), dW = y s2d(dx)^T summed
        dt = space_to_depth(dx, "checkerboard")
        with local_vjp(self, grads=grads) as vjp:
            w = self.matrix()
            y = self._mix(w.detach(), space_to_depth(x, "checkerboard"))
            if w.requires_grad:
                vjp.grad(w, self._outer(y, dt))
        return y, self._mix(w.detach(), dt), None
