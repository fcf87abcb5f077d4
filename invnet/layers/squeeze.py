"""Squeezes (space-to-depth, Haar wavelet) and the channel split used by multiscale networks."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..core.module import GradStore, InvertibleModule, Shape, VJPResult

__all__ = [
    "SqueezeBase", "Squeeze", "HaarSqueeze", "space_to_depth", "depth_to_space", "haar_matrix",
    "split_channels", "merge_channels",
]


def space_to_depth(x: Tensor, pattern: str = "checkerboard") -> Tensor:
    """``(N, C, *S)`` -> ``(N, C * 2^d, *S/2)``; output channel ``c * 2^d + k`` holds part ``k``.

    ``checkerboard``: part k = (k_1..k_d) in binary is the sub-grid ``x[..., k_1::2, ..., k_d::2]``
    (a polyphase split: every part spans the whole image).
    ``patch``: part k is the block ``[k_1 H/2:(k_1+1) H/2, ...]`` (contiguous quadrants/octants).
    A permutation of entries; no checks (see :class:`Squeeze` for the validated block).

    >>> import torch
    >>> space_to_depth(torch.arange(4.).reshape(1, 1, 4), "checkerboard")[0].tolist()
    [[0.0, 2.0], [1.0, 3.0]]
    >>> space_to_depth(torch.arange(4.).reshape(1, 1, 4), "patch")[0].tolist()
    [[0.0, 1.0], [2.0, 3.0]]
    """
    n, c = x.shape[:2]
    space = x.shape[2:]
    d = len(space)
    half = [s // 2 for s in space]
    if pattern == "checkerboard":
        shape = [n, c] + [v for h in half for v in (h, 2)]  # (h_i, 2) pairs: index = 2*a + k
        t = x.reshape(shape)
        perm = [0, 1] + [3 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
    else:
        shape = [n, c] + [v for h in half for v in (2, h)]  # (2, h_i) pairs: index = h*k + a
        t = x.reshape(shape)
        perm = [0, 1] + [2 + 2 * i for i in range(d)] + [3 + 2 * i for i in range(d)]
    return t.permute(perm).reshape([n, c * 2**d] + half)


def depth_to_space(y: Tensor, pattern: str = "checkerboard") -> Tensor:
    """Inverse of :func:`space_to_depth`.

    >>> import torch
    >>> x = torch.randn(2, 3, 4, 6)
    >>> bool(torch.equal(depth_to_space(space_to_depth(x, "patch"), "patch"), x))
    True
    """
    n, cd = y.shape[:2]
    half = list(y.shape[2:])
    d = len(half)
    c = cd // 2**d
    t = y.reshape([n, c] + [2] * d + half)
    if pattern == "checkerboard":  # (2..., h...) -> (h_1, 2, h_2, 2, ...)
        perm = [0, 1] + [v for i in range(d) for v in (2 + d + i, 2 + i)]
    else:  # -> (2, h_1, 2, h_2, ...)
        perm = [0, 1] + [v for i in range(d) for v in (2 + i, 2 + d + i)]
    return t.permute(perm).reshape([n, c] + [2 * h for h in half])


class SqueezeBase(InvertibleModule):
    r"""Base of the squeezes: orthogonal maps :math:`Q` from ``(N, C, *S)`` to
    ``(N, C 2^d, *S/2)`` (even space sizes), so :math:`\log|\det J| = 0` and the backward is
    :math:`\bar x = Q^T \bar y = Q^{-1} \bar y`.

    Subclasses implement the two tensor maps :meth:`squeeze` and :meth:`unsqueeze` (no checks, no
    logdet); the block contract, the shape checks and the backward come from here. Networks call
    :meth:`squeeze`/:meth:`unsqueeze` directly on data and conditions (a multiscale level squeezes
    both), and a domain decomposition finds every squeeze level by this type.

    Args:
        ndim: space dimensions the block expects (1 to 3), or ``None`` for any.

    >>> import torch
    >>> sq = Squeeze(ndim=1)
    >>> isinstance(sq, SqueezeBase), sq.squeeze(torch.zeros(2, 3, 8)).shape
    (True, torch.Size([2, 6, 4]))
    """

    def __init__(self, ndim: Optional[int] = None) -> None:
        super().__init__()
        if ndim is not None and ndim not in (1, 2, 3):
            raise ValueError(f"squeezes work on 1, 2 or 3 space dimensions, got ndim={ndim}")
        self.ndim = ndim

    def _check_shape(self, shape: Shape, c_shape: Optional[Shape], inverse: bool) -> Shape:
        d = len(shape) - 2
        if d not in (1, 2, 3):
            raise ValueError(
                f"{type(self).__name__} needs (batch, channels, *space) with 1 to 3 space dimensions, "
                f"got shape {shape}"
            )
        if inverse:
            if shape[1] % 2**d:
                raise ValueError(
                    f"{type(self).__name__}.inverse needs a channel count divisible by {2**d}, got {shape[1]}"
                )
            return (shape[0], shape[1] // 2**d) + tuple(2 * s for s in shape[2:])
        odd = [s for s in shape[2:] if s % 2]
        if odd:
            raise ValueError(
                f"{type(self).__name__} needs even space sizes, got space shape {tuple(shape[2:])}"
            )
        return (shape[0], shape[1] * 2**d) + tuple(s // 2 for s in shape[2:])

    def squeeze(self, x: Tensor) -> Tensor:
        """The map :math:`Q x`: ``(N, C, *S)`` -> ``(N, C 2^d, *S/2)``."""
        raise NotImplementedError

    def unsqueeze(self, y: Tensor) -> Tensor:
        """The inverse map :math:`Q^{-1} y = Q^T y`."""
        raise NotImplementedError

    # Q is orthogonal: the inverse is the adjoint, so dx = Q^T dy = Q^{-1} dy.
    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self.squeeze(x), x.new_zeros(x.shape[0])

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self.unsqueeze(y), y.new_zeros(y.shape[0])

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        return self.unsqueeze(y), self.unsqueeze(dy), None

    def _vjp_inverse(
        self, x: Tensor, dx: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore
    ) -> VJPResult:
        return self.squeeze(x), self.squeeze(dx), None


class Squeeze(SqueezeBase):
    r"""Space-to-depth: halves every space size and multiplies the channels by :math:`2^d`.

    A permutation of entries, so :math:`\log|\det J| = 0`. Patterns: ``"checkerboard"``
    (polyphase: output channel ``c 2^d + k`` is the sub-grid with offsets given by the bits of
    ``k``, as in Glow, Kingma and Dhariwal 2018, arXiv:1807.03039) and ``"patch"`` (contiguous
    halves/quadrants/octants of the domain).

    >>> import torch
    >>> y, _ = Squeeze()(torch.arange(16.).reshape(1, 1, 4, 4))
    >>> y[0, :, 0, 0]
    tensor([0., 1., 4., 5.])
    """

    def __init__(self, pattern: str = "checkerboard", ndim: Optional[int] = None) -> None:
        super().__init__(ndim)
        if pattern not in ("checkerboard", "patch"):
            raise ValueError(f"pattern must be 'checkerboard' or 'patch', got {pattern!r}")
        self.pattern = pattern

    def extra_repr(self) -> str:
        return f"pattern={self.pattern!r}"

    def squeeze(self, x: Tensor) -> Tensor:
        return space_to_depth(x, self.pattern)

    def unsqueeze(self, y: Tensor) -> Tensor:
        return depth_to_space(y, self.pattern)


def haar_matrix(d: int, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> Tensor:
    r"""The orthonormal Haar matrix :math:`H_d = H_1^{\otimes d}` on the :math:`2^d` cells of a
    block, :math:`H_1 = \tfrac{1}{\sqrt 2}\begin{pmatrix}1&1\\1&-1\end{pmatrix}`; symmetric and
    orthogonal, so :math:`H_d^{-1} = H_d^T = H_d`.

    >>> import torch
    >>> h = haar_matrix(2, torch.float64)
    >>> h.shape, bool(torch.allclose(h @ h, torch.eye(4, dtype=torch.float64)))
    (torch.Size([4, 4]), True)
    """
    # built on the device by kernels, not copied from Python data: on a GPU a copy from the host
    # waits for every queued kernel, and this runs at every squeeze call
    h2 = torch.ones(2, 2, dtype=dtype, device=device)
    h2[1, 1].fill_(-1.0)
    h2 = h2 / math.sqrt(2.0)
    h = torch.ones(1, 1, dtype=dtype, device=device)
    for _ in range(d):
        h = torch.kron(h, h2)
    return h  # symmetric and orthogonal: H^{-1} = H^T = H


class HaarSqueeze(SqueezeBase):
    r"""Orthonormal Haar wavelet squeeze in 1D, 2D or 3D.

    Each :math:`2^d` cell block :math:`b` (the polyphase components of a checkerboard squeeze) is
    mapped to its Haar coefficients :math:`H_d b` with :math:`H_d = H_1^{\otimes d}`,
    :math:`H_1 = \tfrac{1}{\sqrt 2}\begin{pmatrix}1&1\\1&-1\end{pmatrix}`. Output channel
    ``c 2^d + k``: ``k = 0`` is the low-pass (scaled average), the others the detail bands.
    Orthogonal, so :math:`\log|\det J| = 0` and the inverse is the transpose. Runs on any device
    (a batched matrix product, no loops). As used by "HINT" (Kruse et al., 2021,
    arXiv:1905.10687) and InvertibleNetworks.jl.

    >>> import torch
    >>> y, _ = HaarSqueeze()(torch.ones(1, 1, 2, 2))
    >>> [round(v, 6) for v in y.flatten().tolist()]
    [2.0, 0.0, 0.0, 0.0]
    """

    def squeeze(self, x: Tensor) -> Tensor:
        t = space_to_depth(x, "checkerboard")
        return self._mix(t, x.dim() - 2)

    def unsqueeze(self, y: Tensor) -> Tensor:
        return depth_to_space(self._mix(y, y.dim() - 2), "checkerboard")

    @staticmethod
    def _mix(t: Tensor, d: int) -> Tensor:
        n, cd = t.shape[:2]
        k = 2**d
        h = haar_matrix(d, t.dtype, t.device)
        blocks = t.reshape(n, cd // k, k, -1)
        return torch.matmul(h, blocks).reshape(t.shape)


def split_channels(x: Tensor, keep: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Split ``x`` along channels into ``(kept, factored_out)`` for multiscale flows: the first
    ``keep`` channels (default ``channels // 2``) go on to the next scale, the rest leave as latent.

    >>> import torch
    >>> a, b = split_channels(torch.zeros(1, 5, 2))
    >>> a.shape[1], b.shape[1]
    (2, 3)
    """
    c = x.shape[1]
    keep = c // 2 if keep is None else keep
    if not 0 < keep < c:
        raise ValueError(f"cannot split {c} channels keeping {keep}: need 0 < keep < channels")
    return x[:, :keep], x[:, keep:]


def merge_channels(kept: Tensor, factored_out: Tensor) -> Tensor:
    """Inverse of :func:`split_channels`."""
    return torch.cat([kept, factored_out], dim=1)
