"""The multiscale level: a shape-preserving block that squeezes, runs flow steps, factors out
part of the channels and recurses on the rest (the multiscale architecture of Real NVP / Glow)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.module import GradStore, InvertibleModule, Shape, VJPResult, add_optional
from ..layers.squeeze import SqueezeBase

__all__ = ["MultiscaleLevel"]


class MultiscaleLevel(InvertibleModule):
    r"""One scale of a multiscale flow, written as a block that keeps the shape of its input:

    .. math::
        (a, b) = \mathrm{split}_k\big(F(S x;\, S c)\big), \qquad
        \mathrm{Level}(x; c) = S^{-1}\,\mathrm{cat}\big(G(a;\, S c),\ b\big)

    with :math:`S` a squeeze (space to depth; the identity for vectors), :math:`F` the flow steps
    of this scale, :math:`\mathrm{split}_k` the first :math:`k` channels (``keep``) against the
    rest, and :math:`G` the next, coarser level (or nothing at the last scale, where
    :math:`\mathrm{Level}(x) = S^{-1} F(S x)`). The factored-out channels :math:`b` are this
    scale's latent; putting them back in place with :math:`S^{-1}` makes the whole multiscale
    network map ``x`` to a latent of the *same shape*, whose layout stays spatially local (each
    latent entry sits where its data came from), as "Density estimation using Real NVP" (Dinh et
    al., 2016, arXiv:1605.08803) and "Glow" (Kingma and Dhariwal, 2018, arXiv:1807.03039) factor
    out variables at each scale.

    :math:`S` is orthogonal (log-determinant 0), so
    :math:`\log|\det J| = \log|\det J_F| + \log|\det J_G|`. A condition given as a field
    ``(N, C_c, *space)`` is squeezed with the same :math:`S` so that it matches every scale (its
    channels grow by :math:`2^d` per level); a vector condition ``(N, C_c)`` passes unchanged.

    The hand-written backward squeezes the output, lets :math:`G` rebuild :math:`a` (and its
    cotangent) with its own backward, then :math:`F`, and unsqueezes: only tensors the size of
    ``x`` are alive, and the condition's cotangent is the unsqueezed sum of both.

    :meth:`down`, :meth:`up`, :meth:`down_condition` and :meth:`split` are public so that a
    network with its own recursion over the levels (a two-lane conditional HINT) squeezes and
    splits exactly as the level does. :class:`~invnet.networks.MultiscaleFlow` builds the nest.

    Args:
        steps: the flow steps :math:`F` (an invertible block on the squeezed tensor).
        squeeze: the squeeze :math:`S` (``None``: identity, for vectors).
        inner: the next level :math:`G` (``None`` at the coarsest scale).
        keep: channels of the squeezed tensor handed to ``inner`` (required with ``inner``).

    >>> import torch
    >>> from invnet import Chain
    >>> from invnet.layers import AffineCoupling, HaarSqueeze
    >>> last = MultiscaleLevel(AffineCoupling(2, 8, ndim=1), HaarSqueeze())
    >>> level = MultiscaleLevel(AffineCoupling(2, 8, ndim=1), HaarSqueeze(), inner=last, keep=1)
    >>> x = torch.randn(3, 1, 8)
    >>> z, logdet = level(x)
    >>> z.shape == x.shape, bool(torch.allclose(level.inverse(z)[0], x, atol=1e-6))
    (True, True)
    """

    def __init__(
        self,
        steps: InvertibleModule,
        squeeze: Optional[SqueezeBase] = None,
        inner: Optional[MultiscaleLevel] = None,
        keep: Optional[int] = None,
    ) -> None:
        super().__init__()
        if inner is not None and (keep is None or keep < 1):
            raise ValueError(f"a level with an inner level needs keep >= 1 channels for it, got {keep}")
        self.steps = steps
        self.squeeze = squeeze
        self.inner = inner
        self.keep = keep if inner is not None else None
        self.cond_channels = steps.cond_channels

    # -- squeezing data and condition ---------------------------------------------------------
    def down(self, t: Tensor) -> Tensor:
        """:math:`S t`: a tensor at this level's input scale to the scale of its steps."""
        return t if self.squeeze is None else self.squeeze.squeeze(t)

    def up(self, t: Tensor) -> Tensor:
        """:math:`S^{-1} t`, the inverse of :meth:`down`."""
        return t if self.squeeze is None else self.squeeze.unsqueeze(t)

    def down_condition(self, c: Optional[Tensor]) -> Optional[Tensor]:
        """The condition at the scale of the steps: a field is squeezed, a vector passes."""
        if c is None or self.squeeze is None or c.dim() == 2:
            return c
        return self.squeeze.squeeze(c)

    def up_condition(self, dc: Optional[Tensor], c: Optional[Tensor]) -> Optional[Tensor]:
        """The adjoint of :meth:`down_condition` applied to a condition cotangent ``dc``."""
        if dc is None or self.squeeze is None or c is None or c.dim() == 2:
            return dc
        return self.squeeze.unsqueeze(dc)

    def split(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(a, b)``: the ``keep`` channels for the inner level and the factored-out rest."""
        return h[:, : self.keep], h[:, self.keep :]

    def squeezed_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape after this level's squeeze (validated by the squeeze)."""
        if self.squeeze is None:
            return tuple(shape)
        return self.squeeze.check_shape(tuple(shape), None, inverse=False)

    # -- contract -----------------------------------------------------------------------------
    def _check_shape(self, shape: Shape, c_shape: Optional[Shape], inverse: bool) -> Shape:
        sq = self.squeezed_shape(shape)
        c_sq = None
        if c_shape is not None:
            c_sq = tuple(c_shape) if (self.squeeze is None or len(c_shape) == 2) else self.squeezed_shape(c_shape)
        self.steps.check_shape(sq, c_sq, inverse)
        if self.inner is not None:
            if not 0 < self.keep < sq[1]:
                raise ValueError(
                    f"cannot split {sq[1]} channels keeping {self.keep} for the next scale (input shape {shape})"
                )
            self.inner.check_shape((sq[0], self.keep) + tuple(sq[2:]), c_sq, inverse)
        return tuple(shape)

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        c_s = self.down_condition(c)
        h, logdet = self.steps._forward(self.down(x), c_s)
        if self.inner is not None:
            a, b = self.split(h)
            a, ld = self.inner._forward(a, c_s)
            h, logdet = torch.cat([a, b], 1), logdet + ld
        return self.up(h), logdet

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        c_s = self.down_condition(c)
        h = self.down(y)
        logdet = y.new_zeros(y.shape[0])
        if self.inner is not None:
            a, b = self.split(h)
            a, logdet = self.inner._inverse(a, c_s)
            h = torch.cat([a, b], 1)
        s, ld = self.steps._inverse(h, c_s)
        return self.up(s), logdet + ld

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        c_s = self.down_condition(c)
        h, dh = self.down(y), self.down(dy)
        dc = None
        if self.inner is not None:
            # a squeeze may return a view of the caller's tensor (identity squeeze, 1D patch
            # order): never write into those
            if h.untyped_storage().data_ptr() == y.untyped_storage().data_ptr():
                h = h.clone()
            if dh.untyped_storage().data_ptr() == dy.untyped_storage().data_ptr():
                dh = dh.clone()
        del y, dy  # the squeezed copies carry on; do not keep the caller's tensors alive
        if self.inner is not None:
            a, da, dc = self.inner._vjp(h[:, : self.keep], dh[:, : self.keep], dlogdet, c_s, grads)
            # write the rebuilt part back in place instead of concatenating: two fewer
            # scale-sized tensors alive while the inner levels and this scale's steps run
            h[:, : self.keep] = a
            dh[:, : self.keep] = da
            del a, da
        # hand h and dh over to the steps without keeping a reference here: the steps' chain then
        # frees each rebuilt tensor as soon as the next block has consumed it
        handoff = [h, dh]
        del h, dh
        s, ds, dc_steps = self.steps._vjp(handoff.pop(0), handoff.pop(0), dlogdet, c_s, grads)
        return self.up(s), self.up(ds), self.up_condition(add_optional(dc, dc_steps), c)

    def _vjp_inverse(self, x: Tensor, dx: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        c_s = self.down_condition(c)
        h, dh, dc = self.steps._vjp_inverse(self.down(x), self.down(dx), dlogdet, c_s, grads)
        if self.inner is not None:
            (a, b), (da, db) = self.split(h), self.split(dh)
            a, da, dc_inner = self.inner._vjp_inverse(a, da, dlogdet, c_s, grads)
            h, dh = torch.cat([a, b], 1), torch.cat([da, db], 1)
            dc = add_optional(dc, dc_inner)
        return self.up(h), self.up(dh), self.up_condition(dc, c)

    # -- latent structure ---------------------------------------------------------------------
    def split_latent(self, z: Tensor) -> list[Tensor]:
        """Cut a latent of this level's input shape into per-scale parts, finest first: the
        channels factored out here (squeezed layout), then those of the inner levels; the last
        entry is the coarsest scale's full output."""
        h = self.down(z)
        if self.inner is None:
            return [h]
        a, b = self.split(h)
        return [b] + self.inner.split_latent(a)

    def merge_latent(self, parts: list[Tensor]) -> Tensor:
        """Inverse of :meth:`split_latent`."""
        if self.inner is None:
            if len(parts) != 1:
                raise ValueError(f"expected 1 latent part at the coarsest scale, got {len(parts)}")
            return self.up(parts[0])
        if len(parts) < 2:
            raise ValueError("too few latent parts for the number of scales")
        a = self.inner.merge_latent(list(parts[1:]))
        return self.up(torch.cat([a, parts[0]], 1))
