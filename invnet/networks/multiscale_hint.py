"""Multiscale HINT: squeeze, HINT steps, factor out half the channels, recurse on the rest."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.chain import Chain
from ..core.module import GradStore, InvertibleModule
from ..core.shapes import check_condition
from ..layers.conditioners import PadFactory
from ..layers.squeeze import HaarSqueeze, Squeeze
from .base import FlowNetwork
from .hint import _check_common, hint_step
from .multiscale import MultiscaleLevel

__all__ = ["MultiscaleHINT", "SQUEEZES"]

SQUEEZES = ("haar", "checkerboard", "patch")


def _make_squeeze(kind: str, ndim: int) -> Optional[InvertibleModule]:
    """Haar wavelet or space-to-depth squeeze; none for vectors (``ndim == 0``)."""
    if ndim == 0:
        return None
    if kind == "haar":
        return HaarSqueeze(ndim=ndim)
    return Squeeze(kind, ndim=ndim)


class MultiscaleHINT(FlowNetwork):
    r"""Multiscale HINT: ``levels`` scales, each a squeeze, ``depth`` HINT steps and (except the
    last) a split that factors out half the channels; the kept half goes on to the next scale.

    From "HINT: Hierarchical Invertible Neural Transport for Density Estimation and Bayesian
    Inference" (Kruse et al., 2021, arXiv:1905.10687) with the multiscale architecture of
    "Density estimation using Real NVP" (Dinh et al., 2016, arXiv:1605.08803) and Haar squeezes as
    in InvertibleNetworks.jl. Written as a nest of :class:`~invnet.networks.MultiscaleLevel` blocks:

    .. math::
        L_k(x) = S^{-1}\big[\,L_{k+1}(a),\ b\,\big],\quad [a, b] = F_k(S x),\qquad
        L_{\text{last}}(x) = S^{-1} F_{\text{last}}(S x)

    so the latent ``z = L_0(x)`` has **the shape of** ``x`` and no state is kept between calls
    (the inverse needs no previous forward). :meth:`split_latent` cuts ``z`` into the per-scale
    latents (finest first), :meth:`merge_latent` puts them back.

    Args:
        channels: channels of ``x``.
        hidden: hidden channels of every conditioner.
        levels: number of scales (1 or more); space sizes must be divisible by ``2**levels``.
        depth: HINT steps per scale.
        ndim: space dimensions 1 to 3; 0 (vectors) skips the squeezes and only factors out
            channels, so ``channels`` must stay >= 2 after ``levels - 1`` halvings.
        squeeze: ``"haar"`` (orthonormal Haar wavelet, default), ``"checkerboard"`` or ``"patch"``.
        cond_channels: channels of an optional condition: a field ``(N, cond, *space)`` (squeezed
            with ``x``, so scale ``k`` sees ``cond * 2**(ndim*(k+1))`` channels) for ``ndim >= 1``,
            or a vector ``(N, cond)`` for ``ndim == 0``.
        mixing, clamp, leaf_channels, pad, **conditioner_kwargs: as :class:`~invnet.networks.HINT`.

    >>> import torch
    >>> from invnet.networks import MultiscaleHINT
    >>> flow = MultiscaleHINT(2, hidden=8, levels=2, depth=1, ndim=2)
    >>> x = torch.randn(3, 2, 8, 8)
    >>> z, logdet = flow(x)
    >>> z.shape, [tuple(p.shape) for p in flow.split_latent(z)]
    (torch.Size([3, 2, 8, 8]), [(3, 4, 4, 4), (3, 16, 2, 2)])
    >>> bool(torch.allclose(flow.merge_latent(flow.split_latent(z)), z, atol=1e-6))
    True
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        levels: int = 3,
        depth: int = 4,
        ndim: int = 2,
        squeeze: str = "haar",
        cond_channels: int = 0,
        mixing: str = "householder",
        clamp: float = 2.0,
        leaf_channels: int = 3,
        pad: Optional[PadFactory] = None,
        **conditioner_kwargs,
    ) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be at least 1, got {levels}")
        if squeeze not in SQUEEZES:
            raise ValueError(f"squeeze must be one of {SQUEEZES}, got {squeeze!r}")
        _check_common(channels, hidden, depth, ndim, mixing, min_channels=2 if ndim == 0 else 1)
        if cond_channels < 0:
            raise ValueError(f"cond_channels must be >= 0, got {cond_channels}")
        self.channels = channels
        self.ndim = ndim
        self.levels = levels
        self.cond_channels = cond_channels
        factor = 2**ndim
        # channel counts per scale (after its squeeze) and the kept halves
        widths, keeps = [], []
        c_in = channels
        for k in range(levels):
            w = c_in * factor
            keep = w // 2
            if w < 2:
                raise ValueError(
                    f"MultiscaleHINT with {channels} channels and ndim={ndim} cannot be halved {levels - 1} "
                    f"time(s): scale {k} would have {w} channel(s), a coupling needs at least 2; use fewer "
                    f"levels or more channels"
                )
            widths.append(w)
            keeps.append(keep)
            c_in = keep
        self.widths = tuple(widths)
        self.keeps = tuple(keeps)
        inner: Optional[MultiscaleLevel] = None
        for k in reversed(range(levels)):
            cond_k = cond_channels * factor ** (k + 1)
            steps = Chain(
                *[
                    hint_step(widths[k], hidden, ndim, cond_k, mixing, clamp, leaf_channels, 100 * k + j, pad,
                              **conditioner_kwargs)
                    for j in range(depth)
                ]
            )
            inner = MultiscaleLevel(steps, _make_squeeze(squeeze, ndim), inner, keeps[k] if inner is not None else None)
        self.flow = inner
        if ndim == 0:
            self.data_shape = (channels,)

    def _check_shape(self, shape, c_shape, inverse):
        shape = super()._check_shape(shape, c_shape, inverse)
        step = 2**self.levels
        bad = [s for s in shape[2:] if s % step]
        if bad:
            raise ValueError(
                f"MultiscaleHINT with levels={self.levels} needs every space size divisible by 2**levels = "
                f"{step}; got space shape {tuple(shape[2:])}"
            )
        if self.cond_channels and c_shape is not None and self.ndim and len(c_shape) == 2:
            raise ValueError(
                f"MultiscaleHINT takes a field condition of shape ({shape[0]}, {self.cond_channels}, "
                f"*{tuple(shape[2:])}); got a vector condition {tuple(c_shape)} (expand it over space)"
            )
        check_condition(type(self).__name__, shape, c_shape, self.cond_channels)
        return shape

    def _forward(self, x, c):
        return self.flow._forward(x, c)

    def _inverse(self, z, c):
        return self.flow._inverse(z, c)

    def _vjp(self, z, dz, dlogdet, c, grads: GradStore):
        return self.flow._vjp(z, dz, dlogdet, c, grads)

    def _vjp_inverse(self, x, dx, dlogdet, c, grads: GradStore):
        return self.flow._vjp_inverse(x, dx, dlogdet, c, grads)


    def split_latent(self, z: Tensor) -> list[Tensor]:
        """Cut a latent (shape of ``x``) into per-scale parts, finest first: part ``k < levels-1``
        is the factored-out half of scale ``k`` (``widths[k] - keeps[k]`` channels at space size
        ``/ 2**(k+1)``); the last part is the whole last scale. The parts are an orthogonal
        rearrangement of ``z``: independent standard normals under the model."""
        self.check_shape(tuple(z.shape), None, inverse=True)
        return self.flow.split_latent(z)

    def merge_latent(self, parts: list[Tensor]) -> Tensor:
        """Inverse of :meth:`split_latent`."""
        if len(parts) != self.levels:
            raise ValueError(f"expected {self.levels} latent parts (one per scale), got {len(parts)}")
        return self.flow.merge_latent(list(parts))
