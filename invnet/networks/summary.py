"""Summary networks: trainable maps from an observation (any shape) to the condition of a
conditional flow. They sit *outside* the invertible flow; their gradients arrive through the
flow's condition cotangent ``dc`` by ordinary autograd."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.conditioners import ZeroPad

__all__ = ["ImageSummary", "VectorSummary"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


class ImageSummary(nn.Module):
    r"""Image-to-image summary: resample the observation onto the grid of ``x``, then a small
    convolutional network.

    .. math::
        c = K_L * \sigma(\dots \sigma(K_1 * R(y))), \qquad R = \text{(bi/tri)linear resampling to } \texttt{out\_size}

    The observation may have any space size (a low-resolution image, a shot record of another
    shape); it must have ``in_channels`` channels and ``len(out_size)`` space dimensions. Every
    convolution with reach is preceded by a :class:`~invnet.layers.ZeroPad` (the ZeroPad rule of
    :mod:`invnet.layers.conditioners`), and there is no global pooling, so the map stays local. Conditioning by learned
    features follows "Conditional Invertible Neural Networks for Diverse Image-to-Image
    Translation" (Ardizzone et al., 2021, arXiv:2105.02104). The resampling is a pointwise
    interpolation of the *whole* observation: in a domain-decomposed run, give each rank the
    observation of its own subdomain.

    Args:
        in_channels: channels of the observation.
        out_channels: channels of the condition (the flow's ``cond_channels``).
        out_size: space shape of ``x`` (the condition's space shape).
        hidden: hidden channels.
        layers: number of convolutions (at least 1).
        kernel_size: odd kernel size.
        mode: ``"linear"`` (linear/bilinear/trilinear by dimension) or ``"nearest"`` resampling.

    >>> import torch
    >>> net = ImageSummary(1, 2, out_size=(16, 16), hidden=8)
    >>> net(torch.randn(3, 1, 5, 7)).shape
    torch.Size([3, 2, 16, 16])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        out_size: Sequence[int],
        hidden: int = 32,
        layers: int = 2,
        kernel_size: int = 3,
        mode: str = "linear",
    ) -> None:
        super().__init__()
        out_size = tuple(int(s) for s in out_size)
        ndim = len(out_size)
        if ndim not in _CONV:
            raise ValueError(f"out_size must have 1 to 3 space sizes, got {out_size}")
        if min(out_size) < 1 or min(in_channels, out_channels, hidden, layers) < 1:
            raise ValueError("in_channels, out_channels, hidden, layers and out_size must be positive")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if mode not in ("linear", "nearest"):
            raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.out_size = out_size
        self.ndim = ndim
        self.mode = _LINEAR_MODE[ndim] if mode == "linear" else "nearest"
        width = kernel_size // 2
        conv = _CONV[ndim]
        mods: list[nn.Module] = []
        c = in_channels
        for i in range(layers):
            last = i == layers - 1
            mods += [ZeroPad(ndim, width), conv(c, out_channels if last else hidden, kernel_size)]
            if not last:
                mods.append(nn.ReLU())
            c = hidden
        self.net = nn.Sequential(*mods)

    def forward(self, y: Tensor) -> Tensor:
        if y.dim() != self.ndim + 2 or y.shape[1] != self.in_channels:
            raise ValueError(
                f"ImageSummary expects an observation (batch, {self.in_channels}, *space) with {self.ndim} "
                f"space dimension(s); got shape {tuple(y.shape)}"
            )
        if tuple(y.shape[2:]) != self.out_size:
            kw = {} if self.mode == "nearest" else {"align_corners": False}
            y = F.interpolate(y, size=self.out_size, mode=self.mode, **kw)
        return self.net(y)


class VectorSummary(nn.Module):
    r"""Vector summary: flatten an observation of any fixed shape and map it with an MLP to a
    condition vector ``(N, out_channels)``:
    :math:`c = W_L \sigma(\dots \sigma(W_1 \mathrm{vec}(y)))`.

    For observations that are vectors (``ndim = 0`` flows) or small arrays summarised into a
    vector that every coupling broadcasts over space (as the summary networks of "BayesFlow",
    Radev et al., 2020, arXiv:2003.06281). It reduces over the whole observation, so it is not
    domain-decomposable: it sits outside the decomposed flow.

    Args:
        in_features: number of entries of one observation (product of its non-batch sizes).
        out_channels: size of the condition vector (the flow's ``cond_channels``).
        hidden: hidden width.
        layers: number of linear layers (at least 1).

    >>> import torch
    >>> VectorSummary(6, 4, hidden=16)(torch.randn(5, 6)).shape
    torch.Size([5, 4])
    """

    def __init__(self, in_features: int, out_channels: int, hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        if min(in_features, out_channels, hidden, layers) < 1:
            raise ValueError("in_features, out_channels, hidden and layers must be positive")
        self.in_features = in_features
        self.out_channels = out_channels
        mods: list[nn.Module] = []
        c = in_features
        for i in range(layers):
            last = i == layers - 1
            mods.append(nn.Linear(c, out_channels if last else hidden))
            if not last:
                mods.append(nn.ReLU())
            c = hidden
        self.net = nn.Sequential(*mods)

    def forward(self, y: Tensor) -> Tensor:
        flat = y.reshape(y.shape[0], -1) if y.dim() > 1 else None
        if flat is None or flat.shape[1] != self.in_features:
            raise ValueError(
                f"VectorSummary expects observations of {self.in_features} entries each (batch first); "
                f"got shape {tuple(y.shape)}"
            )
        return self.net(flat)
