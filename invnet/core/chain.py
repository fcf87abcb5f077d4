"""A sequence of invertible blocks that is itself an invertible block."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .budget import unit_forward, unit_vjp
from .module import GradStore, InvertibleModule, Shape, VJPResult, add_optional

__all__ = ["Chain"]


class Chain(InvertibleModule):
    r"""Composition :math:`f = f_K \circ \dots \circ f_1` of invertible blocks.

    .. math::
        \log|\det J_f(x)| = \sum_k \log|\det J_{f_k}(x_{k-1})|, \qquad x_k = f_k(x_{k-1}).

    The backward walks the blocks in reverse: block ``k`` rebuilds ``x_{k-1}`` from ``x_k`` and
    propagates the cotangent, after which ``x_k`` is dropped, so at most one rebuilt input (plus
    one block's local work) is alive at a time. The condition ``c`` is handed to every block;
    blocks without a condition ignore it. Its cotangent is the sum over blocks.

    Under :func:`~invnet.memory_budget` the blocks that are not themselves chains are the units of
    the plan: each either keeps its activations (ordinary autograd) or is recomputed
    (:mod:`invnet.core.budget`).

    Args:
        *blocks: invertible blocks, applied in order.

    >>> import torch, invnet
    >>> from invnet.layers import ActNorm, AffineCoupling, Conv1x1
    >>> flow = invnet.Chain(ActNorm(4), Conv1x1(4), AffineCoupling(4, hidden=8, ndim=2))
    >>> x = torch.randn(2, 4, 8, 8)
    >>> y, logdet = flow(x)
    >>> x_rec, logdet_inv = flow.inverse(y)
    >>> bool(torch.allclose(x, x_rec, atol=1e-5)), bool(torch.allclose(logdet, -logdet_inv, atol=1e-4))
    (True, True)
    """

    def __init__(self, *blocks: InvertibleModule) -> None:
        super().__init__()
        for i, b in enumerate(blocks):
            if not isinstance(b, InvertibleModule):
                raise ValueError(f"Chain takes InvertibleModule blocks; block {i} is {type(b).__name__}")
        self.blocks = nn.ModuleList(blocks)
        self.cond_channels = max([b.cond_channels for b in blocks], default=0)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> InvertibleModule:
        return self.blocks[i]

    def _check_shape(self, shape: Shape, c_shape: Optional[Shape], inverse: bool) -> Shape:
        order = reversed(self.blocks) if inverse else self.blocks
        for b in order:
            shape = b.check_shape(shape, c_shape, inverse)
        return shape

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self._walk(x, c, inverse=False, follows=False)

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self._walk(y, c, inverse=True, follows=False)

    def _walk(self, x: Tensor, c: Optional[Tensor], inverse: bool, follows: bool) -> tuple[Tensor, Tensor]:
        # ``follows``: the first block takes the previous block's output directly, and its backward
        # hands its cotangent straight back (true inside a chain, unknown for a network's own
        # code): only then may a memory budget record the two as one autograd graph
        logdet = x.new_zeros(x.shape[0])
        for i, b in enumerate(reversed(self.blocks) if inverse else self.blocks):
            adjacent = follows or i > 0
            if isinstance(b, Chain):
                x, ld = b._walk(x, c, inverse, adjacent)
            else:
                x, ld = unit_forward(b, x, c, inverse, follows=adjacent)
            logdet = logdet + ld
        return x, logdet

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        dc = None
        for b in reversed(self.blocks):
            if isinstance(b, Chain):
                y, dy, dc_b = b._vjp(y, dy, dlogdet, c, grads)
            else:
                y, dy, dc_b = unit_vjp(b, y, dy, dlogdet, c, grads, inverse=False)
            dc = add_optional(dc, dc_b)
        return y, dy, dc

    def _vjp_inverse(
        self, x: Tensor, dx: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore
    ) -> VJPResult:
        dc = None
        for b in self.blocks:
            if isinstance(b, Chain):
                x, dx, dc_b = b._vjp_inverse(x, dx, dlogdet, c, grads)
            else:
                x, dx, dc_b = unit_vjp(b, x, dx, dlogdet, c, grads, inverse=True)
            dc = add_optional(dc, dc_b)
        return x, dx, dc
