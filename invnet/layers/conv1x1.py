"""Invertible 1x1 convolution (learned channel mixing) and fixed channel permutations."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..core.module import GradStore, InvertibleModule, VJPResult
from ..core.shapes import space_size
from ..core.vjp import local_vjp

__all__ = ["Conv1x1", "ChannelPermutation"]


def _mix(w: Tensor, x: Tensor) -> Tensor:
    """Apply a ``(C_out, C_in)`` matrix to the channel axis of ``(N, C_in, *space)``."""
    n, c = x.shape[:2]
    out = torch.matmul(w, x.reshape(n, c, -1))
    return out.reshape((n, w.shape[0]) + tuple(x.shape[2:]))


def _outer_sum(a: Tensor, b: Tensor) -> Tensor:
    """``sum_{n,s} a[n,:,s] b[n,:,s]^T`` for two ``(N, C, *space)`` tensors."""
    n, c = a.shape[:2]
    a2 = a.reshape(n, c, -1)
    b2 = b.reshape(n, b.shape[1], -1)
    return torch.einsum("nis,njs->ij", a2, b2)


#: Up to this many channels the Householder product is formed as a tree (see below).
_TREE_MAX_CHANNELS = 64


def _householder_product(vectors: Tensor) -> Tensor:
    """``H_1 H_2 ... H_C`` with ``H_k = I - 2 v_k v_k^T / |v_k|^2`` (``v_k`` = row k).

    For ``C <= 64`` the factors are multiplied pairwise in a balanced tree: about log2(C) batched
    matrix products instead of C sequential rank-one updates, whose C small kernels dominated
    the cost of a 1x1 convolution on small images. The tree costs O(C^4) flops and O(C^3)
    memory, so wider layers keep the sequential (and slightly more accurate) updates."""
    c = vectors.shape[0]
    eye = torch.eye(c, dtype=vectors.dtype, device=vectors.device)
    if c > _TREE_MAX_CHANNELS:
        w = eye
        for k in range(c):
            v = vectors[k]
            w = w - (2.0 / (v @ v)) * torch.outer(w @ v, v)
        return w
    scale = 2.0 / (vectors * vectors).sum(1)
    mats = eye - scale[:, None, None] * vectors[:, :, None] * vectors[:, None, :]
    while mats.shape[0] > 1:
        if mats.shape[0] % 2:  # odd count: the last factor waits for the next round
            paired = torch.bmm(mats[:-1:2], mats[1::2])
            mats = torch.cat([paired, mats[-1:]])
        else:
            mats = torch.bmm(mats[0::2], mats[1::2])
    return mats[0]


class Conv1x1(InvertibleModule):
    r"""Invertible 1x1 convolution: one learned matrix :math:`W` mixes the channels at every point.

    From "Glow: Generative Flow with Invertible 1x1 Convolutions" (Kingma and Dhariwal, 2018,
    arXiv:1807.03039); the orthogonal Householder form follows "Invert to Learn to Invert"
    (Putzky and Welling, 2019, arXiv:1911.10914).

    .. math::
        y_{n,:,s} = W x_{n,:,s}, \qquad \log|\det J| = |S| \log|\det W|

    Parametrisations (the matrix is built once per call, then applied to the whole batch):

    * ``"householder"``: :math:`W = \prod_{k=1}^{C} (I - 2 v_k v_k^T / \|v_k\|^2)`, orthogonal, so
      :math:`W^{-1} = W^T` and the logdet is 0 (perfectly conditioned in deep stacks). The product
      is formed pairwise (a balanced tree of batched matrix products, about :math:`\log_2 C`
      rounds) and built once per backward.
    * ``"lu"``: :math:`W = P L (U + \mathrm{diag}(\sigma e^{s}))` with a fixed permutation
      :math:`P`, unit lower-triangular :math:`L`, strictly upper :math:`U`, fixed signs
      :math:`\sigma`; :math:`\log|\det W| = \sum_c s_c` (no dense determinant).

    Backward, written out: :math:`x = W^{-1} y`, :math:`\bar x = W^T \bar y`,
    :math:`\bar W = \sum_{n,s} \bar y_{n,:,s} x_{n,:,s}^T`; the small map from parameters to
    :math:`W` (:math:`C \times C`) is differentiated locally, never per sample.

    Args:
        channels: number of channels C.
        parametrization: ``"householder"`` (default) or ``"lu"``.
        ndim: space dimensions (0 to 3) or ``None`` for any.

    >>> import torch
    >>> from invnet.layers import Conv1x1
    >>> conv = Conv1x1(5, parametrization="lu")
    >>> x = torch.randn(2, 5, 4, 4, 4)
    >>> y, logdet = conv(x)
    >>> bool(torch.allclose(conv.inverse(y)[0], x, atol=1e-5))
    True
    """

    def __init__(self, channels: int, parametrization: str = "householder", ndim: Optional[int] = None) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"Conv1x1 needs at least 1 channel, got {channels}")
        if parametrization not in ("householder", "lu"):
            raise ValueError(f"parametrization must be 'householder' or 'lu', got {parametrization!r}")
        self.channels = channels
        self.ndim = ndim
        self.parametrization = parametrization
        if parametrization == "householder":
            self.vectors = nn.Parameter(torch.randn(channels, channels))
        else:
            q, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
            p, low, up = torch.linalg.lu(q)
            diag = torch.diagonal(up)
            dtype = torch.get_default_dtype()  # like the Householder vectors and nn layers
            self.register_buffer("perm", p.to(dtype))
            self.register_buffer("sign", torch.sign(diag).to(dtype))
            self.lower = nn.Parameter(torch.tril(low, -1).to(dtype))
            self.upper = nn.Parameter(torch.triu(up, 1).to(dtype))
            self.log_diag = nn.Parameter(torch.log(diag.abs()).to(dtype))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, parametrization={self.parametrization!r}"

    # -- the matrix and its inverse, built from the parameters --------------------------------
    def _lu_factors(self) -> tuple[Tensor, Tensor]:
        """``(L, U)`` of the LU form: unit lower triangle and upper triangle with diagonal
        ``sign * exp(log_diag)``."""
        eye = torch.eye(self.channels, dtype=self.lower.dtype, device=self.lower.device)
        low = torch.tril(self.lower, -1) + eye
        up = torch.triu(self.upper, 1) + torch.diag(self.sign * torch.exp(self.log_diag))
        return low, up

    def weight(self) -> Tensor:
        """The mixing matrix :math:`W` (differentiable in the parameters)."""
        if self.parametrization == "householder":
            return _householder_product(self.vectors)
        low, up = self._lu_factors()
        return self.perm @ low @ up

    def weight_inverse(self) -> Tensor:
        """:math:`W^{-1}` by transposition (Householder) or two triangular solves (LU)."""
        if self.parametrization == "householder":
            return self.weight().T
        low, up = self._lu_factors()
        return self._lu_inverse(low, up)

    def _lu_inverse(self, low: Tensor, up: Tensor) -> Tensor:
        eye = torch.eye(self.channels, dtype=low.dtype, device=low.device)
        low_inv = torch.linalg.solve_triangular(low, eye, upper=False, unitriangular=True)
        up_inv = torch.linalg.solve_triangular(up, eye, upper=True)
        return up_inv @ low_inv @ self.perm.T

    def _lu_param_grads(self, low: Tensor, up: Tensor, dw: Tensor, dlogdet_per_point: Tensor,
                        grads: GradStore) -> None:
        r"""Gradients of the LU parameters from the cotangent ``dw`` of :math:`W = P L U`,
        written out instead of a local autograd pass (it runs once per block per step):

        .. math::
            \bar L = P^T \bar W U^T, \quad \bar U = L^T P^T \bar W, \quad
            \overline{\mathrm{lower}} = \mathrm{tril}_{-1}(\bar L), \quad
            \overline{\mathrm{upper}} = \mathrm{triu}_{1}(\bar U), \quad
            \overline{\log d} = \mathrm{diag}(\bar U) \odot \mathrm{sign} \odot e^{\log d}
            + \overline{\log\det}_{\text{per point}}.
        """
        dw = dw.to(low.dtype)
        pt_dw = self.perm.T @ dw
        if self.lower.requires_grad:
            grads.add(self.lower, torch.tril(pt_dw @ up.T, -1))
        if self.upper.requires_grad or self.log_diag.requires_grad:
            du = low.T @ pt_dw
            if self.upper.requires_grad:
                grads.add(self.upper, torch.triu(du, 1))
            if self.log_diag.requires_grad:
                diag = self.sign * torch.exp(self.log_diag)
                grads.add(self.log_diag, torch.diagonal(du) * diag + dlogdet_per_point.to(low.dtype))

    def _logdet_per_point(self) -> Tensor:
        if self.parametrization == "householder":
            return self.vectors.new_zeros(())
        return self.log_diag.sum()

    # -- contract -----------------------------------------------------------------------------
    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        y = _mix(self.weight().to(x.dtype), x)
        logdet = (space_size(x) * self._logdet_per_point()).expand(x.shape[0]).to(x.dtype)
        return y, logdet

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        x = _mix(self.weight_inverse().to(y.dtype), y)
        logdet = (-space_size(y) * self._logdet_per_point()).expand(y.shape[0]).to(y.dtype)
        return x, logdet

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        return self._mixing_vjp(y, dy, dlogdet, grads, inverse=False)

    def _vjp_inverse(
        self, x: Tensor, dx: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore
    ) -> VJPResult:
        return self._mixing_vjp(x, dx, dlogdet, grads, inverse=True)

    def _mixing_vjp(self, out: Tensor, dout: Tensor, dlogdet: Tensor, grads: GradStore, inverse: bool) -> VJPResult:
        r"""Backward of ``out = M inp`` with :math:`M = W` (forward) or :math:`W^{-1}` (inverse):
        :math:`inp = M^{-1} out`, :math:`\bar{inp} = M^T \bar{out}`, :math:`\bar M = \sum \bar{out}\, inp^T`."""
        if self.parametrization == "householder":
            # orthogonal, M^{-1} = M^T (logdet 0): build M once and use it three times, the last
            # for the local backward of the small map from the parameters to M
            with local_vjp(self, grads=grads) as vjp:
                m = self.weight_inverse() if inverse else self.weight()
                mt = m.detach().T.to(out.dtype)
                inp, dinp = _mix(mt, out), _mix(mt, dout)
                if m.requires_grad:
                    vjp.grad(m, _outer_sum(dout, inp))
            return inp, dinp, None
        low, up = self._lu_factors()
        w, w_inv = self.perm @ low @ up, self._lu_inverse(low, up)
        m, m_inv = (w_inv, w) if inverse else (w, w_inv)
        inp = _mix(m_inv.to(out.dtype), out)
        dinp = _mix(m.T.to(out.dtype), dout)
        if self._grad_params():
            dm = _outer_sum(dout, inp).to(m.dtype)
            dw = -(m.T @ dm @ m.T) if inverse else dm  # M = W^{-1}: dW = -M^T dM M^T
            sign = -1.0 if inverse else 1.0
            self._lu_param_grads(low, up, dw, sign * space_size(out) * dlogdet.sum(), grads)
        return inp, dinp, None


class ChannelPermutation(InvertibleModule):
    r"""Fixed channel permutation :math:`y_{n,c,s} = x_{n,\pi(c),s}` (log-determinant 0).

    Used between couplings when no learned mixing is wanted (NICE/RealNVP alternate halves this
    way). ``kind="reverse"`` reverses the channel order; ``kind="random"`` draws a permutation from
    ``seed``.

    >>> import torch
    >>> from invnet.layers import ChannelPermutation
    >>> p = ChannelPermutation(3)
    >>> p(torch.arange(3.).reshape(1, 3))[0]
    tensor([[2., 1., 0.]])
    """

    def __init__(self, channels: int, kind: str = "reverse", seed: int = 0, ndim: Optional[int] = None) -> None:
        super().__init__()
        if kind not in ("reverse", "random"):
            raise ValueError(f"kind must be 'reverse' or 'random', got {kind!r}")
        self.channels = channels
        self.ndim = ndim
        if kind == "reverse":
            perm = torch.arange(channels - 1, -1, -1)
        else:
            perm = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("perm", perm)
        self.register_buffer("perm_inv", torch.argsort(perm))

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return y[:, self.perm_inv], y.new_zeros(y.shape[0])

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        return y[:, self.perm_inv], dy[:, self.perm_inv], None

    def _vjp_inverse(
        self, x: Tensor, dx: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore
    ) -> VJPResult:
        return x[:, self.perm], dx[:, self.perm], None
