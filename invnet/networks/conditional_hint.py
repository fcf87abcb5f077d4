"""Conditional HINT: a joint flow over (x, y) with a y-lane and an x-lane conditioned on it."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.chain import Chain
from ..core.module import GradStore
from ..layers.actnorm import ActNorm
from ..layers.conditional_affine import ConditionalAffine
from ..layers.conditioners import PadFactory
from ..layers.hint import HINTCoupling
from .base import FlowNetwork
from .hint import _channel_mixing, _check_common, hint_step

__all__ = ["ConditionalHINT", "conditional_x_step"]


def conditional_x_step(
    channels: int,
    cond_channels: int,
    hidden: int,
    ndim: int,
    mixing: str = "householder",
    leaf_channels: int = 3,
    seed: int = 0,
    **kwargs,
) -> Chain:
    r"""One x-lane step of a conditional HINT ("HINT", Kruse et al., 2021, arXiv:1905.10687):
    :math:`X(x; c) = T(L(W A x; c); c)` with ActNorm :math:`A`, mixing :math:`W`, the lane coupling
    :math:`L(u; c) = u \odot e^{s(c)} + t(c)` (:class:`~invnet.layers.ConditionalAffine`) and a
    :class:`~invnet.layers.HINTCoupling` :math:`T` whose every conditioner is fed ``c`` (the y-lane
    state). Mixing and HINT coupling are left out for a single channel. ``kwargs``: ``clamp``,
    ``pad`` and conditioner options.

    >>> import torch
    >>> step = conditional_x_step(3, 2, hidden=8, ndim=0)
    >>> step(torch.randn(4, 3), torch.randn(4, 2))[0].shape
    torch.Size([4, 3])
    """
    blocks = [ActNorm(channels, ndim=ndim)]
    if channels >= 2:
        blocks.append(_channel_mixing(channels, mixing, ndim, seed=seed))
    blocks.append(ConditionalAffine(channels, cond_channels, hidden, ndim, **kwargs))
    if channels >= 2:
        blocks.append(HINTCoupling(channels, hidden, ndim, cond_channels, leaf_channels=leaf_channels, seed=seed, **kwargs))
    return Chain(*blocks)


class ConditionalHINT(FlowNetwork):
    r"""Conditional HINT: a joint invertible map :math:`(x, y) \mapsto (z_x, z_y)` built of two
    lanes, so that the observation lane alone maps :math:`y` to :math:`z_y` and the parameter lane
    is conditioned on it.

    From "HINT: Hierarchical Invertible Neural Transport for Density Estimation and Bayesian
    Inference" (Kruse, Detommaso, Köthe, Scheichl, 2021, arXiv:1905.10687), with the lane layout
    of InvertibleNetworks.jl's conditional HINT. With :math:`y_0 = y` and steps
    :math:`k = 1..K`:

    .. math::
        x_k = X_k(x_{k-1}; y_{k-1}), \qquad y_k = Y_k(y_{k-1}), \qquad z_x = x_K,\ z_y = y_K

    where :math:`Y_k` = ActNorm, mixing, :class:`~invnet.layers.HINTCoupling` (unconditional)
    and :math:`X_k` = ActNorm, mixing, :class:`~invnet.layers.ConditionalAffine` (all of
    :math:`x` scaled and shifted by :math:`y_{k-1}`: the lane coupling of Kruse et al.), then a
    HINTCoupling whose every conditioner also sees :math:`y_{k-1}`. The Jacobian is block
    triangular (:math:`z_y` does not depend on :math:`x`), hence

    .. math::
        \log q(x \mid y) = \log \mathcal N(z_x; 0, I) + \log|\det \partial z_x / \partial x|, \qquad
        \log q(x, y) = \log q(x \mid y) + \log \mathcal N(z_y; 0, I) + \log|\det \partial z_y / \partial y|.

    As a block, ``forward(x, c=y)`` returns :math:`(z_x, \log|\det \partial z_x/\partial x|)`, so
    :meth:`log_prob` is the conditional density, gradients reach ``y`` through ``dc``, and
    ``sample(n, c=y)`` draws from the posterior by inverting the x-lane with the y-lane fixed.
    :meth:`forward_y` gives :math:`z_y`; :meth:`joint_log_prob` the joint density.

    Memory: the hand-written backward runs the y-lane forward once (no graph) to :math:`y_{K-1}`,
    then walks both lanes back together, rebuilding :math:`x_{k-1}` and :math:`y_{k-1}` from
    :math:`x_k, y_k`; the y-lane cotangent collects every x-step's ``dc``. Nothing grows with
    depth. (The inverse map's backward, used only for reverse-KL training through samples, falls
    back to re-running the inverse under autograd.)

    Args:
        channels: channels of ``x`` (1 or more; with 1 the x-lane has no HINT coupling).
        cond_channels: channels of ``y`` (1 or more); ``y`` has the space shape of ``x``
            (vectors when ``ndim == 0``).
        hidden: hidden channels of every conditioner.
        depth: number of steps :math:`K`.
        ndim: space dimensions 0 to 3.
        mixing, clamp, leaf_channels, pad, **conditioner_kwargs: as :class:`~invnet.networks.HINT`.

    >>> import torch
    >>> from invnet.networks import ConditionalHINT
    >>> flow = ConditionalHINT(3, cond_channels=2, hidden=16, depth=2, ndim=0)
    >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
    >>> flow.log_prob(x, c=y).shape, flow.forward_y(y).shape
    (torch.Size([8]), torch.Size([8, 2]))
    >>> flow.sample(5, c=y[:1], temperature=0.8).shape
    torch.Size([5, 3])
    """

    def __init__(
        self,
        channels: int,
        cond_channels: int,
        hidden: int = 64,
        depth: int = 4,
        ndim: int = 2,
        mixing: str = "householder",
        clamp: float = 2.0,
        leaf_channels: int = 3,
        pad: Optional[PadFactory] = None,
        **conditioner_kwargs,
    ) -> None:
        super().__init__()
        _check_common(channels, hidden, depth, ndim, mixing, min_channels=1)
        if cond_channels < 1:
            raise ValueError(f"ConditionalHINT needs cond_channels >= 1 (the channels of y), got {cond_channels}")
        self.channels = channels
        self.cond_channels = cond_channels
        self.ndim = ndim
        self.depth = depth
        kw = dict(clamp=clamp, pad=pad, **conditioner_kwargs)

        def y_step(k: int) -> Chain:
            if cond_channels < 2:
                return Chain(ActNorm(1, ndim=ndim))
            return hint_step(cond_channels, hidden, ndim, 0, mixing, leaf_channels=leaf_channels, seed=k, **kw)

        #: the observation lane alone: ``y_lane(y) -> (z_y, log|det dz_y/dy|)``
        self.y_lane = Chain(*[y_step(k) for k in range(depth)])
        self.x_steps = torch.nn.ModuleList(
            [conditional_x_step(channels, cond_channels, hidden, ndim, mixing, leaf_channels, 1000 + k, **kw)
             for k in range(depth)]
        )
        if ndim == 0:
            self.data_shape = (channels,)

    def _check_shape(self, shape, c_shape, inverse):
        shape = super()._check_shape(shape, c_shape, inverse)
        expected = (shape[0], self.cond_channels) + tuple(shape[2:])
        if c_shape is None:
            raise ValueError(f"ConditionalHINT needs the observation c=y of shape {expected}")
        if tuple(c_shape) != expected:
            raise ValueError(
                f"ConditionalHINT: the observation c=y must have shape {expected} (batch and space of x, "
                f"{self.cond_channels} channels); got {tuple(c_shape)} for x of shape {tuple(shape)}"
            )
        return shape

    # -- y-lane helpers ---------------------------------------------------------------------------
    def _y_before_last_step(self, y: Tensor) -> Tensor:
        # y_{K-1}: the y-lane state that conditions the last x-step
        for step in self.y_lane.blocks[: self.depth - 1]:
            y, _ = step._forward(y, None)
        return y

    # -- contract ---------------------------------------------------------------------------------
    def _forward(self, x, c):
        logdet = x.new_zeros(x.shape[0])
        y = c
        for k, step in enumerate(self.x_steps):
            x, ld = step._forward(x, y)
            logdet = logdet + ld
            if k < self.depth - 1:
                y, _ = self.y_lane.blocks[k]._forward(y, None)
        return x, logdet

    def _inverse(self, z, c):
        y = self._y_before_last_step(c)
        logdet = z.new_zeros(z.shape[0])
        x = z
        for k in reversed(range(self.depth)):
            x, ld = self.x_steps[k]._inverse(x, y)
            logdet = logdet + ld
            if k > 0:
                y, _ = self.y_lane.blocks[k - 1]._inverse(y, None)
        return x, logdet

    def _vjp(self, z, dz, dlogdet, c, grads: GradStore):
        y = self._y_before_last_step(c)
        dy = torch.zeros_like(y)
        no_logdet = torch.zeros_like(dlogdet)  # the y-lane's logdet is not part of log q(x|y)
        x, dx = z, dz
        for k in reversed(range(self.depth)):
            x, dx, dc = self.x_steps[k]._vjp(x, dx, dlogdet, y, grads)
            dy = dy + dc
            if k > 0:
                y, dy, _ = self.y_lane.blocks[k - 1]._vjp(y, dy, no_logdet, None, grads)
        return x, dx, dy

    # -- the y-lane and the joint density ---------------------------------------------------------
    def forward_y(self, y: Tensor) -> Tensor:
        """:math:`z_y`: the observation lane alone (memory-free when grad is on)."""
        return self.y_lane(y)[0]

    def joint_log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        r""":math:`\log q(x, y) = \log q(x \mid y) + \log \mathcal N(z_y) + \log|\det \partial z_y/\partial y|`
        per sample, in nats."""
        z_y, logdet_y = self.y_lane(y)
        return self.log_prob(x, y) + self.base.log_prob(z_y) + logdet_y
