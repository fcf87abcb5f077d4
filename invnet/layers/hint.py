"""Hierarchical invertible neural transport (HINT) coupling: a recursive affine coupling."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.module import GradStore, InvertibleModule, Shape, VJPResult, add_optional
from ..core.shapes import check_condition
from .conv1x1 import ChannelPermutation
from .coupling_kinds import make_coupling

__all__ = ["HINTCoupling", "hint_conditioner_count"]


def hint_conditioner_count(channels: int, leaf_channels: int = 3) -> int:
    r"""Number of affine sub-couplings (each with its own conditioner) in a :class:`HINTCoupling`
    over ``channels`` channels: one per node of the recursion tree with 2 or more channels,
    :math:`n(C) = 1` for :math:`2 \le C \le C_{\text{leaf}}`, else
    :math:`1 + n(\lfloor C/2 \rfloor) + n(C - \lfloor C/2 \rfloor)` (the recursion of "HINT",
    Kruse et al., 2021, arXiv:1905.10687).

    >>> [hint_conditioner_count(c) for c in (2, 3, 4, 5, 8, 16)]
    [1, 1, 3, 3, 7, 15]
    """
    if channels < 2:
        return 0
    if channels <= leaf_channels:
        return 1
    low = channels // 2
    return 1 + hint_conditioner_count(low, leaf_channels) + hint_conditioner_count(channels - low, leaf_channels)


class HINTCoupling(InvertibleModule):
    r"""Recursive (hierarchical) affine coupling, HINT.

    From "HINT: Hierarchical Invertible Neural Transport for Density Estimation and Bayesian
    Inference" (Kruse, Detommaso, Köthe, Scheichl, 2021, arXiv:1905.10687). With
    :math:`x = [x_1, x_2]` split along channels (:math:`x_1` the first ``C // 2``):

    .. math::
        T(x) = \begin{cases}
            [\,x_1,\ x_2 \odot e^{s(x_1, c)} + t(x_1, c)\,] & C \le C_{\text{leaf}} \\
            [\,T_1(x_1),\ T_2(x_2 \odot e^{s(x_1, c)} + t(x_1, c))\,] & \text{otherwise}
        \end{cases}

    where :math:`T_1, T_2` are HINT couplings over the halves (a half of one channel is left as
    is), each preceded by a fixed random channel permutation (``permute``). Every level is an
    :class:`~invnet.layers.AffineCoupling` (soft-clamped scale :math:`s`) by default, the paper's
    form; ``coupling`` picks another transform of :data:`~invnet.layers.COUPLINGS` for every node
    (``"additive"``: :math:`s = 0`, a volume-preserving HINT). The condition :math:`c` enters
    every conditioner. Because :math:`T_1` never sees :math:`x_2`, the Jacobian is
    block lower-triangular at every level, so (channel-wise) it is a dense triangular matrix and

    .. math:: \log|\det J_T| = \textstyle\sum s + \log|\det J_{T_1}| + \log|\det J_{T_2}|

    is exact. Unlike a single coupling, every channel is transformed, and every channel depends on
    all channels before it.

    Hand-written backward (one conditioner pass per sub-coupling): from ``y = [y_1, y_2]`` the
    children rebuild :math:`x_1` and :math:`v = x_2 e^{s} + t` with their cotangents, then the
    level's coupling rebuilds :math:`x_2` and adds its conditioner's gradient (one local autograd
    pass) to :math:`\bar x_1`.

    Args:
        channels: channels of ``x`` (2 or more; odd counts split unevenly).
        hidden: hidden channels of every conditioner.
        ndim: space dimensions, 0 (vectors, MLP conditioners) to 3 (convolutional conditioners).
        cond_channels: channels of the optional condition ``c`` (a field of the same space shape
            as ``x``, or a vector ``(N, cond_channels)`` broadcast over space).
        clamp: bound on every log-scale (see :class:`~invnet.layers.AffineCoupling`).
        coupling: the transform of every node, a key of :data:`~invnet.layers.COUPLINGS`
            (``"affine"`` or ``"additive"``).
        leaf_channels: recursion stops at parts of this many channels or fewer (at least 2).
        permute: fixed random channel permutations at the input of every sub-level.
        permute_input: also permute this block's own input (sub-levels are built with it set).
        seed: seed of the fixed permutations (the tree's nodes derive their own from it).
        **conditioner_kwargs: passed to every default conditioner (``kernel_size``,
            ``residual_blocks``).

    >>> import torch
    >>> from invnet.layers import HINTCoupling
    >>> block = HINTCoupling(5, hidden=8, ndim=2, cond_channels=1)
    >>> x, c = torch.randn(2, 5, 4, 4), torch.randn(2, 1, 4, 4)
    >>> y, logdet = block(x, c)
    >>> bool(torch.allclose(block.inverse(y, c)[0], x, atol=1e-6)), logdet.shape
    (True, torch.Size([2]))
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        ndim: int = 2,
        cond_channels: int = 0,
        clamp: float = 2.0,
        leaf_channels: int = 3,
        permute: bool = True,
        permute_input: bool = False,
        seed: int = 0,
        coupling: str = "affine",
        **conditioner_kwargs,
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"HINTCoupling needs at least 2 channels to split, got {channels}")
        if leaf_channels < 2:
            raise ValueError(f"leaf_channels must be at least 2, got {leaf_channels}")
        if ndim not in (0, 1, 2, 3):
            raise ValueError(f"ndim must be 0, 1, 2 or 3, got {ndim}")
        self.channels = channels
        self.ndim = ndim
        self.cond_channels = cond_channels
        self.leaf_channels = leaf_channels
        self.n_lower = channels // 2
        self.n_upper = channels - self.n_lower
        self.permutation = (
            ChannelPermutation(channels, kind="random", seed=seed) if permute_input else None
        )
        self.coupling = make_coupling(
            coupling, channels, hidden, ndim, cond_channels, clamp=clamp, **conditioner_kwargs
        )
        recurse = channels > leaf_channels

        def child(n: int, child_seed: int) -> Optional[HINTCoupling]:
            if not recurse or n < 2:
                return None  # a leaf, or a single channel left as is
            return HINTCoupling(
                n, hidden, ndim, cond_channels, clamp, leaf_channels, permute, permute, child_seed, coupling,
                **conditioner_kwargs,
            )

        self.lower = child(self.n_lower, 2 * seed + 1)
        self.upper = child(self.n_upper, 2 * seed + 2)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, cond_channels={self.cond_channels}, leaf_channels={self.leaf_channels}"

    def _check_shape(self, shape: Shape, c_shape: Optional[Shape], inverse: bool) -> Shape:
        shape = super()._check_shape(shape, c_shape, inverse)
        check_condition(type(self).__name__, shape, c_shape, self.cond_channels)
        return shape

    def _halves(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return t[:, : self.n_lower], t[:, self.n_lower :]

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        if self.permutation is not None:
            x, _ = self.permutation._forward(x, c)
        w, ld = self.coupling._forward(x, c)
        logdet = logdet + ld
        lo, up = self._halves(w)
        if self.lower is not None:
            lo, ld = self.lower._forward(lo, c)
            logdet = logdet + ld
        if self.upper is not None:
            up, ld = self.upper._forward(up, c)
            logdet = logdet + ld
        return torch.cat([lo, up], dim=1), logdet

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        logdet = y.new_zeros(y.shape[0])
        lo, up = self._halves(y)
        if self.lower is not None:
            lo, ld = self.lower._inverse(lo, c)
            logdet = logdet + ld
        if self.upper is not None:
            up, ld = self.upper._inverse(up, c)
            logdet = logdet + ld
        x, ld = self.coupling._inverse(torch.cat([lo, up], dim=1), c)
        logdet = logdet + ld
        if self.permutation is not None:
            x, _ = self.permutation._inverse(x, c)
        return x, logdet

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        lo, up = self._halves(y)
        dlo, dup = self._halves(dy)
        dc = None
        if self.lower is not None:
            lo, dlo, dc_lo = self.lower._vjp(lo, dlo, dlogdet, c, grads)
            dc = add_optional(dc, dc_lo)
        if self.upper is not None:
            up, dup, dc_up = self.upper._vjp(up, dup, dlogdet, c, grads)
            dc = add_optional(dc, dc_up)
        x, dx, dc_cpl = self.coupling._vjp(torch.cat([lo, up], dim=1), torch.cat([dlo, dup], dim=1), dlogdet, c, grads)
        dc = add_optional(dc, dc_cpl)
        if self.permutation is not None:
            x, dx, _ = self.permutation._vjp(x, dx, dlogdet, c, grads)
        return x, dx, dc
