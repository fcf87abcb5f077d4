"""The coupling transforms a flow step can use, by name.

Networks take ``coupling="affine"`` (the default), ``"additive"`` or ``"spline"`` and build every coupling with
:func:`make_coupling`, so a new transform is one entry in :data:`COUPLINGS`: a function

    ``maker(channels, hidden, ndim, cond_channels, swap, clamp, **conditioner_kwargs) -> InvertibleModule``

that builds a coupling over ``channels`` channels (2 or more, odd allowed) whose conditioner sees
the passive part and a condition of ``cond_channels`` channels; ``swap`` makes the last part
passive, ``clamp`` bounds a scale where the transform has one, and ``conditioner_kwargs``
(``kernel_size``, ``residual_blocks``, ...) go to the default conditioner. A maker takes what it
understands and passes the rest on.
"""
from __future__ import annotations

from typing import Callable

from ..core.module import InvertibleModule
from .coupling import AdditiveCoupling, AffineCoupling
from .spline import SplineCoupling

__all__ = ["COUPLINGS", "CouplingMaker", "check_coupling", "make_coupling"]

CouplingMaker = Callable[..., InvertibleModule]


def _affine(channels: int, hidden: int, ndim: int, cond_channels: int, swap: bool, clamp: float,
            **conditioner_kwargs) -> InvertibleModule:
    return AffineCoupling(channels, hidden, ndim, cond_channels, clamp=clamp, swap=swap, **conditioner_kwargs)


def _additive(channels: int, hidden: int, ndim: int, cond_channels: int, swap: bool, clamp: float,
              **conditioner_kwargs) -> InvertibleModule:
    # volume preserving: no scale, so nothing to clamp
    return AdditiveCoupling(channels, hidden, ndim, cond_channels, swap=swap, **conditioner_kwargs)


def _spline(channels: int, hidden: int, ndim: int, cond_channels: int, swap: bool, clamp: float,
            **kwargs) -> InvertibleModule:
    # clamp bounds the knot log-slopes as it bounds the affine log-scale; kwargs may also carry
    # bins, tail_bound, min_bin_width, min_bin_height
    return SplineCoupling(channels, hidden, ndim, cond_channels, clamp=clamp, swap=swap, **kwargs)


#: Coupling transforms by name: ``"affine"`` (:class:`~invnet.layers.AffineCoupling`, RealNVP/Glow),
#: ``"additive"`` (:class:`~invnet.layers.AdditiveCoupling`, NICE, volume preserving) and
#: ``"spline"`` (:class:`~invnet.layers.SplineCoupling`, rational-quadratic neural spline flows).
COUPLINGS: dict[str, CouplingMaker] = {"affine": _affine, "additive": _additive, "spline": _spline}


def check_coupling(kind: str) -> str:
    """Return ``kind`` if :data:`COUPLINGS` has it, else raise ``ValueError`` listing the kinds.

    >>> check_coupling("additive")
    'additive'
    """
    if kind not in COUPLINGS:
        raise ValueError(f"coupling must be one of {sorted(COUPLINGS)}, got {kind!r}")
    return kind


def make_coupling(
    kind: str,
    channels: int,
    hidden: int = 64,
    ndim: int = 2,
    cond_channels: int = 0,
    swap: bool = False,
    clamp: float = 2.0,
    **conditioner_kwargs,
) -> InvertibleModule:
    """Build a coupling of the given kind (see :data:`COUPLINGS` for the arguments).

    >>> import torch
    >>> block = make_coupling("additive", 4, hidden=8, ndim=1)
    >>> type(block).__name__, block(torch.randn(2, 4, 6))[1].tolist()
    ('AdditiveCoupling', [0.0, 0.0])
    """
    return COUPLINGS[check_coupling(kind)](channels, hidden, ndim, cond_channels, swap, clamp, **conditioner_kwargs)
