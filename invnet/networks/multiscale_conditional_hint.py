"""Multiscale conditional HINT: both lanes squeezed and split scale by scale."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..core.module import GradStore, Shape, VJPResult
from .base import FlowNetwork
from .conditional_hint import conditional_x_step
from .multiscale import MultiscaleLevel
from .multiscale_flow import scale_widths
from .multiscale_hint import MultiscaleHINT

__all__ = ["MultiscaleConditionalHINT"]


class MultiscaleConditionalHINT(FlowNetwork):
    r"""Multiscale form of :class:`~invnet.networks.ConditionalHINT`: at every scale both lanes
    are squeezed, run ``depth`` lane steps, and factor out half their channels; the kept halves of
    both lanes go on to the next scale together.

    From "HINT: Hierarchical Invertible Neural Transport for Density Estimation and Bayesian
    Inference" (Kruse et al., 2021, arXiv:1905.10687), with the multiscale layout of
    InvertibleNetworks.jl's multiscale conditional HINT. With :math:`S` the squeeze, scale
    :math:`k` maps :math:`(x, y)` by

    .. math::
        X_0 = S x,\ Y_0 = S y, \quad X_{j+1} = F^x_j(X_j; Y_j),\ Y_{j+1} = F^y_j(Y_j), \\
        [a_x, b_x] = X_D,\ [a_y, b_y] = Y_D, \quad
        z_x = S^{-1}[\,\mathrm{inner}_x(a_x; a_y),\ b_x\,], \quad z_y = S^{-1}[\,\mathrm{inner}_y(a_y),\ b_y\,]

    The y-lane alone is a :class:`~invnet.networks.MultiscaleHINT` (``self.y_lane``), so
    :math:`z_y` does not depend on :math:`x`, the Jacobian is block triangular and ``forward(x,
    c=y)`` returns :math:`(z_x, \log|\det \partial z_x/\partial x|)`: :meth:`log_prob` is
    :math:`\log q(x \mid y)`. Both latents have the shapes of ``x`` and ``y``; cut :math:`z_x`
    into scales with :meth:`split_latent`.

    Memory: the backward of each scale runs that scale's y-steps forward once (no graph), lets the
    inner scale rebuild and differentiate, then walks the steps back, rebuilding both lanes.
    Nothing is kept per step.

    Args:
        channels: channels of ``x``; cond_channels: channels of ``y`` (same space shape as ``x``).
        hidden: hidden channels of every conditioner.
        levels: scales; space sizes must be divisible by ``2**levels``.
        depth: lane steps per scale.
        ndim: space dimensions 1 to 3 (0: vectors, channel splits without squeezes).
        squeeze: ``"haar"``, ``"checkerboard"`` or ``"patch"``.
        mixing, clamp, leaf_channels, **conditioner_kwargs: as :class:`~invnet.networks.HINT`.
        coupling: node transform of every HINT coupling, as :class:`~invnet.networks.ConditionalHINT`.

    >>> import torch
    >>> from invnet.networks import MultiscaleConditionalHINT
    >>> flow = MultiscaleConditionalHINT(1, 1, hidden=8, levels=2, depth=1, ndim=2)
    >>> x, y = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    >>> flow(x, y)[0].shape, flow.forward_y(y).shape, flow.sample(3, c=y[:1]).shape
    (torch.Size([2, 1, 8, 8]), torch.Size([2, 1, 8, 8]), torch.Size([3, 1, 8, 8]))
    """

    def __init__(
        self,
        channels: int,
        cond_channels: int,
        hidden: int = 64,
        levels: int = 3,
        depth: int = 4,
        ndim: int = 2,
        squeeze: Optional[str] = "haar",
        mixing: str = "householder",
        clamp: float = 2.0,
        leaf_channels: int = 3,
        coupling: str = "affine",
        **conditioner_kwargs,
    ) -> None:
        super().__init__()
        kw = dict(clamp=clamp, **conditioner_kwargs)
        # the y-lane alone: also validates levels, squeeze, mixing and the y channel counts
        self.y_lane = MultiscaleHINT(
            cond_channels, hidden, levels, depth, ndim, squeeze, mixing=mixing, leaf_channels=leaf_channels,
            coupling=coupling, **kw,
        )
        # the x-lane sizes at every scale (a single channel is allowed at the last: lane coupling only)
        factor = 2**ndim if self.y_lane.squeeze_kind is not None else 1
        widths, keeps = scale_widths(type(self).__name__, channels, levels, factor, min_last=1)
        self.channels = channels
        self.cond_channels = cond_channels
        self.ndim = ndim
        self.levels = levels
        self.depth = depth
        self.x_widths = tuple(widths)
        self.x_keeps = tuple(keeps)
        self.x_levels = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        conditional_x_step(widths[k], self.y_lane.widths[k], hidden, ndim, mixing, leaf_channels,
                                           1000 + 100 * k + j, coupling, **kw)
                        for j in range(depth)
                    ]
                )
                for k in range(levels)
            ]
        )
        if ndim == 0:
            self.data_shape = (channels,)

    def _check_shape(self, shape: Shape, c_shape: Optional[Shape], inverse: bool) -> Shape:
        shape = super()._check_shape(shape, c_shape, inverse)
        expected = (shape[0], self.cond_channels) + tuple(shape[2:])
        if c_shape is None or tuple(c_shape) != expected:
            raise ValueError(
                f"MultiscaleConditionalHINT needs the observation c=y of shape {expected} (batch and space of "
                f"x); got {None if c_shape is None else tuple(c_shape)} for x of shape {tuple(shape)}"
            )
        self.y_lane.check_shape(tuple(c_shape))  # divisibility by 2**levels
        return shape

    def _y_level(self, k: int) -> MultiscaleLevel:
        level = self.y_lane.body
        for _ in range(k):
            level = level.inner
        return level

    @staticmethod
    def _y_used(yl: MultiscaleLevel) -> int:
        # y-steps whose output reaches x: all of them when an inner scale takes the kept half of
        # the last y state, else the last one only shapes z_y (skipping it also keeps its forward
        # and inverse from cancelling in round-off)
        return len(yl.steps) if yl.inner is not None else len(yl.steps) - 1

    def _y_top(self, yl: MultiscaleLevel, c: Tensor) -> Tensor:
        for step in yl.steps.blocks[: self._y_used(yl)]:
            c, _ = step._forward(c, None)
        return c

    # -- recursion over scales (x: the x-lane, c: the observation lane, both at scale k) --------------
    def _fwd(self, k: int, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        yl = self._y_level(k)
        X, C = yl.down(x), yl.down(c)
        logdet = x.new_zeros(x.shape[0])
        used = self._y_used(yl)
        for j, (step_x, step_y) in enumerate(zip(self.x_levels[k], yl.steps.blocks)):
            X, ld = step_x._forward(X, C)
            logdet = logdet + ld
            if j < used:
                C, _ = step_y._forward(C, None)
        if yl.inner is not None:
            kx = self.x_keeps[k]
            a, ld = self._fwd(k + 1, X[:, :kx], C[:, : yl.keep])
            X = torch.cat([a, X[:, kx:]], dim=1)
            logdet = logdet + ld
        return yl.up(X), logdet

    def _inv(self, k: int, z: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        yl = self._y_level(k)
        X = yl.down(z)
        C = self._y_top(yl, yl.down(c))
        logdet = z.new_zeros(z.shape[0])
        if yl.inner is not None:
            kx = self.x_keeps[k]
            a, logdet = self._inv(k + 1, X[:, :kx], C[:, : yl.keep])
            X = torch.cat([a, X[:, kx:]], dim=1)
        used = self._y_used(yl)
        for j in reversed(range(self.depth)):
            if j < used:
                C, _ = yl.steps[j]._inverse(C, None)
            X, ld = self.x_levels[k][j]._inverse(X, C)
            logdet = logdet + ld
        return yl.up(X), logdet

    def _back(
        self, k: int, z: Tensor, dz: Tensor, dlogdet: Tensor, c: Tensor, grads: GradStore
    ) -> tuple[Tensor, Tensor, Tensor]:
        yl = self._y_level(k)
        X, dX = yl.down(z), yl.down(dz)
        C = self._y_top(yl, yl.down(c))
        dC = torch.zeros_like(C)
        if yl.inner is not None:
            kx = self.x_keeps[k]
            a, da, dca = self._back(k + 1, X[:, :kx], dX[:, :kx], dlogdet, C[:, : yl.keep], grads)
            X = torch.cat([a, X[:, kx:]], dim=1)
            dX = torch.cat([da, dX[:, kx:]], dim=1)
            dC = torch.cat([dca, dC[:, yl.keep :]], dim=1)
        no_logdet = torch.zeros_like(dlogdet)  # the y-lane's logdet is not part of log q(x|y)
        used = self._y_used(yl)
        for j in reversed(range(self.depth)):
            if j < used:
                C, dC, _ = yl.steps[j]._vjp(C, dC, no_logdet, None, grads)
            X, dX, dc_step = self.x_levels[k][j]._vjp(X, dX, dlogdet, C, grads)
            dC = dC + dc_step
        return yl.up(X), yl.up(dX), yl.up(dC)

    # -- contract -------------------------------------------------------------------------------------
    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self._fwd(0, x, c)

    def _inverse(self, z: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self._inv(0, z, c)

    def _vjp(self, z: Tensor, dz: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        return self._back(0, z, dz, dlogdet, c, grads)

    def forward_y(self, y: Tensor) -> Tensor:
        """:math:`z_y` (shape of ``y``): the observation lane alone."""
        return self.y_lane(y)[0]

    def joint_log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        """:math:`\\log q(x, y) = \\log q(x \\mid y) + \\log q_y(y)` per sample, in nats."""
        return self.log_prob(x, y) + self.y_lane.log_prob(y)

    def split_latent(self, z: Tensor) -> list[Tensor]:
        """Cut :math:`z_x` into per-scale parts, finest first (as :meth:`MultiscaleHINT.split_latent`)."""
        parts = []
        h = z
        for k in range(self.levels):
            h = self._y_level(k).down(h)
            if k == self.levels - 1:
                parts.append(h)
            else:
                parts.append(h[:, self.x_keeps[k] :])
                h = h[:, : self.x_keeps[k]]
        return parts
