"""A single-scale conditional coupling flow (RealNVP/Glow steps with a condition)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..core.chain import Chain
from ..core.module import GradStore
from ..layers import ActNorm, AffineCoupling, Conv1x1, Squeeze
from ..core.shapes import check_condition
from .base import FlowNetwork

__all__ = ["ConditionalCouplingFlow"]


class ConditionalCouplingFlow(FlowNetwork):
    r"""Conditional flow :math:`z = f(x; c)`: an optional space-to-depth squeeze of ``x`` (and of a
    spatial condition ``c`` alike, so the two stay aligned), then ``depth`` steps of
    ActNorm, invertible 1x1 convolution and affine coupling whose conditioner sees ``c``:

    .. math:: z = (g_K \circ \dots \circ g_1)(S x; S c),\qquad
        g_k = \mathrm{Coupling}_k(\cdot\,; S c) \circ \mathrm{Conv1x1}_k \circ \mathrm{ActNorm}_k

    Conditional density estimation with couplings follows "Guided Image Generation with
    Conditional Invertible Neural Networks" (Ardizzone et al., 2019, arXiv:1907.02392) on the
    Glow step (Kingma and Dhariwal, 2018, arXiv:1807.03039). The latent keeps the squeezed spatial
    layout ``(channels * 2^d, *space / 2)``. A vector condition ``(N, cond_channels)`` is broadcast
    over space. All convolutions are preceded by ``ZeroPad`` (distribution-ready).

    Args:
        channels: channels of ``x``.
        cond_channels: channels of ``c``.
        ndim: space dimensions (0 = vectors; then no squeeze and ``channels >= 2``).
        depth: number of steps.
        hidden: hidden channels of each conditioner.
        squeeze: squeeze before the steps (``ndim >= 1``; needs even space sizes).
        clamp: bound of the coupling log-scales.
        vector_condition: the condition is a vector ``(N, cond_channels)`` (e.g. a summary
            network's output) instead of a field with the space shape of ``x``.

    >>> import torch
    >>> flow = ConditionalCouplingFlow(1, 2, ndim=2, depth=2, hidden=8)
    >>> x, c = torch.randn(3, 1, 8, 8), torch.randn(3, 2, 8, 8)
    >>> z, logdet = flow(x, c)
    >>> z.shape, bool(torch.allclose(flow.inverse(z, c)[0], x, atol=1e-5)), flow.sample(4, c[:1]).shape
    (torch.Size([3, 4, 4, 4]), True, torch.Size([4, 1, 8, 8]))
    """

    def __init__(
        self, channels: int, cond_channels: int, ndim: int, depth: int = 4, hidden: int = 32,
        squeeze: bool = True, clamp: float = 2.0, vector_condition: bool = False,
    ) -> None:
        super().__init__()
        if ndim not in (0, 1, 2, 3):
            raise ValueError(f"ndim must be 0, 1, 2 or 3, got {ndim}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if cond_channels < 1:
            raise ValueError(f"cond_channels must be at least 1, got {cond_channels}")
        squeeze = bool(squeeze and ndim > 0)
        factor = 2**ndim if squeeze else 1
        inner, inner_c = channels * factor, cond_channels * (1 if vector_condition else factor)
        if inner < 2:
            raise ValueError(f"{channels} channel(s) without a squeeze cannot be split by a coupling; use channels >= 2 or squeeze")
        self.channels, self.cond_channels, self.ndim = channels, cond_channels, ndim
        self.vector_condition = bool(vector_condition)
        self.squeeze = Squeeze(ndim=ndim) if squeeze else None
        steps = []
        for k in range(depth):
            steps += [ActNorm(inner, ndim), Conv1x1(inner, ndim=ndim),
                      AffineCoupling(inner, hidden, ndim, cond_channels=inner_c, clamp=clamp, swap=bool(k % 2))]
        self.steps = Chain(*steps)

    # The condition is squeezed like x when it is a field; a vector condition passes unchanged.
    def _sq(self, t: Optional[Tensor]) -> Optional[Tensor]:
        if self.squeeze is None or t is None or t.dim() == 2:
            return t
        return self.squeeze.squeeze(t)

    def _unsq(self, t: Optional[Tensor], vector: bool) -> Optional[Tensor]:
        if self.squeeze is None or t is None or vector:
            return t
        return self.squeeze.unsqueeze(t)

    def _check_shape(self, shape, c_shape, inverse):
        if inverse:
            if self.squeeze is not None:
                shape = self.squeeze.check_shape(shape, None, inverse=True)
        elif shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__} expects {self.channels} channels, got shape {shape}")
        check_condition(type(self).__name__, shape, c_shape, self.cond_channels)
        if c_shape is not None and (len(c_shape) == 2) != (self.vector_condition or self.ndim == 0):
            kind = "a vector (N, C)" if self.vector_condition else "a field (N, C, *space)"
            raise ValueError(f"{type(self).__name__} was built for {kind} condition, got shape {tuple(c_shape)}")
        if self.squeeze is not None:
            out = self.squeeze.check_shape(shape, None, inverse=False)
            sq_c = c_shape if c_shape is None or len(c_shape) == 2 else self.squeeze.check_shape(tuple(c_shape), None, False)
            self.steps.check_shape(out, sq_c, inverse=False)
            return out if not inverse else shape
        self.steps.check_shape(shape, c_shape, inverse=False)
        return shape

    def _forward(self, x, c):
        return self.steps._forward(self._sq(x), self._sq(c))

    def _inverse(self, y, c):
        x, logdet = self.steps._inverse(y, self._sq(c))
        return self._unsq(x, False), logdet

    def _vjp(self, y, dy, dlogdet, c, grads: GradStore):
        x, dx, dc = self.steps._vjp(y, dy, dlogdet, self._sq(c), grads)
        return self._unsq(x, False), self._unsq(dx, False), self._unsq(dc, c is not None and c.dim() == 2)

