"""Glow: the multiscale builder with (ActNorm, invertible 1x1 convolution, coupling) steps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..core.module import InvertibleModule
from ..layers.actnorm import ActNorm
from ..layers.conv1x1 import Conv1x1
from ..layers.coupling_kinds import check_coupling, make_coupling
from .multiscale_flow import MultiscaleFlow

__all__ = ["Glow", "GlowStep"]


@dataclass(frozen=True)
class GlowStep:
    r"""Step factory of Glow: step :math:`k` is
    :math:`x \mapsto \mathrm{Coupling}_k(W_k\,\mathrm{ActNorm}_k(x))`, an ActNorm, an invertible
    1x1 convolution :math:`W_k` and a coupling whose passive half alternates with :math:`k`
    ("Glow: Generative Flow with Invertible 1x1 Convolutions", Kingma and Dhariwal, 2018,
    arXiv:1807.03039). Give it to :class:`~invnet.networks.MultiscaleFlow` (see
    :class:`~invnet.networks.StepFactory`).

    Args:
        hidden: hidden channels of every coupling's conditioner.
        clamp: bound on the couplings' log-scales (affine couplings).
        conv1x1: ``"householder"`` (orthogonal) or ``"lu"`` parametrisation of :math:`W_k`.
        coupling: the coupling transform, a key of :data:`~invnet.layers.COUPLINGS`:
            ``"affine"`` (RealNVP/Glow) or ``"additive"`` (NICE, volume preserving).
        kernel_size, residual_blocks: of the convolutional conditioners (``kernel_size`` is
            unused for vectors).

    >>> import torch
    >>> blocks = GlowStep(hidden=8)(channels=4, cond_channels=0, ndim=1, scale=0, index=1)
    >>> [type(b).__name__ for b in blocks], blocks[2].swap
    (['ActNorm', 'Conv1x1', 'AffineCoupling'], True)
    """

    hidden: int = 64
    clamp: float = 2.0
    conv1x1: str = "householder"
    coupling: str = "affine"
    kernel_size: int = 3
    residual_blocks: int = 1

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise ValueError(f"hidden must be a positive channel count, got {self.hidden}")
        if not self.clamp > 0:
            raise ValueError(f"clamp must be positive, got {self.clamp}")
        if self.conv1x1 not in ("householder", "lu"):
            raise ValueError(f"conv1x1 must be 'householder' or 'lu', got {self.conv1x1!r}")
        check_coupling(self.coupling)

    def __call__(self, channels: int, cond_channels: int, ndim: int, scale: int, index: int) -> list[InvertibleModule]:
        return [
            ActNorm(channels, ndim),
            Conv1x1(channels, self.conv1x1, ndim),
            make_coupling(
                self.coupling, channels, self.hidden, ndim, cond_channels, swap=bool(index % 2), clamp=self.clamp,
                kernel_size=self.kernel_size, residual_blocks=self.residual_blocks,
            ),
        ]


class Glow(MultiscaleFlow):
    r"""Glow: ``levels`` scales of ``depth`` steps, with a squeeze before and a split after each
    scale, from "Glow: Generative Flow with Invertible 1x1 Convolutions" (Kingma and Dhariwal,
    2018, arXiv:1807.03039) on the multiscale design of "Density estimation using Real NVP" (Dinh
    et al., 2016, arXiv:1605.08803): :class:`~invnet.networks.MultiscaleFlow` with
    :class:`GlowStep`.

    One step is :math:`x \mapsto \mathrm{Coupling}(W\,\mathrm{ActNorm}(x))` (couplings alternate
    which half is passive). The network is nested, one :class:`MultiscaleLevel` per scale:

    .. math::
        L_\ell(x) = S^{-1}\,\mathrm{cat}\big(L_{\ell+1}(a), b\big),\quad
        (a, b) = \mathrm{split}\big(F_\ell(S x)\big), \qquad L_{\text{levels}}(x) = S^{-1} F(S x)

    so ``z = net(x)`` has the shape of ``x``; :meth:`split_latent` cuts it into the per-scale
    latents (finest first) and :meth:`merge_latent` puts them back. The latent is
    :math:`z \sim \mathcal N(0, I)` and
    :math:`\log q(x) = \log\mathcal N(z) + \sum \log|\det J|`. Nothing about shapes is remembered
    between calls: ``inverse`` works on any valid latent without a prior forward.

    After the squeeze a scale holds :math:`C_\ell 2^d` channels (``d = ndim``); the first half
    (``C_\ell 2^{d-1}``) goes on to the next scale, the rest is factored out. Any ``channels >= 1``
    therefore works for ``ndim >= 1``. For vectors (``ndim = 0``) there is no squeeze: use
    ``levels=1`` (a plain stack of steps, ``channels >= 2``, odd counts give unequal coupling
    halves); ``levels > 1`` factors out ``channels - channels // 2`` per level without a squeeze and
    needs at least 2 channels left at the last level.

    A condition (``cond_channels > 0``) enters every coupling's conditioner. A field condition
    ``(N, cond_channels, *space)`` (same space shape as ``x``) is squeezed along with ``x``, so at
    scale :math:`\ell` the couplings see :math:`\mathrm{cond\_channels}\cdot 2^{d\ell}` channels; a
    vector condition ``(N, cond_channels)`` (``vector_condition=True``, always for ``ndim = 0``)
    is broadcast over space. See :class:`~invnet.networks.ConditionalGlow`.

    Memory: run under the memory-free engine, training keeps only ``z`` (and ``c``), whatever the
    depth; the backward rebuilds inputs level by level with each block's hand-written VJP.

    Args:
        channels: channels of ``x``.
        hidden: hidden channels of every coupling's conditioner.
        levels: number of scales (space sizes must be divisible by ``2**levels``).
        depth: steps per scale.
        ndim: space dimensions, 0 (vectors) to 3.
        squeeze: ``"haar"`` (orthonormal Haar wavelet), ``"checkerboard"``, ``"patch"`` or ``None``
            (no squeeze: every scale at full resolution).
        cond_channels: channels of the condition (0: unconditional).
        vector_condition: the condition is a vector ``(N, cond_channels)`` rather than a field.
        clamp: bound on the couplings' log-scales.
        conv1x1: ``"householder"`` (orthogonal) or ``"lu"`` parametrisation of the 1x1 convolutions.
        kernel_size, residual_blocks: of the convolutional conditioners.
        coupling: ``"affine"`` (default) or ``"additive"`` (volume preserving); see
            :data:`~invnet.layers.COUPLINGS`.

    >>> import torch
    >>> from invnet.networks import Glow
    >>> net = Glow(3, hidden=16, levels=2, depth=2, ndim=2)
    >>> x = torch.randn(4, 3, 8, 8)
    >>> z, logdet = net(x)
    >>> z.shape, [tuple(p.shape) for p in net.split_latent(z)]
    (torch.Size([4, 3, 8, 8]), [(4, 6, 4, 4), (4, 24, 2, 2)])
    >>> bool(torch.allclose(net.inverse(z)[0], x, atol=1e-5)), net.log_prob(x).shape
    (True, torch.Size([4]))
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        levels: int = 3,
        depth: int = 8,
        ndim: int = 2,
        squeeze: Optional[str] = "haar",
        cond_channels: int = 0,
        vector_condition: bool = False,
        clamp: float = 2.0,
        conv1x1: str = "householder",
        kernel_size: int = 3,
        residual_blocks: int = 1,
        coupling: str = "affine",
    ) -> None:
        step = GlowStep(hidden, clamp, conv1x1, coupling, kernel_size, residual_blocks)
        super().__init__(step, channels, levels, depth, ndim, squeeze, cond_channels, vector_condition)
