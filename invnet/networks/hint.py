"""HINT: a stack of (ActNorm, channel mixing, recursive HINT coupling) steps at one scale."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..core.chain import Chain
from ..core.module import GradStore, InvertibleModule
from ..core.shapes import check_condition
from ..layers.actnorm import ActNorm
from ..layers.conditioners import PadFactory
from ..layers.conv1x1 import ChannelPermutation, Conv1x1
from ..layers.hint import HINTCoupling
from .base import FlowNetwork

__all__ = ["HINT", "hint_step", "MIXINGS"]

#: channel mixings between steps: learned 1x1 convolutions, or a fixed random permutation
MIXINGS = ("householder", "lu", "permutation")


def _channel_mixing(channels: int, mixing: str, ndim: int, seed: int) -> InvertibleModule:
    """The mixing block between steps: ``Conv1x1`` (``"householder"`` or ``"lu"``) or a fixed
    random ``ChannelPermutation`` (``"permutation"``)."""
    if mixing == "permutation":
        return ChannelPermutation(channels, kind="random", seed=seed, ndim=ndim)
    return Conv1x1(channels, parametrization=mixing, ndim=ndim)


def _check_common(channels: int, hidden: int, depth: int, ndim: int, mixing: str, min_channels: int = 2) -> None:
    """Argument checks shared by the HINT networks (raise ``ValueError``)."""
    if channels < min_channels:
        raise ValueError(f"this HINT network needs at least {min_channels} channel(s), got {channels}")
    if hidden < 1:
        raise ValueError(f"hidden must be a positive channel count, got {hidden}")
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    if ndim not in (0, 1, 2, 3):
        raise ValueError(f"ndim must be 0, 1, 2 or 3, got {ndim}")
    if mixing not in MIXINGS:
        raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")


def hint_step(
    channels: int,
    hidden: int,
    ndim: int,
    cond_channels: int = 0,
    mixing: str = "householder",
    clamp: float = 2.0,
    leaf_channels: int = 3,
    seed: int = 0,
    pad: Optional[PadFactory] = None,
    **conditioner_kwargs,
) -> Chain:
    r"""One HINT step, :math:`T \circ W \circ A`: ``Chain(ActNorm, mixing, HINTCoupling)`` (see
    :class:`HINT`; "HINT", Kruse et al., 2021, arXiv:1905.10687). Arguments as :class:`HINT`;
    ``seed`` fixes the step's permutations.

    >>> import torch
    >>> step = hint_step(4, hidden=8, ndim=1)
    >>> step(torch.randn(3, 4, 6))[0].shape
    torch.Size([3, 4, 6])
    """
    return Chain(
        ActNorm(channels, ndim=ndim),
        _channel_mixing(channels, mixing, ndim, seed),
        HINTCoupling(
            channels, hidden, ndim, cond_channels, clamp=clamp, leaf_channels=leaf_channels, seed=seed, pad=pad,
            **conditioner_kwargs,
        ),
    )


class HINT(FlowNetwork):
    r"""HINT network at one scale: ``depth`` steps of ActNorm, channel mixing and a recursive
    :class:`~invnet.layers.HINTCoupling`, with a standard normal latent of the shape of ``x``.

    From "HINT: Hierarchical Invertible Neural Transport for Density Estimation and Bayesian
    Inference" (Kruse, Detommaso, Köthe, Scheichl, 2021, arXiv:1905.10687); ActNorm and 1x1
    mixing from "Glow" (Kingma and Dhariwal, 2018, arXiv:1807.03039).

    .. math::
        z = f(x; c) = (T_K \circ W_K \circ A_K) \circ \dots \circ (T_1 \circ W_1 \circ A_1)(x), \qquad
        \log q(x \mid c) = \log \mathcal N(z; 0, I) + \textstyle\sum_k \log|\det J_k|

    Args:
        channels: channels of ``x`` (2 or more, odd allowed).
        hidden: hidden channels of every conditioner.
        depth: number of steps.
        ndim: space dimensions, 0 (vectors) to 3.
        cond_channels: channels of an optional condition ``c`` (field of the space shape of ``x``,
            or a vector broadcast over space) fed to every conditioner.
        mixing: ``"householder"`` / ``"lu"`` (learned :class:`~invnet.layers.Conv1x1`) or
            ``"permutation"`` (fixed random :class:`~invnet.layers.ChannelPermutation`).
        clamp: bound on the log-scales of all couplings.
        leaf_channels: channel count at which the HINT recursion stops.
        pad: padding factory for the convolutional conditioners.
        **conditioner_kwargs: passed to every conditioner.

    Latent: ``z`` has the shape of ``x``. The backward is memory-free: steps rebuild their input
    from their output one at a time.

    >>> import torch
    >>> from invnet.networks import HINT
    >>> flow = HINT(3, hidden=16, depth=2, ndim=0)
    >>> x = torch.randn(8, 3)
    >>> flow.log_prob(x).shape, flow.sample(5).shape
    (torch.Size([8]), torch.Size([5, 3]))
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        depth: int = 4,
        ndim: int = 2,
        cond_channels: int = 0,
        mixing: str = "householder",
        clamp: float = 2.0,
        leaf_channels: int = 3,
        pad: Optional[PadFactory] = None,
        **conditioner_kwargs,
    ) -> None:
        super().__init__()
        _check_common(channels, hidden, depth, ndim, mixing)
        if cond_channels < 0:
            raise ValueError(f"cond_channels must be >= 0, got {cond_channels}")
        self.channels = channels
        self.ndim = ndim
        self.cond_channels = cond_channels
        self.flow = Chain(
            *[
                hint_step(channels, hidden, ndim, cond_channels, mixing, clamp, leaf_channels, k, pad,
                          **conditioner_kwargs)
                for k in range(depth)
            ]
        )
        if ndim == 0:
            self.data_shape = (channels,)

    def _check_shape(self, shape, c_shape, inverse):
        shape = super()._check_shape(shape, c_shape, inverse)
        check_condition(type(self).__name__, shape, c_shape, self.cond_channels)
        return shape

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self.flow._forward(x, c)

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self.flow._inverse(y, c)

    def _vjp(self, y, dy, dlogdet, c, grads: GradStore):
        return self.flow._vjp(y, dy, dlogdet, c, grads)

    def _vjp_inverse(self, x, dx, dlogdet, c, grads: GradStore):
        return self.flow._vjp_inverse(x, dx, dlogdet, c, grads)


