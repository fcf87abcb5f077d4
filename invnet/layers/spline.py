r"""Monotone rational-quadratic splines and the spline coupling block.

From "Neural Spline Flows" (Durkan, Bekasov, Murray, Papamakarios, NeurIPS 2019,
arXiv:1906.04032): an element-wise, strictly increasing map built of ``K`` rational-quadratic
pieces on :math:`[-B, B]` and the identity outside (linear tails), with an analytic inverse (the
root of a quadratic) and an analytic derivative. Inside a coupling, a conditioner computes the
``3K - 1`` spline parameters of every active element from the passive half and the condition.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.module import GradStore, VJPResult
from ..core.shapes import sum_per_sample
from ..core.vjp import local_vjp
from .coupling import CouplingBase

__all__ = ["SplineKnots", "spline_knots", "rq_spline", "SplineCoupling"]


class SplineKnots(NamedTuple):
    """Knots of element-wise splines: ``x`` and ``y`` positions and the derivatives there, each of
    shape ``(..., K + 1)``; the first and last knots are :math:`(\\mp B, \\mp B)` with slope 1.
    ``bound`` is :math:`B`, kept as a number (reading it off a tensor would synchronise a GPU)."""

    x: Tensor
    y: Tensor
    slope: Tensor
    bound: float


def _positions(logits: Tensor, bound: float, min_size: float) -> Tensor:
    # bin sizes min_size + (1 - K min_size) softmax(logits), as fractions of 2B; knots are their
    # running sum from -B, the last one set to +B exactly so that no element falls off the end
    k = logits.shape[-1]
    sizes = min_size + (1 - k * min_size) * torch.softmax(logits, dim=-1)
    knots = F.pad(torch.cumsum(sizes, dim=-1), (1, 0))
    knots = 2 * bound * knots - bound
    return torch.cat([knots[..., :-1], torch.full_like(knots[..., -1:], bound)], dim=-1)


def spline_knots(
    raw: Tensor, bound: float = 3.0, clamp: float = 3.0, min_bin_width: float = 1e-3, min_bin_height: float = 1e-3
) -> SplineKnots:
    r"""Knots of rational-quadratic splines from unconstrained parameters ``raw`` ``(..., 3K - 1)``:
    ``K`` width logits, ``K`` height logits, ``K - 1`` interior log-slopes.

    .. math::
        w = 2B\,(w_{\min} + (1 - K w_{\min})\,\mathrm{softmax}(r_w)), \quad
        h = 2B\,(h_{\min} + (1 - K h_{\min})\,\mathrm{softmax}(r_h)), \quad
        \delta_k = \exp(\alpha \tanh(r_{\delta,k} / \alpha)),\ \delta_0 = \delta_K = 1.

    The knot slopes are soft-clamped in log space like the affine coupling's log-scale, so
    :math:`e^{-\alpha} < \delta_k < e^{\alpha}`, and the minimum bin sizes bound the bin slopes
    :math:`h_k / w_k`: no parameter value can make the map overflow or lose monotonicity. (Between
    the knots a spline can still be far flatter than either bound when a bin's slope is much
    smaller than its knot slopes; its inverse is then ill-conditioned like any steep flow, so
    measure the reconstruction error of trained networks.) Boundary slopes of 1 make the map
    :math:`C^1` where it meets the identity tails. ``raw = 0`` gives the identity: equal bins and
    unit slopes.

    >>> k = spline_knots(torch.zeros(3, 5), bound=2.0)  # K = 2 bins
    >>> k.x.tolist()[0], k.slope.tolist()[0]
    ([-2.0, 0.0, 2.0], [1.0, 1.0, 1.0])
    """
    if raw.shape[-1] < 5 or (raw.shape[-1] + 1) % 3:
        raise ValueError(f"spline parameters come in groups of 3K - 1 with K >= 2 bins, got {raw.shape[-1]}")
    k = (raw.shape[-1] + 1) // 3
    r_w, r_h, r_d = torch.split(raw, [k, k, k - 1], dim=-1)
    slope = torch.exp(clamp * torch.tanh(r_d / clamp))
    slope = F.pad(slope, (1, 1), value=1.0)
    widths = _positions(r_w, bound, min_bin_width)
    heights = _positions(r_h, bound, min_bin_height)
    return SplineKnots(widths, heights, slope, float(bound))


def _gather(t: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Values of ``t`` at the left and right knots of the bins ``idx`` (shape ``(..., 1)``)."""
    return t.gather(-1, idx).squeeze(-1), t.gather(-1, idx + 1).squeeze(-1)


def rq_spline(inp: Tensor, knots: SplineKnots, inverse: bool = False) -> tuple[Tensor, Tensor]:
    r"""Apply the rational-quadratic splines (or their inverses) element-wise.

    In bin :math:`k` with knots :math:`(x_k, y_k)`, width :math:`w_k`, height :math:`h_k`, slope
    :math:`s_k = h_k / w_k`, knot derivatives :math:`\delta_k, \delta_{k+1}` and
    :math:`\xi = (x - x_k) / w_k \in [0, 1]` (Durkan et al., 2019, arXiv:1906.04032, eqs. 4-8):

    .. math::
        y = y_k + \frac{h_k\,[s_k \xi^2 + \delta_k \xi(1-\xi)]}{s_k + \beta_k \xi(1-\xi)},
        \qquad \beta_k = \delta_{k+1} + \delta_k - 2 s_k,

        \frac{dy}{dx} = \frac{s_k^2\,[\delta_{k+1}\xi^2 + 2 s_k \xi(1-\xi) + \delta_k (1-\xi)^2]}
        {[s_k + \beta_k \xi(1-\xi)]^2}.

    Inverse: with :math:`\Delta = y - y_k`, :math:`\xi` is the root in :math:`[0, 1]` of
    :math:`a\xi^2 + b\xi + c = 0`, :math:`a = h_k(s_k - \delta_k) + \Delta\beta_k`,
    :math:`b = h_k\delta_k - \Delta\beta_k`, :math:`c = -s_k\Delta`, taken in the form
    :math:`\xi = 2c / (-b - \sqrt{b^2 - 4ac})` that does not cancel when :math:`a \to 0` (the
    identity spline has :math:`a = 0`). Outside :math:`[-B, B]` the map is the identity.

    Args:
        inp: ``x`` (or ``y`` when ``inverse``), any shape ``(...)``.
        knots: from :func:`spline_knots`, shape ``(..., K + 1)``.
        inverse: apply the inverse map.

    Returns:
        ``(out, log|d out / d inp|)`` element-wise, both of the shape of ``inp``.

    >>> x = torch.linspace(-4, 4, 4, dtype=torch.float64)
    >>> knots = spline_knots(torch.randn(4, 11, dtype=torch.float64))
    >>> y, lad = rq_spline(x, knots)
    >>> x2, lad_inv = rq_spline(y, knots, inverse=True)
    >>> bool(torch.allclose(x2, x, atol=1e-12)), bool(torch.allclose(lad, -lad_inv, atol=1e-12))
    (True, True)
    """
    bound = knots.bound
    inside = (inp >= -bound) & (inp <= bound)
    # Every element goes through the spline clamped into [-B, B] (finite everywhere, so the unused
    # branch of the `where` below cannot poison gradients with NaN); outside elements keep inp.
    v = inp.clamp(-bound, bound)
    search = knots.y if inverse else knots.x
    idx = (v.unsqueeze(-1) >= search[..., 1:-1]).sum(-1, keepdim=True)
    x_lo, x_hi = _gather(knots.x, idx)
    y_lo, y_hi = _gather(knots.y, idx)
    d_lo, d_hi = _gather(knots.slope, idx)
    w, h = x_hi - x_lo, y_hi - y_lo
    s = h / w
    beta = d_hi + d_lo - 2 * s
    if inverse:
        delta = v - y_lo
        a = h * (s - d_lo) + delta * beta
        b = h * d_lo - delta * beta
        c = -s * delta
        disc = (b * b - 4 * a * c).clamp_min(0.0)  # >= 0 for monotone splines; clamp round-off
        xi = (2 * c) / (-b - torch.sqrt(disc))
        out = x_lo + xi * w
    else:
        xi = (v - x_lo) / w
        out = None
    xi1 = xi * (1 - xi)
    denom = s + beta * xi1
    log_deriv = 2 * torch.log(s) + torch.log(d_hi * xi * xi + 2 * s * xi1 + d_lo * (1 - xi) ** 2) - 2 * torch.log(denom)
    if inverse:
        log_deriv = -log_deriv
    else:
        out = y_lo + h * (s * xi * xi + d_lo * xi1) / denom
    return torch.where(inside, out, inp), torch.where(inside, log_deriv, torch.zeros_like(log_deriv))


class SplineCoupling(CouplingBase):
    r"""Rational-quadratic spline coupling ("Neural Spline Flows", Durkan et al., NeurIPS 2019,
    arXiv:1906.04032):

    .. math::
        y_p = x_p, \qquad \theta = \mathrm{NN}([x_p, c]), \qquad
        y_a = \mathrm{RQS}_{\theta}(x_a), \qquad
        \log|\det J| = \textstyle\sum \log \mathrm{RQS}'_{\theta}(x_a)

    where every active element has its own monotone spline of ``bins`` pieces on
    :math:`[-B, B]` (identity outside; see :func:`rq_spline`), its ``3 * bins - 1`` parameters
    read from the conditioner's output channels (grouped per active channel). ``clamp``
    soft-clamps the knot log-slopes as it does the affine coupling's log-scale, and minimum bin
    sizes bound the bin slopes (see :func:`spline_knots`). The conditioner's last layer starts at
    zero, so the block starts as the identity. Same constructor and contract as
    :class:`~invnet.layers.AffineCoupling` (odd channel counts, ``swap``, field or vector
    condition, custom conditioner); ``coupling="spline"`` in every network
    (:data:`~invnet.layers.COUPLINGS`).

    Backward (memory-free, one conditioner pass): from :math:`y` take :math:`x_p = y_p`, run the
    conditioner with a local graph, rebuild :math:`x_a = \mathrm{RQS}^{-1}_\theta(y_a)` without a
    graph, then differentiate the element-wise spline map *on the rebuilt input* with the same
    local autograd pass, which returns :math:`\bar x_a`, :math:`\bar\theta` (and through the
    conditioner :math:`\bar x_p`, :math:`\bar c` and the parameter gradients) for the cotangents
    :math:`(\bar y_a, \overline{\log\det})`. The spline's derivatives are *not* written out by
    hand: the map is element-wise, so its local graph costs a few tensors of ``K + 1`` values per
    active element of this one block, freed as soon as the block is done, and the knot arithmetic
    (softmax, running sums, bin search, gathers) is exactly what autograd differentiates best;
    a hand-written form would repeat all of it for no memory gain. The inverse map's backward
    works the same way with the roles of forward and inverse exchanged.

    Args:
        channels: channels of ``x`` (2 or more; odd counts give unequal halves).
        hidden: hidden channels of the conditioner.
        ndim: space dimensions, 0 (vectors, MLP conditioner) to 3.
        cond_channels: channels of the optional condition ``c``.
        clamp: bound :math:`\alpha` on the knot log-slopes (:math:`e^{-\alpha} < \delta < e^{\alpha}`).
        swap: make the last half passive instead of the first.
        conditioner: custom network ``passive + cond_channels -> (3 bins - 1) * active`` channels.
        bins: number of spline pieces :math:`K` (2 or more).
        tail_bound: :math:`B`; the identity outside :math:`[-B, B]`.
        min_bin_width, min_bin_height: smallest bin size as a fraction of :math:`2B`.
        **conditioner_kwargs: passed to the default conditioner.

    >>> import torch
    >>> from invnet.layers import SplineCoupling
    >>> block = SplineCoupling(5, hidden=16, ndim=2, cond_channels=2, bins=6)
    >>> x, c = torch.randn(2, 5, 4, 4), torch.randn(2, 2, 4, 4)
    >>> y, logdet = block(x, c)  # zero-initialised: the identity (up to round-off)
    >>> bool(torch.allclose(y, x, atol=1e-6)), bool(logdet.abs().max() < 1e-5)
    (True, True)
    >>> _ = torch.nn.init.normal_(block.conditioner.conv_out.weight, std=0.1)
    >>> y, logdet = block(x, c)
    >>> bool(torch.allclose(block.inverse(y, c)[0], x, atol=1e-5))
    True
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        ndim: int = 2,
        cond_channels: int = 0,
        clamp: float = 3.0,
        swap: bool = False,
        conditioner: Optional[nn.Module] = None,
        bins: int = 8,
        tail_bound: float = 3.0,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        **conditioner_kwargs,
    ) -> None:
        if not clamp > 0:
            raise ValueError(f"clamp must be positive, got {clamp}")
        if int(bins) != bins or bins < 2:
            raise ValueError(f"bins must be an integer >= 2, got {bins}")
        if not (math.isfinite(tail_bound) and tail_bound > 0):
            raise ValueError(f"tail_bound must be a positive number, got {tail_bound}")
        for name, v in (("min_bin_width", min_bin_width), ("min_bin_height", min_bin_height)):
            if not 0 <= v < 1 / bins:
                raise ValueError(f"{name} must lie in [0, 1/bins) = [0, {1 / bins:g}), got {v}")
        super().__init__(channels, hidden, ndim, cond_channels, 3 * int(bins) - 1, swap, conditioner,
                         conditioner_kwargs)
        self.clamp = float(clamp)
        self.bins = int(bins)
        self.tail_bound = float(tail_bound)
        self.min_bin_width = float(min_bin_width)
        self.min_bin_height = float(min_bin_height)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, cond_channels={self.cond_channels}, bins={self.bins}, "
                f"tail_bound={self.tail_bound}, clamp={self.clamp}, swap={self.swap}")

    def _knots(self, x_p: Tensor, c: Optional[Tensor]) -> SplineKnots:
        h = self.run_conditioner(self.conditioner, self._conditioner_input(x_p, c))
        n, space = h.shape[0], tuple(h.shape[2:])
        # (N, active * (3K-1), *space) -> (N, active, *space, 3K-1): one spline per active element
        raw = h.reshape((n, self.n_active, 3 * self.bins - 1) + space).movedim(2, -1)
        return spline_knots(raw, self.tail_bound, self.clamp, self.min_bin_width, self.min_bin_height)

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        x_p, x_a = self._split(x)
        y_a, lad = rq_spline(x_a, self._knots(x_p, c))
        return self._merge(x_p, y_a), sum_per_sample(lad)

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        y_p, y_a = self._split(y)
        x_a, lad = rq_spline(y_a, self._knots(y_p, c), inverse=True)
        return self._merge(y_p, x_a), sum_per_sample(lad)

    def _local_vjp(
        self, out: Tensor, d_out: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore, inverse: bool
    ) -> VJPResult:
        """Backward of the forward map (``inverse=False``: ``out`` is ``y``) or of the inverse map
        (``out`` is ``x``): rebuild the map's input from ``out``, return ``(input, d input, dc)``.
        The knots are computed once, with grad: they rebuild the input (the other direction, no
        grad) and carry the one local pass to the passive part, the condition and the parameters."""
        p, o_a = self._split(out)
        dp, do_a = self._split(d_out)
        with local_vjp(self.conditioner, p, self._condition(c), grads=grads) as vjp:
            knots = self._knots(*vjp.inputs)
            with torch.no_grad():
                i_a = rq_spline(o_a, knots, inverse=not inverse)[0]
            i_a = vjp.add_input(i_a)
            o_re, lad = rq_spline(i_a, knots, inverse=inverse)
            dlad = dlogdet.reshape((-1,) + (1,) * (lad.dim() - 1)).expand_as(lad)
            d_p, dc, d_i = vjp.grad((o_re, lad), (do_a, dlad))
        del o_re, lad, knots
        return self._merge(p, i_a.detach()), self._merge(dp + d_p, d_i), dc

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        return self._local_vjp(y, dy, dlogdet, c, grads, inverse=False)

    def _vjp_inverse(self, x: Tensor, dx: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        return self._local_vjp(x, dx, dlogdet, c, grads, inverse=True)
