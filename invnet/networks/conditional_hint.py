"""Conditional HINT: a joint flow over (x, y) with an observation lane (y) and an x-lane
conditioned on it."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.chain import Chain
from ..core.module import GradStore, Shape, VJPResult
from ..layers.actnorm import ActNorm
from ..layers.conditional_affine import ConditionalAffine
from ..layers.hint import HINTCoupling
from .base import FlowNetwork
from .hint import HINTStep, channel_mixing, hint_step
from .multiscale_flow import check_scales

__all__ = ["ConditionalHINT", "conditional_x_step"]


def conditional_x_step(
    channels: int,
    cond_channels: int,
    hidden: int,
    ndim: int,
    mixing: str = "householder",
    leaf_channels: int = 3,
    seed: int = 0,
    coupling: str = "affine",
    **kwargs,
) -> Chain:
    r"""One x-lane step of a conditional HINT ("HINT", Kruse et al., 2021, arXiv:1905.10687):
    :math:`X(x; c) = T(L(W A x; c); c)` with ActNorm :math:`A`, mixing :math:`W`, the lane coupling
    :math:`L(u; c) = u \odot e^{s(c)} + t(c)` (:class:`~invnet.layers.ConditionalAffine`, always
    affine) and a :class:`~invnet.layers.HINTCoupling` :math:`T` of the given ``coupling`` kind
    whose every conditioner is fed ``c`` (the observation lane's state). Mixing and HINT coupling
    are left out for a single channel. ``kwargs``: ``clamp`` and conditioner options.

    >>> import torch
    >>> step = conditional_x_step(3, 2, hidden=8, ndim=0)
    >>> step(torch.randn(4, 3), torch.randn(4, 2))[0].shape
    torch.Size([4, 3])
    """
    blocks = [ActNorm(channels, ndim=ndim)]
    if channels >= 2:
        blocks.append(channel_mixing(channels, mixing, ndim, seed=seed))
    blocks.append(ConditionalAffine(channels, cond_channels, hidden, ndim, **kwargs))
    if channels >= 2:
        blocks.append(HINTCoupling(channels, hidden, ndim, cond_channels, leaf_channels=leaf_channels, seed=seed,
                                   coupling=coupling, **kwargs))
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

    As a block, ``forward(x, c=y)`` returns :math:`(z_x, \log|\det \partial z_x/\partial x|)`: the
    observation is the flow's condition ``c`` (the glossary of ``docs/architecture.md``), so
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
        mixing, clamp, leaf_channels, **conditioner_kwargs: as :class:`~invnet.networks.HINT`.
        coupling: the node transform of every HINT coupling (both lanes), ``"affine"`` (default)
            or ``"additive"``; the lane coupling :class:`~invnet.layers.ConditionalAffine` stays
            affine (it is the paper's link between the lanes, not a split coupling).

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
        coupling: str = "affine",
        **conditioner_kwargs,
    ) -> None:
        super().__init__()
        check_scales(type(self).__name__, ndim, 1, depth)
        HINTStep(hidden, mixing, clamp, leaf_channels, coupling)  # validates the step options
        if channels < 1 or cond_channels < 1:
            raise ValueError(
                f"ConditionalHINT needs channels >= 1 and cond_channels >= 1 (the channels of x and y), got "
                f"{channels} and {cond_channels}"
            )
        self.channels = channels
        self.cond_channels = cond_channels
        self.ndim = ndim
        self.depth = depth
        kw = dict(clamp=clamp, **conditioner_kwargs)

        def y_step(k: int) -> Chain:
            if cond_channels < 2:
                return Chain(ActNorm(1, ndim=ndim))
            return hint_step(cond_channels, hidden, ndim, 0, mixing, leaf_channels=leaf_channels, seed=k,
                             coupling=coupling, **kw)

        #: the observation lane alone: ``y_lane(y) -> (z_y, log|det dz_y/dy|)``
        self.y_lane = Chain(*[y_step(k) for k in range(depth)])
        self.x_steps = torch.nn.ModuleList(
            [conditional_x_step(channels, cond_channels, hidden, ndim, mixing, leaf_channels, 1000 + k, coupling, **kw)
             for k in range(depth)]
        )
        if ndim == 0:
            self.data_shape = (channels,)

    def _check_shape(self, shape: Shape, c_shape: Optional[Shape], inverse: bool) -> Shape:
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

    # -- the observation lane: its states c_k (c_0 = c = y) condition the x-steps ---------------
    def _lane_before_last_step(self, c: Tensor) -> Tensor:
        # c_{K-1}: the lane state that conditions the last x-step
        for step in self.y_lane.blocks[: self.depth - 1]:
            c, _ = step._forward(c, None)
        return c

    # -- contract ---------------------------------------------------------------------------------
    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for k, step in enumerate(self.x_steps):
            x, ld = step._forward(x, c)
            logdet = logdet + ld
            if k < self.depth - 1:
                c, _ = self.y_lane.blocks[k]._forward(c, None)
        return x, logdet

    def _inverse(self, z: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        c = self._lane_before_last_step(c)
        logdet = z.new_zeros(z.shape[0])
        x = z
        for k in reversed(range(self.depth)):
            x, ld = self.x_steps[k]._inverse(x, c)
            logdet = logdet + ld
            if k > 0:
                c, _ = self.y_lane.blocks[k - 1]._inverse(c, None)
        return x, logdet

    def _vjp(self, z: Tensor, dz: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        c = self._lane_before_last_step(c)
        dc = torch.zeros_like(c)
        no_logdet = torch.zeros_like(dlogdet)  # the lane's own logdet is not part of log q(x|y)
        x, dx = z, dz
        for k in reversed(range(self.depth)):
            x, dx, dc_step = self.x_steps[k]._vjp(x, dx, dlogdet, c, grads)
            dc = dc + dc_step
            if k > 0:
                c, dc, _ = self.y_lane.blocks[k - 1]._vjp(c, dc, no_logdet, None, grads)
        return x, dx, dc

    # -- the y-lane and the joint density ---------------------------------------------------------
    def forward_y(self, y: Tensor) -> Tensor:
        """:math:`z_y`: the observation lane alone (memory-free when grad is on)."""
        return self.y_lane(y)[0]

    def joint_log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        r""":math:`\log q(x, y) = \log q(x \mid y) + \log \mathcal N(z_y) + \log|\det \partial z_y/\partial y|`
        per sample, in nats."""
        z_y, logdet_y = self.y_lane(y)
        return self.log_prob(x, y) + self.base.log_prob(z_y) + logdet_y
