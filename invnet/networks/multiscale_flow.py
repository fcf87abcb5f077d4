"""The multiscale builder: one network class that nests :class:`MultiscaleLevel` blocks around
the flow steps a *step factory* makes. Glow, HINT and their conditional forms are this class with
a step factory and a few defaults."""
from __future__ import annotations

from typing import Any, Optional, Protocol

from torch import Tensor

from ..core.chain import Chain
from ..core.module import GradStore, InvertibleModule, Shape, VJPResult
from ..layers.squeeze import HaarSqueeze, Squeeze, SqueezeBase
from .base import FlowNetwork
from .multiscale import MultiscaleLevel

__all__ = ["MultiscaleFlow", "StepFactory", "SQUEEZES", "make_squeeze", "check_scales", "scale_widths"]

#: squeezes a multiscale network can use between scales (``None``: no squeeze)
SQUEEZES = ("haar", "checkerboard", "patch")

#: latent layouts: the shape of ``x``, or the first scale's squeezed layout
LATENTS = ("data", "squeezed")


class StepFactory(Protocol):
    """Makes the blocks of one flow step: step ``index`` (0 to ``depth - 1``) of scale ``scale``
    (0 = finest), on ``channels`` channels (after the scale's squeeze) with a condition of
    ``cond_channels`` channels at that scale, in ``ndim`` space dimensions. The blocks are applied
    in the order given; a scale chains the blocks of all its steps. See
    :class:`~invnet.networks.GlowStep` and :class:`~invnet.networks.HINTStep`."""

    def __call__(self, channels: int, cond_channels: int, ndim: int, scale: int, index: int) -> list[InvertibleModule]:
        ...


def make_squeeze(kind: Optional[str], ndim: int) -> Optional[SqueezeBase]:
    """The squeeze named ``kind`` (one of :data:`SQUEEZES`) in ``ndim`` space dimensions; ``None``
    for ``kind=None`` and for vectors (``ndim == 0``).

    >>> make_squeeze("haar", 2), make_squeeze("patch", 0)
    (HaarSqueeze(), None)
    """
    if kind is None or ndim == 0:
        return None
    return HaarSqueeze(ndim) if kind == "haar" else Squeeze(kind, ndim)


def check_scales(owner: str, ndim: int, levels: int, depth: int, squeeze: Optional[str] = None) -> None:
    """Validate the layout arguments every multiscale network shares (raise ``ValueError``).

    >>> check_scales("Flow", ndim=4, levels=1, depth=1)
    Traceback (most recent call last):
    ...
    ValueError: Flow: ndim must be 0 (vectors), 1, 2 or 3, got 4
    """
    if ndim not in (0, 1, 2, 3):
        raise ValueError(f"{owner}: ndim must be 0 (vectors), 1, 2 or 3, got {ndim}")
    if levels < 1 or depth < 1:
        raise ValueError(f"{owner}: levels and depth must be >= 1, got levels={levels}, depth={depth}")
    if squeeze is not None and squeeze not in SQUEEZES:
        raise ValueError(f"{owner}: squeeze must be one of {SQUEEZES} or None, got {squeeze!r}")


def scale_widths(
    owner: str, channels: int, levels: int, factor: int, min_last: int = 2
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    r"""Channel counts of a multiscale network: ``widths[l]`` after scale ``l``'s squeeze
    (:math:`C_l \cdot` ``factor``, ``factor`` = :math:`2^d` with squeezes, 1 without) and
    ``keeps[l]`` = :math:`\lfloor w_l / 2 \rfloor` handed to scale ``l + 1`` (0 at the last
    scale). Every scale but the last needs 2 channels to split, the last ``min_last`` (2 for a
    coupling, 1 for a lane without one).

    >>> scale_widths("Glow", 3, levels=3, factor=4)
    ((12, 24, 48), (6, 12, 0))
    """
    widths, keeps = [], []
    c_in = channels
    for level in range(levels):
        w = c_in * factor
        last = level == levels - 1
        if w < (min_last if last else 2):
            raise ValueError(
                f"{owner} with {channels} channel(s) and levels={levels} cannot be halved {levels - 1} time(s): "
                f"scale {level + 1} of {levels} would have {w} channel(s), too few to split (a coupling needs 2 or "
                f"more); use fewer levels or more channels"
            )
        widths.append(w)
        keeps.append(0 if last else w // 2)
        c_in = w // 2
    return tuple(widths), tuple(keeps)


class MultiscaleFlow(FlowNetwork):
    r"""A multiscale flow built from a step factory: ``levels`` scales, each a squeeze :math:`S`,
    ``depth`` flow steps :math:`F_\ell` and (except the last) a split that factors out part of
    the channels, the kept part going on to the next scale. One :class:`MultiscaleLevel` per
    scale, nested:

    .. math::
        L_\ell(x; c) = S^{-1}\,\mathrm{cat}\big(L_{\ell+1}(a; S c),\ b\big),\quad
        (a, b) = \mathrm{split}\big(F_\ell(S x;\, S c)\big), \qquad
        L_{\text{last}}(x; c) = S^{-1} F_{\text{last}}(S x;\, S c),

    the multiscale architecture of "Density estimation using Real NVP" (Dinh et al., 2016,
    arXiv:1605.08803) and "Glow" (Kingma and Dhariwal, 2018, arXiv:1807.03039), with a latent
    :math:`z \sim \mathcal N(0, I)` and
    :math:`\log q(x \mid c) = \log\mathcal N(z) + \sum \log|\det J|` (squeezes have logdet 0).

    Channels: scale :math:`\ell` holds :math:`w_\ell = C_\ell 2^d` channels after its squeeze and
    hands :math:`\lfloor w_\ell/2\rfloor` on (``widths``, ``keeps``); without squeezes (vectors,
    ``squeeze=None``) it only factors out channels. Space sizes must be divisible by
    :math:`2^{\text{levels}}` when there are squeezes.

    Condition (``cond_channels > 0``): a field ``(N, cond_channels, *space)`` is squeezed with
    ``x``, so the steps of scale :math:`\ell` see :math:`\mathrm{cond\_channels}\cdot 2^{d(\ell+1)}`
    channels; a vector ``(N, cond_channels)`` (``vector_condition=True``, always for ``ndim=0``)
    passes every scale unchanged and is broadcast over space by the couplings. Without squeezes
    either form is accepted, as by a single coupling. An unconditional network ignores ``c``.

    Latent layout: ``"data"`` (default) puts every factored-out part back where it came from, so
    ``z`` has the shape of ``x`` and stays spatially local; ``"squeezed"`` leaves the first
    squeeze in place, so ``z`` has shape ``(N, C 2^d, *space / 2)`` (the layout of
    :class:`~invnet.networks.ConditionalCouplingFlow`). :meth:`split_latent` cuts ``z`` into the
    per-scale latents, finest first, :meth:`merge_latent` puts them back; nothing about shapes is
    kept between calls, so ``inverse`` and ``sample`` need no earlier forward.

    Memory: run under the memory-free engine, training keeps only ``z`` (and ``c``) whatever the
    depth; the backward rebuilds inputs level by level with each block's hand-written VJP.

    Parameter names: the outermost level is ``body`` (``body.steps.blocks.k...``,
    ``body.inner.steps...``). A subclass whose earlier releases named them otherwise lists the old
    prefixes in ``legacy_prefixes``, and :meth:`load_state_dict` renames them, so old checkpoints
    load.

    Args:
        step: the step factory (:class:`StepFactory`), e.g. :class:`~invnet.networks.GlowStep`.
        channels: channels of ``x``.
        levels: number of scales.
        depth: steps per scale.
        ndim: space dimensions, 0 (vectors) to 3.
        squeeze: ``"haar"`` (orthonormal Haar wavelet), ``"checkerboard"``, ``"patch"`` or ``None``
            (no squeeze: the steps run at full resolution).
        cond_channels: channels of the condition (0: unconditional).
        vector_condition: the condition is a vector ``(N, cond_channels)`` rather than a field.
        latent: ``"data"`` or ``"squeezed"`` (see above).

    >>> import torch
    >>> from invnet.networks import GlowStep, MultiscaleFlow
    >>> flow = MultiscaleFlow(GlowStep(hidden=8, coupling="additive"), channels=2, levels=2, depth=1, ndim=1)
    >>> x = torch.randn(3, 2, 8)
    >>> z, logdet = flow(x)
    >>> z.shape, [tuple(p.shape) for p in flow.split_latent(z)], bool(torch.allclose(flow.inverse(z)[0], x, atol=1e-6))
    (torch.Size([3, 2, 8]), [(3, 2, 4), (3, 4, 2)], True)
    """

    #: ``(old, new)`` parameter-name prefixes of earlier releases, renamed on load
    legacy_prefixes: tuple[tuple[str, str], ...] = ()

    def __init__(
        self,
        step: StepFactory,
        channels: int,
        levels: int = 1,
        depth: int = 1,
        ndim: int = 2,
        squeeze: Optional[str] = "haar",
        cond_channels: int = 0,
        vector_condition: bool = False,
        latent: str = "data",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_scales(name, ndim, levels, depth, squeeze)
        if cond_channels < 0:
            raise ValueError(f"{name}: cond_channels must be >= 0, got {cond_channels}")
        if latent not in LATENTS:
            raise ValueError(f"{name}: latent must be one of {LATENTS}, got {latent!r}")
        squeezed = squeeze is not None and ndim > 0
        if latent == "squeezed" and not squeezed:
            latent = "data"  # without a squeeze the two layouts coincide
        if channels < (1 if squeezed else 2):
            raise ValueError(
                f"{name} needs channels >= 2 for ndim={ndim}{'' if ndim == 0 else ' without a squeeze'}: a "
                f"coupling splits at least 2 channels into two non-empty halves; got {channels}"
            )
        factor = 2**ndim if squeezed else 1
        self.channels = channels
        self.ndim = ndim
        self.levels = levels
        self.depth = depth
        self.squeeze_kind = squeeze if squeezed else None
        self.cond_channels = cond_channels
        self.vector_condition = bool(vector_condition or ndim == 0)
        self.latent = latent
        self.widths, self.keeps = scale_widths(name, channels, levels, factor)
        # the first squeeze of a "squeezed" latent runs outside the levels and is never undone
        self.outer_squeeze = make_squeeze(squeeze, ndim) if latent == "squeezed" else None
        inner: Optional[MultiscaleLevel] = None
        for level in reversed(range(levels)):  # innermost first: parameters are created in this order
            cc = cond_channels
            if cond_channels and not self.vector_condition:
                cc = cond_channels * factor ** (level + 1)
            blocks = [
                b for k in range(depth)
                for b in step(channels=self.widths[level], cond_channels=cc, ndim=ndim, scale=level, index=k)
            ]
            sq = None if (level == 0 and self.outer_squeeze is not None) else make_squeeze(squeeze, ndim)
            inner = MultiscaleLevel(Chain(*blocks), sq, inner, self.keeps[level] if inner is not None else None)
        self.body = inner

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, levels={self.levels}, depth={self.depth}, ndim={self.ndim}, "
            f"squeeze={self.squeeze_kind!r}, cond_channels={self.cond_channels}, "
            f"vector_condition={self.vector_condition}, latent={self.latent!r}"
        )

    # -- validation ----------------------------------------------------------------------------
    def _check_shape(self, shape: Shape, c_shape: Optional[Shape], inverse: bool) -> Shape:
        name = type(self).__name__
        what = "latent z" if inverse else "x"
        x_shape = tuple(shape)
        expected = self.channels
        if inverse and self.outer_squeeze is not None:
            expected = self.channels * 2**self.ndim
        if shape[1] != expected:
            raise ValueError(f"{name} expects {what} with {expected} channels, got {shape[1]} (shape {tuple(shape)})")
        if inverse and self.outer_squeeze is not None:
            x_shape = self.outer_squeeze.check_shape(x_shape, None, inverse=True)
        if self.squeeze_kind is not None:
            div = 2**self.levels
            bad = [s for s in x_shape[2:] if s % div]
            if bad:
                raise ValueError(
                    f"{name} with levels={self.levels} needs every space size divisible by 2^{self.levels} = {div}; "
                    f"got space shape {tuple(x_shape[2:])} (size {bad[0]} is not divisible by 2**levels = {div})"
                )
        if self.cond_channels:
            self._check_condition(x_shape, c_shape, what, tuple(shape))
        else:
            c_shape = None  # an unconditional network ignores c
        if self.outer_squeeze is None:
            return self.body.check_shape(x_shape, c_shape, inverse)
        c_sq = c_shape
        if c_shape is not None and len(c_shape) > 2:
            c_sq = self.outer_squeeze.check_shape(tuple(c_shape), None, inverse=False)
        if inverse:
            self.body.check_shape(tuple(shape), c_sq, inverse=True)
            return x_shape
        return self.body.check_shape(self.outer_squeeze.check_shape(x_shape, None, inverse=False), c_sq, False)

    def _check_condition(self, x_shape: Shape, c_shape: Optional[Shape], what: str, shape: Shape) -> None:
        name = type(self).__name__
        if c_shape is None:
            raise ValueError(f"{name} was built with cond_channels={self.cond_channels} and needs a condition c")
        field = (x_shape[0], self.cond_channels) + tuple(x_shape[2:])
        vector = (x_shape[0], self.cond_channels)
        if self.squeeze_kind is None:  # no squeeze: the couplings broadcast a vector themselves
            accepted, kind = tuple(dict.fromkeys((field, vector))), "a field with the space shape of x, or a vector"
        elif self.vector_condition:
            accepted, kind = (vector,), "a vector condition"
        else:
            accepted, kind = (field,), "a field condition with the space shape of x"
        if tuple(c_shape) not in accepted:
            raise ValueError(
                f"{name}: condition c must have shape {' or '.join(map(str, accepted))} ({kind}); "
                f"got {tuple(c_shape)} for {what} of shape {shape}"
            )

    # -- contract: the nested levels, behind the optional outer squeeze -------------------------
    def _cond(self, c: Optional[Tensor]) -> Optional[Tensor]:
        if not self.cond_channels:
            return None
        if self.outer_squeeze is None or c is None or c.dim() == 2:
            return c
        return self.outer_squeeze.squeeze(c)

    def _unsqueeze(self, t: Optional[Tensor], like: Optional[Tensor] = None) -> Optional[Tensor]:
        # back through the outer squeeze; a vector condition's cotangent passes
        if self.outer_squeeze is None or t is None or (like is not None and like.dim() == 2):
            return t
        return self.outer_squeeze.unsqueeze(t)

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        if self.outer_squeeze is not None:
            x = self.outer_squeeze.squeeze(x)
        return self.body._forward(x, self._cond(c))

    def _inverse(self, z: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        x, logdet = self.body._inverse(z, self._cond(c))
        return self._unsqueeze(x), logdet

    def _vjp(self, z: Tensor, dz: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        # pass z on without keeping it in this frame, so the levels can free it once rebuilt
        handoff = [z]
        del z
        x, dx, dc = self.body._vjp(handoff.pop(), dz, dlogdet, self._cond(c), grads)
        return self._unsqueeze(x), self._unsqueeze(dx), self._unsqueeze(dc, c)

    def _vjp_inverse(self, x: Tensor, dx: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        if self.outer_squeeze is not None:
            x, dx = self.outer_squeeze.squeeze(x), self.outer_squeeze.squeeze(dx)
        z, dz, dc = self.body._vjp_inverse(x, dx, dlogdet, self._cond(c), grads)
        return z, dz, self._unsqueeze(dc, c)

    # -- latent structure ---------------------------------------------------------------------
    def split_latent(self, z: Tensor) -> list[Tensor]:
        """Cut the latent ``z`` into per-scale latents, finest scale first.

        Entry ``l < levels - 1`` is what scale ``l + 1`` factored out, in that scale's squeezed
        layout ``(N, widths[l] - keeps[l], *space / 2^(l+1))``; the last entry is the coarsest
        scale's output ``(N, widths[-1], *space / 2^levels)``. Each entry is standard normal under
        the model. Parameter-free; :meth:`merge_latent` inverts it.
        """
        self.check_shape(tuple(z.shape), self._condition_shape_for(z), inverse=True)
        return self.body.split_latent(z)

    def merge_latent(self, parts: list[Tensor]) -> Tensor:
        """Put per-scale latents (as returned by :meth:`split_latent`) back into one ``z``."""
        if len(parts) != self.levels:
            raise ValueError(
                f"{type(self).__name__} has {self.levels} scales (one latent part each); got {len(parts)} latent parts"
            )
        return self.body.merge_latent(list(parts))

    def _condition_shape_for(self, z: Tensor) -> Optional[tuple[int, ...]]:
        # a valid condition shape, so that split_latent can validate z alone
        if not self.cond_channels:
            return None
        space = tuple(z.shape[2:])
        if self.outer_squeeze is not None:
            space = tuple(2 * s for s in space)
        if self.vector_condition:
            return (z.shape[0], self.cond_channels)
        return (z.shape[0], self.cond_channels) + space

    # -- parameter names of earlier releases --------------------------------------------------
    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        # the documented PyTorch place for renaming old checkpoint keys (as BatchNorm does)
        for old, new in self.legacy_prefixes:
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                renamed = prefix + new + key[len(prefix + old):]
                if renamed not in state_dict:
                    state_dict[renamed] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
