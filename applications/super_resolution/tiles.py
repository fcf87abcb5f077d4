r"""Super-resolve images too large for one pass, in overlapping tiles.

The model is fully convolutional and its latent lives on the low-resolution grid, so one latent
field :math:`z` is drawn for the *whole* image and every tile decodes its own window of it: where
tiles overlap they decode the same latent values and differ only through the zero padding at
tile borders. Tiles are blended with weights :math:`w` that ramp linearly across each overlap and
are constant over each ``factor x factor`` block (they are defined on the low-resolution grid and
replicated), so

.. math:: \hat x = \frac{\sum_t U w_t \odot \hat x_t}{\sum_t U w_t}, \qquad
          D\hat x = \frac{\sum_t w_t\, D\hat x_t}{\sum_t w_t} = y

stays exactly LR-consistent when every tile is. ``tile`` and ``overlap`` are in low-resolution
pixels; a tile that covers the whole image gives exactly the untiled result.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .degradation import check_image, replicate
from .model import SRFlow

__all__ = ["tile_starts", "blend_weights", "decode_tiled", "sample_tiled"]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``size`` cells with at least ``overlap``
    shared cells between neighbours (the last tile is flush with the end).

    >>> tile_starts(10, 4, 1), tile_starts(3, 8, 2)
    ([0, 3, 6], [0])
    """
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if tile >= size:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp(length: int, ramp_start: bool, ramp_end: bool, overlap: int) -> Tensor:
    w = torch.ones(length, dtype=torch.float64)
    if overlap:
        k = torch.arange(overlap, dtype=torch.float64)
        if ramp_start:
            w[:overlap] = torch.minimum(w[:overlap], (k + 0.5) / overlap)
        if ramp_end:
            w[length - overlap:] = torch.minimum(w[length - overlap:], (overlap - k - 0.5) / overlap)
    return w


def blend_weights(h: int, w: int, top: bool, bottom: bool, left: bool, right: bool, overlap: int) -> Tensor:
    """Blending weights ``(h, w)`` of one tile: linear ramps (strictly positive) across ``overlap``
    cells on the sides that have a neighbour (``True``), 1 elsewhere.

    >>> blend_weights(1, 4, False, False, True, False, 2).tolist()
    [[0.25, 0.75, 1.0, 1.0]]
    """
    return _ramp(h, top, bottom, overlap)[:, None] * _ramp(w, left, right, overlap)[None, :]


def decode_tiled(model: SRFlow, z: Tensor, y: Tensor, tile: int = 32, overlap: int = 4) -> Tensor:
    """Decode the latent field ``z`` for the low-resolution ``y`` tile by tile (sizes in
    low-resolution pixels) and blend the tiles; see the module docstring."""
    check_image("the low-resolution image", y, channels=model.channels)
    if tuple(z.shape) != model.latent_shape(tuple(y.shape)):
        raise ValueError(f"z must have shape {model.latent_shape(tuple(y.shape))}, got {tuple(z.shape)}")
    f = model.factor
    n, c, h, w = y.shape
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    acc = torch.zeros(n, c, f * h, f * w, dtype=y.dtype, device=y.device)
    weight = torch.zeros(1, 1, f * h, f * w, dtype=y.dtype, device=y.device)
    for i in rows:
        for j in cols:
            th, tw = min(tile, h), min(tile, w)
            x_t = model.decode(z[:, :, i:i + th, j:j + tw], y[:, :, i:i + th, j:j + tw])
            wt = blend_weights(th, tw, i > 0, i + th < h, j > 0, j + tw < w, overlap)
            wt = replicate(wt.to(y.dtype).to(y.device)[None, None], f)
            acc[:, :, f * i:f * (i + th), f * j:f * (j + tw)] += wt * x_t
            weight[:, :, f * i:f * (i + th), f * j:f * (j + tw)] += wt
    return acc / weight


def sample_tiled(
    model: SRFlow,
    y: Tensor,
    n: int = 1,
    temperature: float = 1.0,
    tile: int = 32,
    overlap: int = 4,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """``n`` candidates per input like :meth:`SRFlow.sample`, shape ``(n, N, C, fH, fW)``, decoded in
    tiles of ``tile`` low-resolution pixels overlapping by ``overlap``.

    >>> model = SRFlow(steps=1, hidden=4, cond_features=2, encoder_hidden=4, encoder_layers=1)
    >>> sample_tiled(model, torch.rand(1, 1, 10, 12), n=2, tile=6, overlap=2).shape
    torch.Size([2, 1, 1, 40, 48])
    """
    check_image("the low-resolution image", y, channels=model.channels)
    if n < 1:
        raise ValueError(f"n must be a positive number of samples, got {n}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    p = next(model.parameters())
    where = generator.device if generator is not None else p.device
    out = []
    for _ in range(n):
        z_shape = model.latent_shape(tuple(y.shape))
        z = temperature * torch.randn(z_shape, generator=generator, dtype=p.dtype, device=where)
        out.append(decode_tiled(model, z.to(p.device), y, tile, overlap))
    return torch.stack(out)
