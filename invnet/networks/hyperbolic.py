"""Fully hyperbolic network: stages of leapfrog layers with Haar squeezes between them."""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.chain import Chain
from ..core.module import InvertibleModule
from ..layers.hyperbolic import HyperbolicLayer
from ..layers.squeeze import HaarSqueeze

__all__ = ["Hyperbolic"]


class Hyperbolic(Chain):
    r"""A fully hyperbolic (leapfrog) invertible network.

    From "Fully Hyperbolic Convolutional Neural Networks" (Lensink, Peters and Haber, 2019/2022,
    arXiv:1905.10484). The input is a pair of states :math:`(u_{-1}, u_0)` stacked along channels
    (``2 C`` channels; :meth:`pair` makes the common start :math:`u_{-1} = u_0`). ``stages``
    stages of ``layers`` :class:`~invnet.layers.HyperbolicLayer` steps follow one another; between
    stages an orthonormal :class:`~invnet.layers.HaarSqueeze` halves every space size and
    multiplies the channels by :math:`2^d` (so the pair layout is kept: the first half of the
    channels still comes from :math:`u_{j-1}`). Every piece is volume preserving, so
    :math:`\log|\det J| = 0`; the output ``(u_{K-1}, u_K)`` is the final pair.

    Memory does not grow with depth under the memory-free backward (each leapfrog step is run
    backwards in time to rebuild its input).

    Args:
        channels: channels of the pair (even).
        ndim: space dimensions (1 to 3 with ``stages > 1``; 0 to 3 otherwise).
        layers: leapfrog steps per stage.
        stages: number of stages (``stages - 1`` Haar squeezes; space sizes must be divisible by
            ``2^(stages - 1)``).
        hidden: channels of :math:`K u` in the first stage, doubled at each later stage.
        step: the time step :math:`h`.
        kernel_size, activation: see :class:`~invnet.layers.HyperbolicLayer`.

    >>> import torch
    >>> net = Hyperbolic(channels=2, ndim=2, layers=2, stages=2, hidden=4)
    >>> x = Hyperbolic.pair(torch.randn(3, 1, 8, 8))
    >>> y, logdet = net(x)
    >>> y.shape, bool(torch.allclose(net.inverse(y)[0], x, atol=1e-5))
    (torch.Size([3, 8, 4, 4]), True)
    """

    def __init__(
        self,
        channels: int,
        ndim: int = 2,
        layers: int = 4,
        stages: int = 1,
        hidden: int = 16,
        step: float = 0.5,
        kernel_size: int = 3,
        activation: str = "tanh",
    ) -> None:
        if layers < 1 or stages < 1:
            raise ValueError(f"layers and stages must be positive counts, got {layers} and {stages}")
        if stages > 1 and ndim not in (1, 2, 3):
            raise ValueError(f"Haar squeezes between stages need 1 to 3 space dimensions, got ndim={ndim}")
        blocks: list[InvertibleModule] = []
        c = channels
        for s in range(stages):
            if s:
                blocks.append(HaarSqueeze(ndim=ndim))
                c *= 2**ndim
            for _ in range(layers):
                blocks.append(HyperbolicLayer(c, hidden * 2**s, ndim, step, kernel_size, activation))
        super().__init__(*blocks)
        self.channels = channels
        self.ndim = ndim

    @staticmethod
    def pair(u: Tensor) -> Tensor:
        """The starting pair :math:`(u_{-1}, u_0) = (u, u)`, stacked along channels."""
        return torch.cat([u, u], dim=1)
