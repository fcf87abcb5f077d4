"""Conditioners: the small, non-invertible networks inside coupling blocks.

**The ZeroPad rule** (the one place it is written down; every block and network in invnet follows
it): a convolution with spatial reach is built with ``padding=0`` and preceded by a
:class:`ZeroPad` module of half its kernel width. Serially that is ordinary zero padding.
:func:`invnet.distributed.decompose` finds every ``ZeroPad`` in a built network and swaps it for a
:class:`~invnet.distributed.HaloPad` of the same width, which fills the border with the
neighbouring ranks' cells and with zeros only at the global border, so the same network code runs
serially and on a process grid. ``decompose`` refuses a network with a convolution that pads by
itself. A block written outside invnet that follows the rule decomposes too.

The ``nn.Conv`` modules hold the weights (and name them in checkpoints); the arithmetic runs
through :mod:`invnet.layers.kernels`, which picks the kernel path by an explicit rule (pointwise
convolutions as matrix products, the others on oneDNN in channels-last layout) so that every
size, batch and channel count runs at full kernel speed.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import conv, pointwise

__all__ = ["ZeroPad", "ConvConditioner", "MLPConditioner", "make_conditioner", "expand_condition"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class ZeroPad(nn.Module):
    """Zero padding of ``width`` cells on both sides of every space dimension: the module that
    precedes every convolution with reach (see the ZeroPad rule at the top of this module), and
    that a domain decomposition replaces by a halo exchange.

    >>> import torch
    >>> ZeroPad(2, 1)(torch.ones(1, 1, 2, 2)).shape
    torch.Size([1, 1, 4, 4])
    """

    def __init__(self, ndim: int, width: int) -> None:
        super().__init__()
        self.ndim = ndim
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        if self.width == 0:
            return x
        return F.pad(x, [self.width] * (2 * self.ndim))


class _ResidualPointwise(nn.Module):
    def __init__(self, conv: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.act = act

    def forward(self, h: Tensor) -> Tensor:
        return h + self.act(pointwise(h, self.conv.weight, self.conv.bias))


class ConvConditioner(nn.Module):
    r"""Residual convolutional conditioner, Glow-style:

    .. math::
        h_1 = \mathrm{ReLU}(K_1 * x),\quad h_2 = h_1 + \mathrm{ReLU}(K_2 h_1)\ (\text{1x1}),
        \quad \text{out} = K_3 * h_2

    with ``residual_blocks`` extra 1x1 residual stages. The last convolution starts at zero (the
    coupling starts as the identity), following "Glow" (Kingma and Dhariwal, 2018,
    arXiv:1807.03039).

    Args:
        in_channels, out_channels, hidden: channel counts.
        ndim: 1, 2 or 3 space dimensions.
        kernel_size: odd size of the first and last convolutions (their reach is
            ``kernel_size // 2`` cells each).
        residual_blocks: number of 1x1 residual stages (at least 1).
        zero_init: start the last convolution at zero.

    >>> import torch
    >>> net = ConvConditioner(3, 4, hidden=8, ndim=2)
    >>> net(torch.randn(2, 3, 5, 5)).shape
    torch.Size([2, 4, 5, 5])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int,
        ndim: int,
        kernel_size: int = 3,
        residual_blocks: int = 1,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        if ndim not in _CONV:
            raise ValueError(f"ConvConditioner needs 1, 2 or 3 space dimensions, got {ndim}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        conv_cls = _CONV[ndim]
        width = kernel_size // 2
        #: how far the conditioner reaches in cells (halo width a domain decomposition needs)
        self.reach = 2 * width
        self.pad_in = ZeroPad(ndim, width)
        self.conv_in = conv_cls(in_channels, hidden, kernel_size)
        self.act = nn.ReLU()
        self.body = nn.Sequential(
            *[_ResidualPointwise(conv_cls(hidden, hidden, 1), nn.ReLU()) for _ in range(max(1, residual_blocks))]
        )
        self.pad_out = ZeroPad(ndim, width)
        self.conv_out = conv_cls(hidden, out_channels, kernel_size)
        if zero_init:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(conv(self.pad_in(x), self.conv_in.weight, self.conv_in.bias))
        h = self.body(h)
        out = conv(self.pad_out(h), self.conv_out.weight, self.conv_out.bias)
        # the hidden layers may run channels-last (see kernels); the coupling's arithmetic wants
        # channels-first halves, so hand the output back in the default layout (one copy)
        return out.contiguous()


class MLPConditioner(nn.Module):
    r"""Residual MLP conditioner for vectors (ndim 0):
    :math:`h_1 = \mathrm{ReLU}(W_1 x)`, :math:`h_2 = h_1 + \mathrm{ReLU}(W_2 h_1)`, out :math:`= W_3 h_2`
    (last layer starts at zero).

    >>> import torch
    >>> MLPConditioner(3, 4, hidden=8)(torch.randn(2, 3)).shape
    torch.Size([2, 4])
    """

    def __init__(
        self, in_channels: int, out_channels: int, hidden: int, residual_blocks: int = 1, zero_init: bool = True
    ) -> None:
        super().__init__()
        self.reach = 0
        self.lin_in = nn.Linear(in_channels, hidden)
        self.act = nn.ReLU()
        self.body = nn.Sequential(
            *[_ResidualPointwise(nn.Linear(hidden, hidden), nn.ReLU()) for _ in range(max(1, residual_blocks))]
        )
        self.lin_out = nn.Linear(hidden, out_channels)
        if zero_init:
            nn.init.zeros_(self.lin_out.weight)
            nn.init.zeros_(self.lin_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin_out(self.body(self.act(self.lin_in(x))))


def make_conditioner(in_channels: int, out_channels: int, hidden: int, ndim: int, **kwargs) -> nn.Module:
    """A :class:`ConvConditioner` for ``ndim >= 1``, an :class:`MLPConditioner` for ``ndim == 0``;
    ``kwargs`` go to it (``kernel_size`` is dropped for vectors, which have no kernel).

    >>> make_conditioner(3, 4, hidden=8, ndim=0).__class__.__name__
    'MLPConditioner'
    """
    if hidden < 1:
        raise ValueError(f"hidden must be a positive channel count, got {hidden}")
    if ndim == 0:
        kwargs.pop("kernel_size", None)
        return MLPConditioner(in_channels, out_channels, hidden, **kwargs)
    return ConvConditioner(in_channels, out_channels, hidden, ndim, **kwargs)


def expand_condition(c: Tensor, like: Tensor) -> Tensor:
    """Broadcast a vector condition ``(N, C)`` over the space of ``like``; fields pass through.

    >>> import torch
    >>> expand_condition(torch.zeros(2, 3), torch.zeros(2, 5, 4, 4)).shape
    torch.Size([2, 3, 4, 4])
    """
    if c.dim() == 2 and like.dim() > 2:
        return c.reshape(c.shape + (1,) * (like.dim() - 2)).expand(c.shape + tuple(like.shape[2:]))
    return c
