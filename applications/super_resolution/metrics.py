r"""Image-quality metrics for super-resolution, per image (shape ``(batch,)``).

- PSNR: :math:`10 \log_{10}(\text{peak}^2 / \mathrm{MSE})` dB (``inf`` for a perfect match).
- SSIM: "Image quality assessment: from error visibility to structural similarity" (Wang et
  al., 2004), computed by ``skimage.metrics.structural_similarity`` (7x7 window, data range 1).
- LR consistency: the PSNR between the downscaled output :math:`D\hat x` and the input
  :math:`y`, with the same operator :math:`D` that made :math:`y` (SRFlow, Lugmayr et al., 2020,
  arXiv:2006.14759, reports about 50 dB for its samples and 38 dB for bicubic on DIV2K 4x).
- Diversity: the mean over pixels of the per-pixel standard deviation across samples.
"""
from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch import Tensor

from .degradation import check_image, downsample

__all__ = ["psnr", "ssim", "lr_consistency", "diversity"]


def _check_pair(x: Tensor, ref: Tensor) -> None:
    check_image("the estimate", x)
    check_image("the reference", ref)
    if x.shape != ref.shape:
        raise ValueError(
            f"the estimate and the reference must have the same shape, got {tuple(x.shape)} and {tuple(ref.shape)}"
        )


def psnr(x: Tensor, ref: Tensor, peak: float = 1.0) -> Tensor:
    r"""Peak signal-to-noise ratio per image, in dB: :math:`10\log_{10}(p^2/\mathrm{MSE})`.

    >>> ref = torch.zeros(1, 1, 4, 4)
    >>> round(float(psnr(ref + 0.1, ref)[0]), 6)  # MSE 0.01 -> 20 dB
    20.0
    """
    _check_pair(x, ref)
    mse = (x.double() - ref.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(peak**2 / mse)


def ssim(x: Tensor, ref: Tensor, data_range: float = 1.0) -> Tensor:
    """Structural similarity per image (``skimage.metrics.structural_similarity``; 7x7 window,
    channels averaged), in ``[-1, 1]``, 1 for identical images. Images need at least 7x7 pixels.

    >>> ref = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> ssim(ref, ref).tolist()
    [1.0, 1.0]
    """
    _check_pair(x, ref)
    if min(x.shape[2:]) < 7:
        raise ValueError(f"SSIM needs images of at least 7x7 pixels, got {tuple(x.shape[2:])}")
    a = x.detach().cpu().double().numpy()
    b = ref.detach().cpu().double().numpy()
    values = [
        structural_similarity(a[i], b[i], data_range=data_range, channel_axis=0) for i in range(a.shape[0])
    ]
    return torch.tensor(np.array(values, dtype=np.float64))


def lr_consistency(x: Tensor, y: Tensor, factor: int, peak: float = 1.0) -> Tensor:
    r"""LR consistency in dB: :math:`\mathrm{PSNR}(D\hat x, y)` with the degradation operator
    :math:`D` (:func:`~.degradation.downsample`). Very high (``inf`` in exact arithmetic) for an
    upsampler whose outputs downscale back to their inputs.

    >>> y = torch.rand(1, 1, 2, 2)
    >>> bool(lr_consistency(y.repeat_interleave(4, 2).repeat_interleave(4, 3), y, 4)[0] > 100)
    True
    """
    check_image("the low-resolution input", y, channels=x.shape[1] if x.dim() == 4 else None)
    return psnr(downsample(x, factor), y, peak)


def diversity(samples: Tensor) -> Tensor:
    r"""Sample diversity per image: :math:`\frac{1}{P}\sum_p \mathrm{std}_s(x^{(s)}_p)` over ``S``
    samples (unbiased std). ``samples`` has shape ``(S, batch, C, H, W)`` with ``S >= 2``.

    >>> round(float(diversity(torch.stack([torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)]))[0]), 6)
    0.707107
    """
    if not isinstance(samples, Tensor) or samples.dim() != 5:
        raise ValueError(
            f"samples must have shape (samples, batch, channels, H, W), got {getattr(samples, 'shape', None)}"
        )
    if samples.shape[0] < 2:
        raise ValueError(f"diversity needs at least 2 samples, got {samples.shape[0]}")
    return samples.double().std(0).flatten(1).mean(1)
