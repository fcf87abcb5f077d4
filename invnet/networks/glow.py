"""Glow: multiscale flow of (ActNorm, invertible 1x1 convolution, affine coupling) steps."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..core.chain import Chain
from ..core.module import GradStore
from ..layers.actnorm import ActNorm
from ..layers.conditioners import PadFactory
from ..layers.conv1x1 import Conv1x1
from ..layers.coupling import AffineCoupling
from ..layers.squeeze import HaarSqueeze, Squeeze
from .base import FlowNetwork
from .multiscale import MultiscaleLevel

__all__ = ["Glow"]

_SQUEEZES = ("haar", "checkerboard", "patch")


def _make_squeeze(kind: str, ndim: int):
    return HaarSqueeze(ndim) if kind == "haar" else Squeeze(kind, ndim)


class Glow(FlowNetwork):
    r"""Glow: ``levels`` scales of ``depth`` steps, with a squeeze before and a split after each
    scale, from "Glow: Generative Flow with Invertible 1x1 Convolutions" (Kingma and Dhariwal,
    2018, arXiv:1807.03039) on the multiscale design of "Density estimation using Real NVP" (Dinh
    et al., 2016, arXiv:1605.08803).

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
        squeeze: ``"haar"`` (orthonormal Haar wavelet), ``"checkerboard"`` or ``"patch"``.
        cond_channels: channels of the condition (0: unconditional).
        vector_condition: the condition is a vector ``(N, cond_channels)`` rather than a field.
        clamp: bound on the couplings' log-scales.
        conv1x1: ``"householder"`` (orthogonal) or ``"lu"`` parametrisation of the 1x1 convolutions.
        kernel_size, residual_blocks: of the convolutional conditioners.
        pad: padding factory of the conditioners (a domain decomposition swaps in halo exchange).

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
        squeeze: str = "haar",
        cond_channels: int = 0,
        vector_condition: bool = False,
        clamp: float = 2.0,
        conv1x1: str = "householder",
        kernel_size: int = 3,
        residual_blocks: int = 1,
        pad: Optional[PadFactory] = None,
    ) -> None:
        super().__init__()
        if ndim not in (0, 1, 2, 3):
            raise ValueError(f"ndim must be 0 (vectors), 1, 2 or 3, got {ndim}")
        if levels < 1 or depth < 1:
            raise ValueError(f"levels and depth must be >= 1, got levels={levels}, depth={depth}")
        if squeeze not in _SQUEEZES:
            raise ValueError(f"squeeze must be one of {_SQUEEZES}, got {squeeze!r}")
        if cond_channels < 0:
            raise ValueError(f"cond_channels must be >= 0, got {cond_channels}")
        if channels < (2 if ndim == 0 else 1):
            raise ValueError(
                f"Glow needs channels >= {2 if ndim == 0 else 1} for ndim={ndim} "
                f"(a coupling splits channels into two non-empty halves), got {channels}"
            )
        self.channels = channels
        self.ndim = ndim
        self.levels = levels
        self.depth = depth
        self.squeeze_kind = squeeze
        self.cond_channels = cond_channels
        self.vector_condition = bool(vector_condition or ndim == 0)
        factor = 2**ndim if ndim > 0 else 1
        # channel bookkeeping per scale: input channels, channels after the squeeze, kept channels
        scale_channels = []
        c_in = channels
        for level in range(levels):
            n = c_in * factor
            keep = n // 2 if level < levels - 1 else None
            if n < 2 or (keep is not None and keep < 1):
                raise ValueError(
                    f"Glow with ndim={ndim}, levels={levels} and channels={channels}: scale {level + 1} has "
                    f"{n} channels, too few to split; use fewer levels (levels=1 for vectors) or more channels"
                )
            scale_channels.append((n, keep))
            c_in = keep if keep is not None else c_in
        if ndim == 0 and scale_channels[-1][0] < 2:
            raise ValueError(f"Glow on vectors with levels={levels} leaves fewer than 2 channels; use levels=1")
        extra = {"residual_blocks": residual_blocks}
        if ndim > 0:
            extra["kernel_size"] = kernel_size
        inner: Optional[MultiscaleLevel] = None
        for level in reversed(range(levels)):
            n, keep = scale_channels[level]
            cc = cond_channels
            if cond_channels and not self.vector_condition:
                cc = cond_channels * factor ** (level + 1)
            blocks = []
            for k in range(depth):
                blocks += [
                    ActNorm(n),
                    Conv1x1(n, conv1x1),
                    AffineCoupling(n, hidden, ndim, cond_channels=cc, clamp=clamp, swap=bool(k % 2), pad=pad, **extra),
                ]
            sq = _make_squeeze(squeeze, ndim) if ndim > 0 else None
            inner = MultiscaleLevel(Chain(*blocks), sq, inner, keep)
        self.body = inner
        self._scale_channels = scale_channels

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, levels={self.levels}, depth={self.depth}, ndim={self.ndim}, "
            f"squeeze={self.squeeze_kind!r}, cond_channels={self.cond_channels}, "
            f"vector_condition={self.vector_condition}"
        )

    # -- validation ----------------------------------------------------------------------------
    def _check_shape(self, shape, c_shape, inverse):
        name = type(self).__name__
        what = "latent z" if inverse else "x"
        if shape[1] != self.channels:
            raise ValueError(f"{name} expects {what} with {self.channels} channels, got {shape[1]} (shape {shape})")
        if self.ndim > 0:
            div = 2**self.levels
            bad = [s for s in shape[2:] if s % div]
            if bad:
                raise ValueError(
                    f"{name} with levels={self.levels} needs every space size divisible by 2^{self.levels} = {div}; "
                    f"got space shape {tuple(shape[2:])} (size {bad[0]} is not)"
                )
        if self.cond_channels:
            if c_shape is None:
                raise ValueError(f"{name} was built with cond_channels={self.cond_channels} and needs a condition c")
            if self.vector_condition:
                expected = (shape[0], self.cond_channels)
            else:
                expected = (shape[0], self.cond_channels) + tuple(shape[2:])
            if tuple(c_shape) != expected:
                kind = "vector" if self.vector_condition else "field with the space shape of x"
                raise ValueError(
                    f"{name}: condition c must be a {kind}, shape {expected} (batch {shape[0]}); "
                    f"got {tuple(c_shape)} for {what} of shape {tuple(shape)}"
                )
        else:
            c_shape = None  # an unconditional network ignores c
        return self.body.check_shape(tuple(shape), c_shape, inverse)

    # -- contract: delegate to the nested levels ---------------------------------------------
    def _cond(self, c: Optional[Tensor]) -> Optional[Tensor]:
        return c if self.cond_channels else None

    def _forward(self, x, c):
        return self.body._forward(x, self._cond(c))

    def _inverse(self, y, c):
        return self.body._inverse(y, self._cond(c))

    def _vjp(self, y, dy, dlogdet, c, grads: GradStore):
        # pass y on without keeping it in this frame, so the levels can free it once rebuilt
        handoff = [y]
        del y
        return self.body._vjp(handoff.pop(), dy, dlogdet, self._cond(c), grads)

    def _vjp_inverse(self, x, dx, dlogdet, c, grads: GradStore):
        return self.body._vjp_inverse(x, dx, dlogdet, self._cond(c), grads)

    # -- latent structure ---------------------------------------------------------------------
    def split_latent(self, z: Tensor) -> list[Tensor]:
        """Cut the latent ``z`` (shape of ``x``) into per-scale latents, finest scale first.

        Entry ``l < levels - 1`` is what scale ``l + 1`` factored out, in that scale's squeezed
        layout ``(N, C_l 2^d - keep_l, *space / 2^(l+1))``; the last entry is the coarsest scale's
        output ``(N, C_L 2^d, *space / 2^levels)``. Each entry is standard normal under the model.
        Parameter-free; :meth:`merge_latent` inverts it.
        """
        self.check_shape(tuple(z.shape), None if not self.cond_channels else self._dummy_c(z), inverse=True)
        return self.body.split_latent(z)

    def merge_latent(self, parts: list[Tensor]) -> Tensor:
        """Put per-scale latents (as returned by :meth:`split_latent`) back into one ``z``."""
        if len(parts) != self.levels:
            raise ValueError(f"{type(self).__name__} has {self.levels} scales; got {len(parts)} latent parts")
        return self.body.merge_latent(list(parts))

    def _dummy_c(self, z: Tensor) -> tuple[int, ...]:
        if self.vector_condition:
            return (z.shape[0], self.cond_channels)
        return (z.shape[0], self.cond_channels) + tuple(z.shape[2:])

