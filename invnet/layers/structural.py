"""Structural blocks that rearrange other blocks: run one backwards, or on part of the channels."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.module import GradStore, InvertibleModule, Shape, VJPResult

__all__ = ["Inverted", "ChannelSubset"]


class Inverted(InvertibleModule):
    r"""The inverse of a block as a block: :math:`f^{-1}` with
    :math:`\log|\det J_{f^{-1}}(y)| = -\log|\det J_f(x)|` (the wrapped block's inverse logdet).
    Its backward is the wrapped block's ``_vjp_inverse`` (and vice versa), so a learnable
    upsampling can be the inverse of a learnable downsampling and keep the memory-free backward.

    Args:
        block: the block to run backwards.

    >>> import torch
    >>> from invnet.layers import HaarSqueeze
    >>> up = Inverted(HaarSqueeze())
    >>> up(torch.randn(1, 4, 2, 2))[0].shape
    torch.Size([1, 1, 4, 4])
    """

    def __init__(self, block: InvertibleModule) -> None:
        super().__init__()
        if not isinstance(block, InvertibleModule):
            raise ValueError(f"Inverted takes an InvertibleModule, got {type(block).__name__}")
        self.block = block
        self.ndim = block.ndim
        self.cond_channels = block.cond_channels

    def _check_shape(self, shape: Shape, c_shape: Optional[Shape], inverse: bool) -> Shape:
        return self.block.check_shape(shape, c_shape, not inverse)

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self.block._inverse(x, c)

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self.block._forward(y, c)

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        return self.block._vjp_inverse(y, dy, dlogdet, c, grads)

    def _vjp_inverse(
        self, x: Tensor, dx: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore
    ) -> VJPResult:
        return self.block._vjp(x, dx, dlogdet, c, grads)


class ChannelSubset(InvertibleModule):
    r"""Apply a block to the channels from ``skip`` on, and the identity to the first ``skip``:

    .. math:: y = (x_{:s},\ f(x_{s:})), \qquad \log|\det J| = \log|\det J_f(x_{s:})|.

    The block may change the space shape only if it restores it (it must return the shape it
    received, as a down-process-up branch of a U-Net does); the kept channels are the skip
    connection.

    Args:
        block: the block for the trailing channels.
        skip: number of leading channels passed through unchanged (1 or more).

    >>> import torch
    >>> from invnet.layers import ActNorm
    >>> sub = ChannelSubset(ActNorm(2), skip=1)
    >>> sub(torch.randn(2, 3, 4))[0].shape
    torch.Size([2, 3, 4])
    """

    def __init__(self, block: InvertibleModule, skip: int) -> None:
        super().__init__()
        if not isinstance(block, InvertibleModule):
            raise ValueError(f"ChannelSubset takes an InvertibleModule, got {type(block).__name__}")
        if skip < 1:
            raise ValueError(f"skip must be a positive channel count, got {skip}")
        self.block = block
        self.skip = skip
        self.ndim = block.ndim
        self.cond_channels = block.cond_channels

    def _check_shape(self, shape: Shape, c_shape: Optional[Shape], inverse: bool) -> Shape:
        if shape[1] <= self.skip:
            raise ValueError(
                f"ChannelSubset passes {self.skip} channels through and needs more than that, got {shape[1]}"
            )
        inner = (shape[0], shape[1] - self.skip) + tuple(shape[2:])
        out = self.block.check_shape(inner, c_shape, inverse)
        if tuple(out) != inner:
            raise ValueError(f"ChannelSubset's block must keep the shape {inner}, but it returns {tuple(out)}")
        return shape

    def _parts(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return t[:, : self.skip], t[:, self.skip:]

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        keep, rest = self._parts(x)
        out, logdet = self.block._forward(rest, c)
        return torch.cat([keep, out], dim=1), logdet

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        keep, rest = self._parts(y)
        out, logdet = self.block._inverse(rest, c)
        return torch.cat([keep, out], dim=1), logdet

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        keep, rest = self._parts(y)
        dkeep, drest = self._parts(dy)
        x, dx, dc = self.block._vjp(rest, drest, dlogdet, c, grads)
        return torch.cat([keep, x], dim=1), torch.cat([dkeep, dx], dim=1), dc

    def _vjp_inverse(
        self, x: Tensor, dx: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore
    ) -> VJPResult:
        keep, rest = self._parts(x)
        dkeep, drest = self._parts(dx)
        y, dy, dc = self.block._vjp_inverse(rest, drest, dlogdet, c, grads)
        return torch.cat([keep, y], dim=1), torch.cat([dkeep, dy], dim=1), dc
