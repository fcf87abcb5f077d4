"""Learned iterative reconstruction with the physics in the loop (invertible RIM)."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..core.chain import Chain
from ..layers.irim import IRIMCoupling
from ..operators import as_operator

__all__ = ["LearnedLoop"]


class LearnedLoop(Chain):
    r"""An unrolled, invertible iterative reconstruction: ``iterations`` :class:`~invnet.layers.IRIMCoupling`
    steps, each seeing the misfit gradient :math:`A^T(Ax_k - y)` of the current estimate.

    From "Invert to Learn to Invert" (Putzky and Welling, 2019, arXiv:1911.10914):

    .. math::
        s_0 = (x_0, 0), \qquad s_{k+1} = \Phi_k(s_k;\ y), \qquad \hat x = \text{first } e
        \text{ channels of } s_K,

    with every :math:`\Phi_k` invertible, so the memory-free backward keeps only :math:`s_K`:
    training memory does not grow with the number of iterations (each step is rebuilt from the
    next one during the backward pass). ``logdet`` is the sum of the steps' memory log-scales.

    Args:
        operator: the forward operator (see :func:`invnet.operators.as_operator`); its
            ``domain_shape`` ``(e, *space)`` gives the estimate channels and space shape.
        channels: state channels (``e`` estimate channels plus memory).
        iterations: number of unrolled steps.
        hidden: hidden channels of the conditioners.
        share_weights: use one step's weights for every iteration (a recurrent machine) instead
            of separate weights per iteration.
        clamp, **conditioner_kwargs: passed to :class:`~invnet.layers.IRIMCoupling`.

    >>> import torch
    >>> from invnet.operators import as_operator
    >>> op = as_operator(torch.randn(12, 16) / 4, domain_shape=(1, 4, 4))
    >>> loop = LearnedLoop(op, channels=4, iterations=3, hidden=8)
    >>> y = torch.randn(2, 12)
    >>> loop.reconstruct(y).shape
    torch.Size([2, 1, 4, 4])
    """

    def __init__(
        self,
        operator: Any,
        channels: int,
        iterations: int,
        hidden: int = 32,
        share_weights: bool = False,
        clamp: float = 2.0,
        **conditioner_kwargs,
    ) -> None:
        if iterations < 1:
            raise ValueError(f"iterations must be a positive count, got {iterations}")
        op = as_operator(operator)

        def step() -> IRIMCoupling:
            return IRIMCoupling(op, channels, hidden=hidden, clamp=clamp, **conditioner_kwargs)

        if share_weights:
            one = step()
            steps = [one] * iterations
        else:
            steps = [step() for _ in range(iterations)]
        super().__init__(*steps)
        self.operator = op
        self.channels = channels
        self.ndim = len(op.domain_shape) - 1
        self.n_est = op.domain_shape[0]
        self.iterations = iterations

    def initial_state(self, y: Tensor, x0: Optional[Tensor] = None) -> Tensor:
        """The starting state ``(x0, 0)``: ``x0`` (default zero, shape ``(N, *domain_shape)``)
        and zero memory."""
        expected = (y.shape[0],) + self.operator.range_shape
        if tuple(y.shape) != expected:
            raise ValueError(f"the observation y must have shape {expected}, got {tuple(y.shape)}")
        n = y.shape[0]
        space = self.operator.domain_shape[1:]
        if x0 is None:
            x0 = y.new_zeros((n,) + self.operator.domain_shape)
        elif tuple(x0.shape) != (n,) + self.operator.domain_shape:
            raise ValueError(f"x0 must have shape {(n,) + self.operator.domain_shape}, got {tuple(x0.shape)}")
        memory = y.new_zeros((n, self.channels - self.n_est) + tuple(space))
        return torch.cat([x0.to(y), memory], dim=1)

    def estimate(self, state: Tensor) -> Tensor:
        """The estimate part (first ``e`` channels) of a state."""
        return state[:, : self.n_est]

    def reconstruct(self, y: Tensor, x0: Optional[Tensor] = None) -> Tensor:
        """Run the loop from :meth:`initial_state` and return the final estimate
        (differentiable; memory-free when :func:`invnet.memory_saving` is on)."""
        state, _ = self(self.initial_state(y, x0), y)
        return self.estimate(state)
