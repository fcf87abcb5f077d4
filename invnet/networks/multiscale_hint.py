"""Multiscale HINT: squeeze, HINT steps, factor out half the channels, recurse on the rest."""
from __future__ import annotations

from typing import Optional

from .hint import HINTStep
from .multiscale_flow import SQUEEZES, MultiscaleFlow

__all__ = ["MultiscaleHINT", "SQUEEZES"]


class MultiscaleHINT(MultiscaleFlow):
    r"""Multiscale HINT: ``levels`` scales, each a squeeze, ``depth`` HINT steps and (except the
    last) a split that factors out half the channels; the kept half goes on to the next scale:
    :class:`~invnet.networks.MultiscaleFlow` with :class:`~invnet.networks.HINTStep`.

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
        squeeze: ``"haar"`` (orthonormal Haar wavelet, default), ``"checkerboard"``, ``"patch"``
            or ``None`` (no squeeze).
        cond_channels: channels of an optional condition: a field ``(N, cond, *space)`` (squeezed
            with ``x``, so scale ``k`` sees ``cond * 2**(ndim*(k+1))`` channels), or a vector
            ``(N, cond)`` with ``vector_condition=True`` (always for ``ndim == 0``).
        mixing, clamp, leaf_channels, coupling, **conditioner_kwargs: as :class:`~invnet.networks.HINT`.

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

    #: parameter names before the multiscale builder: the outermost level was ``flow``
    legacy_prefixes = (("flow.", "body."),)

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        levels: int = 3,
        depth: int = 4,
        ndim: int = 2,
        squeeze: Optional[str] = "haar",
        cond_channels: int = 0,
        mixing: str = "householder",
        clamp: float = 2.0,
        leaf_channels: int = 3,
        vector_condition: bool = False,
        coupling: str = "affine",
        **conditioner_kwargs,
    ) -> None:
        step = HINTStep(hidden, mixing, clamp, leaf_channels, coupling, conditioner_kwargs)
        super().__init__(step, channels, levels, depth, ndim, squeeze, cond_channels, vector_condition)
