r"""The degradation operator (box downscaling) and the bicubic baseline.

The low-resolution image is the **area (box) average** of the high-resolution one over
``factor x factor`` blocks,

.. math:: y_{i,j} = (D x)_{i,j} = \frac{1}{s^2} \sum_{a,b=0}^{s-1} x_{s i + a,\, s j + b},

an antialiased operator (a box prefilter followed by subsampling). The same operator defines LR
consistency: an output :math:`\hat x` is consistent with :math:`y` when :math:`D \hat x = y`.
Its right inverse is pixel replication :math:`U` (:math:`D U = I`), so
:math:`\hat x + U(y - D\hat x)` projects any estimate onto the consistent set.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["check_image", "downsample", "replicate", "bicubic_upsample", "project_consistent"]


def check_image(name: str, x: Tensor, channels: int | None = None, factor: int | None = None) -> None:
    """Raise ``ValueError`` unless ``x`` is a floating ``(batch, channels, H, W)`` image batch
    (with ``channels`` channels, and ``H, W`` divisible by ``factor`` when given).

    >>> import torch
    >>> check_image("x", torch.zeros(1, 1, 8, 8), channels=1, factor=4)
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (batch, channels, height, width), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
    if factor is not None:
        check_factor(factor)
        h, w = x.shape[2:]
        if h % factor or w % factor:
            raise ValueError(
                f"the scale factor {factor} must divide the size of {name}, got {h}x{w} "
                f"(crop or pad to a multiple of {factor})"
            )


def check_factor(factor: int) -> None:
    """Raise ``ValueError`` unless ``factor`` is a power of two of at least 2 (2, 4, 8, ...).

    >>> check_factor(4)
    """
    if not isinstance(factor, int) or factor < 2 or factor & (factor - 1):
        raise ValueError(f"the scale factor must be a power of two >= 2 (2, 4, 8, ...), got {factor!r}")


def downsample(x: Tensor, factor: int) -> Tensor:
    r"""Box (area-average) downscaling :math:`D x` by ``factor`` (see the module docstring).

    Args:
        x: high-resolution images ``(N, C, H, W)``, ``H`` and ``W`` divisible by ``factor``.
        factor: scale factor (a power of two).

    >>> import torch
    >>> downsample(torch.arange(16.0).reshape(1, 1, 4, 4), 2).flatten().tolist()
    [2.5, 4.5, 10.5, 12.5]
    """
    check_image("the high-resolution image", x, factor=factor)
    return F.avg_pool2d(x, factor)


def replicate(y: Tensor, factor: int) -> Tensor:
    r"""Pixel replication :math:`U y`, the right inverse of :func:`downsample` (:math:`DU = I`).

    >>> import torch
    >>> replicate(torch.tensor([[[[1.0, 2.0]]]]), 2).flatten().tolist()
    [1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0]
    """
    check_image("the low-resolution image", y)
    check_factor(factor)
    return y.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def bicubic_upsample(y: Tensor, factor: int, clamp: bool = True) -> Tensor:
    r"""Bicubic interpolation (Keys kernel, :math:`a = -0.75` as in PyTorch) by ``factor``, the
    usual baseline; clamped to ``[0, 1]`` by default (images are stored in ``[0, 1]``).

    >>> import torch
    >>> bicubic_upsample(torch.full((1, 1, 2, 2), 0.5), 4).shape
    torch.Size([1, 1, 8, 8])
    """
    check_image("the low-resolution image", y)
    check_factor(factor)
    up = F.interpolate(y, scale_factor=factor, mode="bicubic", align_corners=False)
    return up.clamp(0.0, 1.0) if clamp else up


def project_consistent(x: Tensor, y: Tensor, factor: int) -> Tensor:
    r"""Project an estimate onto the LR-consistent set: :math:`x + U(y - Dx)` (then :math:`D` of the
    result is :math:`y` exactly, up to round-off).

    >>> import torch
    >>> x, y = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 2, 2)
    >>> bool(torch.allclose(downsample(project_consistent(x, y, 4), 4), y, atol=1e-6))
    True
    """
    return x + replicate(y - downsample(x, factor), factor)
