"""Rational-quadratic splines and the spline coupling: the element-wise map (monotone, C1, exact
inverse within its conditioning, exact log-derivative), the block's identity start, channel split,
conditions, memory saving, and bad input. The block also runs through the conformance lists of
tests/test_core_blocks.py (invertibility, brute-force logdet, gradients of both directions)."""
import math

import pytest
import torch

import invnet
from invnet.core.checks import gradient_error, invertibility_error, logdet_error, randomize_parameters_, saved_bytes
from invnet.layers import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    Conv1x1,
    HaarSqueeze,
    SplineCoupling,
    rq_spline,
    spline_knots,
)
from invnet.networks import HINT, ConditionalCouplingFlow, ConditionalGlow, ConditionalHINT, Glow

D = torch.float64
EPS = torch.finfo(D).eps
SPACE = {0: (), 1: (8,), 2: (4, 6), 3: (4, 4, 2)}


def random_knots(n, bins, scale, bound=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return spline_knots(scale * torch.randn(n, 3 * bins - 1, generator=gen, dtype=D), bound=bound)


def test_zero_parameters_give_the_identity():
    knots = spline_knots(torch.zeros(50, 3 * 6 - 1, dtype=D), bound=2.0)
    x = torch.linspace(-3, 3, 50, dtype=D)
    y, lad = rq_spline(x, knots)
    assert (y - x).abs().max() <= 4 * EPS and lad.abs().max() <= 4 * EPS
    block = SplineCoupling(5, 8, ndim=1, cond_channels=2, bins=6).to(D)
    x, c = torch.randn(3, 5, 8, dtype=D), torch.randn(3, 2, 8, dtype=D)
    y, logdet = block(x, c)
    assert (y - x).abs().max() <= 16 * EPS and logdet.abs().max() <= 64 * EPS


def test_spline_is_monotone_c1_and_identity_outside_the_bound():
    knots = random_knots(1, bins=7, scale=2.0)

    def at(v):
        v = torch.as_tensor(v, dtype=D)
        k = type(knots)(*(t.expand(v.shape[0], -1) for t in knots[:3]), knots.bound)
        return rq_spline(v, k)

    x = torch.linspace(-5, 5, 20001, dtype=D)
    y, lad = at(x)
    assert bool((y[1:] > y[:-1]).all())
    outside = x.abs() > 3
    assert torch.equal(y[outside], x[outside]) and bool((lad[outside] == 0).all())
    # the pieces meet at the knots (the outer ones join the identity tails): value and slope agree
    # on both sides, and the value there is the knot's y
    h = 1e-9
    left, lad_l = at(knots.x[0] - h)
    right, lad_r = at(knots.x[0] + h)
    assert torch.allclose(left, knots.y[0], atol=1e-7, rtol=0) and torch.allclose(right, knots.y[0], atol=1e-7, rtol=0)
    assert torch.allclose(lad_l, lad_r, atol=1e-5, rtol=0)
    assert torch.allclose(lad_l, knots.slope[0].log(), atol=1e-5, rtol=0)


def test_log_derivative_is_exact_and_inverse_is_its_negative():
    knots = random_knots(400, bins=8, scale=1.0)
    x = (3.5 * torch.randn(400, dtype=D, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    y, lad = rq_spline(x, knots)
    (dy,) = torch.autograd.grad(y.sum(), x)  # element-wise map: the gradient is the derivative
    inside = x.detach().abs() < 3
    assert bool(inside.any()) and bool((~inside).any())
    assert torch.allclose(lad.detach(), dy.log(), atol=1e-12, rtol=0)
    x_rec, lad_inv = rq_spline(y.detach(), knots, inverse=True)
    assert torch.allclose(lad_inv, -lad.detach(), atol=1e-12, rtol=0)
    conditioning = EPS * (y.detach().abs() + 3) / dy  # see the next test
    assert bool(((x_rec - x.detach()).abs() <= 64 * conditioning).all())


def test_inverse_error_stays_within_the_conditioning_of_extreme_splines():
    """Large raw parameters make very flat pieces (slope e^-15); round-off of y is then amplified
    by 1/slope in any inverse. The quadratic-root form keeps the error at that floor."""
    knots = random_knots(5000, bins=8, scale=4.0, seed=2)
    x = 2.8 * (2 * torch.rand(5000, dtype=D, generator=torch.Generator().manual_seed(3)) - 1)
    y, lad = rq_spline(x, knots)
    x_rec, _ = rq_spline(y, knots, inverse=True)
    assert float(lad.min()) < -10  # the test does reach ill-conditioned pieces
    floor = EPS * (y.abs() + 3) / lad.exp()  # |dx| ~ eps |y| / (dy/dx); knots are O(B) numbers
    assert bool(((x_rec - x).abs() <= 64 * floor).all())


def test_knots_bound_bin_sizes_and_slopes():
    clamp, bins, bound, w_min = 2.0, 6, 3.0, 1e-2
    knots = spline_knots(40 * torch.randn(1000, 3 * bins - 1, dtype=D), bound, clamp, w_min, w_min)
    for pos in (knots.x, knots.y):
        assert torch.equal(pos[:, 0], torch.full((1000,), -bound, dtype=D))
        assert torch.equal(pos[:, -1], torch.full((1000,), bound, dtype=D))
        assert float((pos[:, 1:] - pos[:, :-1]).min()) >= 2 * bound * w_min * (1 - 1e-9)
    assert torch.equal(knots.slope[:, [0, -1]], torch.ones(1000, 2, dtype=D))
    assert float(knots.slope.max()) <= math.exp(clamp) and float(knots.slope.min()) >= math.exp(-clamp)


def test_odd_channels_and_swap_choose_the_passive_half():
    for swap, passive in ((False, slice(0, 2)), (True, slice(3, 5))):
        block = randomize_parameters_(SplineCoupling(5, 8, 0, swap=swap, bins=4).to(D), 0.1)
        assert (block.n_passive, block.n_active) == (2, 3)
        x = torch.randn(6, 5, dtype=D)
        y, _ = block(x)
        assert torch.equal(y[:, passive], x[:, passive])
        assert not torch.allclose(y, x)
        assert block.conditioner.lin_out.out_features == 3 * (3 * 4 - 1)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_vector_condition_broadcasts_over_space(nd):
    block = randomize_parameters_(SplineCoupling(3, 8, nd, cond_channels=2, bins=5).to(D), 0.1)
    x, c = torch.randn(2, 3, *SPACE[nd], dtype=D), torch.randn(2, 2, dtype=D)
    assert invertibility_error(block, x, c) <= 1e-12
    assert gradient_error(block, x, c) <= 1e-10
    assert gradient_error(block, x, c, inverse=True) <= 1e-10


@pytest.mark.parametrize("nd", [0, 1, 2, 3])
def test_chain_of_splines_and_other_blocks(nd):
    ch = 4
    blocks = [ActNorm(ch), SplineCoupling(ch, 8, nd, cond_channels=2, bins=4), Conv1x1(ch),
              SplineCoupling(ch, 8, nd, cond_channels=2, swap=True, tail_bound=2.0)]
    if nd > 0:
        blocks += [HaarSqueeze(), SplineCoupling(ch * 2**nd, 8, nd, cond_channels=2, bins=3)]
    space = tuple(2 * s for s in SPACE[nd][:1]) + SPACE[nd][1:]
    x, c = torch.randn(3, ch, *space, dtype=D), torch.randn(3, 2, dtype=D)
    flow = randomize_parameters_(invnet.Chain(*blocks).to(D), 0.05)  # three splines compose
    flow(x, c)
    assert invertibility_error(flow, x, c) <= 1e-12
    assert gradient_error(flow, x, c) <= 1e-10
    assert gradient_error(flow, x, c, inverse=True) <= 1e-10
    if nd <= 1:
        assert logdet_error(flow, x, c) <= 1e-10


def test_memory_saving_takes_its_own_path():
    """The gradient checks compare two different computations: with memory saving the block keeps
    only its output, plain autograd keeps the spline's intermediate tensors."""
    block = randomize_parameters_(SplineCoupling(4, 8, 2, cond_channels=1, bins=8).to(D), 0.1)
    x, c = torch.randn(2, 4, 8, 8, dtype=D, requires_grad=True), torch.randn(2, 1, 8, 8, dtype=D)

    def run():
        y, ld = block(x, c)
        return y.sum() + ld.sum()

    with invnet.memory_saving(True):
        saving = saved_bytes(run)
    with invnet.memory_saving(False):
        plain = saved_bytes(run)
    assert saving <= x.numel() * 8 + c.numel() * 8 + 64  # the output (and the condition), nothing else
    assert plain > 10 * saving


def test_bad_arguments_and_inputs_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match="bins"):
        SplineCoupling(4, 8, 0, bins=1)
    with pytest.raises(ValueError, match="tail_bound"):
        SplineCoupling(4, 8, 0, tail_bound=0.0)
    with pytest.raises(ValueError, match="min_bin_width"):
        SplineCoupling(4, 8, 0, bins=4, min_bin_width=0.25)
    with pytest.raises(ValueError, match="clamp"):
        SplineCoupling(4, 8, 0, clamp=-1.0)
    with pytest.raises(ValueError, match="at least 2 channels"):
        SplineCoupling(1, 8, 0)
    with pytest.raises(ValueError, match="3K - 1"):
        spline_knots(torch.zeros(2, 7))
    block = SplineCoupling(4, 8, 2, cond_channels=3)
    with pytest.raises(ValueError, match="needs a condition"):
        block(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="condition c must have shape"):
        block(torch.randn(2, 4, 4, 4), torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="expects 4 channels"):
        block(torch.randn(2, 5, 4, 4), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="finite"):
        block(torch.full((2, 4, 4, 4), float("nan")), torch.randn(2, 3, 4, 4))


# (network with coupling="spline", x shape, c shape): the registry entry reaches every network
SPLINE_NETWORKS = [
    (lambda: Glow(2, hidden=6, levels=2, depth=2, ndim=1, coupling="spline"), (2, 2, 8), None),
    (lambda: ConditionalGlow(3, 2, hidden=6, levels=1, depth=2, ndim=0, coupling="spline"), (3, 3), (3, 2)),
    (lambda: ConditionalGlow(1, 2, hidden=6, levels=2, depth=1, ndim=2, coupling="spline"), (2, 1, 4, 4), (2, 2, 4, 4)),
    (lambda: ConditionalCouplingFlow(1, 1, ndim=3, depth=2, hidden=6, coupling="spline"),
     (2, 1, 4, 4, 2), (2, 1, 4, 4, 2)),
    (lambda: ConditionalHINT(3, 2, 6, depth=2, ndim=0, coupling="spline"), (2, 3), (2, 2)),
    (lambda: HINT(5, 6, depth=1, ndim=1, cond_channels=1, coupling="spline"), (2, 5, 3), (2, 1, 3)),
]


@pytest.mark.parametrize("make,x_shape,c_shape", SPLINE_NETWORKS)
def test_spline_coupling_in_every_network(make, x_shape, c_shape):
    net = make()
    couplings = [m for m in net.modules() if isinstance(m, (AffineCoupling, AdditiveCoupling, SplineCoupling))]
    assert couplings and all(isinstance(m, SplineCoupling) for m in couplings)
    net = randomize_parameters_(net.double(), 0.05)
    x = torch.randn(*x_shape, dtype=D)
    c = None if c_shape is None else torch.randn(*c_shape, dtype=D)
    assert invertibility_error(net, x, c) <= 1e-12
    assert gradient_error(net, x, c) <= 1e-10
    assert gradient_error(net, x, c, inverse=True) <= 1e-10
    if x[0].numel() <= 8:
        assert logdet_error(net, x, c) <= 1e-10
