"""Forward mode with memory saving on (invnet.core.forward_mode): torch.func.jvp, jacfwd, vmap and
dual tensors through every block and network, against memory saving off and against the
hand-written reverse mode (dot-product test), in float64, the logdet's tangent included."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from test_core_blocks import CASES, NOISE, make
from torch.func import functional_call, jacfwd, jvp, vmap

import invnet
from invnet.core.checks import randomize_parameters_
from invnet.core.forward_mode import ForwardModeError
from invnet.layers import (
    ActNorm,
    ChannelSubset,
    ConditionalAffine,
    HaarSqueeze,
    HINTCoupling,
    HyperbolicLayer,
    Inverted,
    IRIMCoupling,
    LearnableDownsample,
    Logit,
)
from invnet.networks import (
    HINT,
    ConditionalCouplingFlow,
    ConditionalGlow,
    ConditionalHINT,
    Glow,
    Hyperbolic,
    InvertibleUNet,
    LearnedLoop,
    MultiscaleConditionalHINT,
    MultiscaleHINT,
)
from invnet.operators import as_operator

D = torch.float64
SPACE = {0: (), 1: (8,), 2: (4, 8), 3: (4, 4, 4)}


def block_case(name, nd):
    torch.manual_seed(0)
    block = randomize_parameters_(make(name, nd), NOISE.get(name, 0.3))
    x = torch.randn(3, 5, *SPACE[nd], dtype=D)
    c = torch.randn(3, 3, *SPACE[nd], dtype=D) if name.endswith("_cond") else None
    return block, x, c


def other_cases():
    """Blocks outside the core conformance list, and every network."""
    op = as_operator(torch.randn(10, 16, dtype=D) / 4, domain_shape=(1, 4, 4))
    return {
        "logit": (lambda: Logit(), (3, 2, 5), None),
        "hint_coupling": (lambda: HINTCoupling(5, hidden=8, ndim=2, cond_channels=1), (2, 5, 4, 4), (2, 1, 4, 4)),
        "conditional_affine": (lambda: ConditionalAffine(3, cond_channels=2, hidden=8, ndim=1), (2, 3, 8), (2, 2, 8)),
        "hyperbolic_layer": (lambda: HyperbolicLayer(4, hidden=8, ndim=2), (2, 4, 4, 4), None),
        "downsample": (lambda: LearnableDownsample(2, ndim=2), (2, 2, 4, 4), None),
        "inverted": (lambda: Inverted(HaarSqueeze()), (2, 8, 2, 2), None),
        "channel_subset": (lambda: ChannelSubset(ActNorm(2), skip=1), (2, 3, 4), None),
        "irim": (lambda: IRIMCoupling(op, channels=3, hidden=8), (2, 3, 4, 4), (2, 10)),
        "glow": (lambda: Glow(2, hidden=8, levels=2, depth=2, ndim=2), (2, 2, 8, 8), None),
        "hint": (lambda: HINT(3, hidden=8, depth=2, ndim=1), (2, 3, 8), None),
        "multiscale_hint": (lambda: MultiscaleHINT(2, hidden=8, levels=2, depth=1, ndim=2), (2, 2, 8, 8), None),
        "cond_glow": (lambda: ConditionalGlow(2, 2, hidden=8, levels=2, depth=1, ndim=1), (2, 2, 8), (2, 2, 8)),
        "cond_hint": (lambda: ConditionalHINT(3, cond_channels=2, hidden=8, depth=2, ndim=0), (3, 3), (3, 2)),
        "ms_cond_hint": (lambda: MultiscaleConditionalHINT(1, 1, hidden=8, levels=2, depth=1, ndim=2),
                         (2, 1, 8, 8), (2, 1, 8, 8)),
        "cond_coupling_flow": (lambda: ConditionalCouplingFlow(1, 2, ndim=2, depth=2, hidden=8), (2, 1, 8, 8),
                               (2, 2, 8, 8)),
        "hyperbolic": (lambda: Hyperbolic(channels=2, ndim=2, layers=2, stages=2, hidden=4), (2, 2, 8, 8), None),
        "iunet": (lambda: InvertibleUNet(2, ndim=2, levels=3, blocks=1, hidden=4), (2, 2, 8, 8), None),
        "learned_loop": (lambda: LearnedLoop(op, channels=3, iterations=2, hidden=8), (2, 3, 4, 4), (2, 10)),
    }


def other_case(name):
    make_block, xs, cs = other_cases()[name]
    torch.manual_seed(0)
    block = randomize_parameters_(make_block().to(D), 0.2)
    x = torch.rand(xs, dtype=D) * 0.9 + 0.05 if name == "logit" else torch.randn(xs, dtype=D)
    c = None if cs is None else torch.randn(cs, dtype=D)
    return block, x, c


ALL = [("core", n, nd) for n, nd in CASES] + [("other", n, None) for n in other_cases()]


def build(kind, name, nd):
    block, x, c = block_case(name, nd) if kind == "core" else other_case(name)
    with torch.no_grad():
        block(x, c)  # ActNorm's data-dependent initialisation, outside any transform
    return block, x, c


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("kind,name,nd", ALL, ids=[f"{n}-{nd}" if nd is not None else n for _, n, nd in ALL])
def test_jvp_with_memory_saving_matches_plain_and_reverse_mode(kind, name, nd):
    block, x, c = build(kind, name, nd)
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(x.shape, generator=gen, dtype=D)
    params = {k: p.detach() for k, p in block.named_parameters()}
    dparams = {k: torch.randn(p.shape, generator=gen, dtype=D) for k, p in params.items()}

    def f(inp, ps):
        return functional_call(block, ps, (inp, c))

    with invnet.memory_saving(True):
        (z, ld), (dz, dld) = jvp(f, (x, params), (v, dparams))
    with invnet.memory_saving(False):
        (z0, ld0), (dz0, dld0) = jvp(f, (x, params), (v, dparams))
    assert torch.equal(z, z0) and rel(dz, dz0) <= 1e-10 and rel(dld, dld0) <= 1e-10
    # dot-product test against the memory-free reverse mode: <w, J v> + <u, dlogdet> both ways
    w = torch.randn(z.shape, generator=gen, dtype=D)
    u = torch.randn(ld.shape, generator=gen, dtype=D)
    xg = x.clone().requires_grad_(True)
    with invnet.memory_saving(True):
        out, logdet = block(xg, c)
    plist = list(block.parameters())
    grads = torch.autograd.grad((out * w).sum() + (logdet * u).sum(), [xg, *plist], allow_unused=True)
    reverse = (grads[0] * v).sum() + sum(
        (g * dparams[k]).sum() for (k, _), g in zip(block.named_parameters(), grads[1:]) if g is not None
    )
    forward = (w * dz).sum() + (u * dld).sum()
    assert abs(float(forward - reverse)) <= 1e-10 * max(1.0, abs(float(reverse)))


@pytest.mark.parametrize("name", ["glow", "cond_hint", "ms_cond_hint", "irim"])
def test_jacfwd_and_vmap_with_memory_saving(name):
    block, x, c = build("other", name, None)
    x1 = x[:1]
    c1 = None if c is None else c[:1]
    with invnet.memory_saving(True):
        jac = jacfwd(lambda t: block(t, c1)[0])(x1)
        jac_ld = jacfwd(lambda t: block(t, c1)[1])(x1)
    with invnet.memory_saving(False):
        jac0 = torch.autograd.functional.jacobian(lambda t: block(t, c1)[0], x1)
        jac_ld0 = torch.autograd.functional.jacobian(lambda t: block(t, c1)[1], x1)
    assert rel(jac, jac0) <= 1e-10 and rel(jac_ld, jac_ld0) <= 1e-10
    stacked = torch.stack([x, 2 * x])
    cs = None if c is None else torch.stack([c, c])
    with invnet.memory_saving(True):
        z, ld = vmap(lambda t, cc: block(t, cc))(stacked, cs) if c is not None else vmap(block)(stacked)
        loop = [block(t, c) for t in stacked]
    assert rel(z, torch.stack([o[0] for o in loop])) <= 1e-12
    assert rel(ld, torch.stack([o[1] for o in loop])) <= 1e-12


def test_dual_tensors_with_grad_enabled_and_memory_saving_on():
    block, x, c = build("other", "cond_glow", None)
    v = torch.randn_like(x)
    with invnet.memory_saving(False):
        _, (dz0, dld0) = jvp(lambda t: block(t, c), (x,), (v,))
    assert torch.is_grad_enabled() and invnet.memory_saving_enabled()
    with fwAD.dual_level():
        z, ld = block(fwAD.make_dual(x, v), c)
        dz, dld = fwAD.unpack_dual(z).tangent, fwAD.unpack_dual(ld).tangent
    assert rel(dz, dz0) <= 1e-10 and rel(dld, dld0) <= 1e-10


class _NoForwardRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class DoublingBlock(invnet.InvertibleModule):
    """A user block whose arithmetic runs through an autograd Function without a jvp rule."""

    def _forward(self, x, c):
        return _NoForwardRule.apply(x), x.new_full((x.shape[0],), x[0].numel() * 0.6931471805599453)

    def _inverse(self, y, c):
        return y / 2, y.new_full((y.shape[0],), -y[0].numel() * 0.6931471805599453)


def test_a_block_without_forward_rule_is_named():
    flow = invnet.Chain(ActNorm(2), DoublingBlock()).to(D)
    x = torch.randn(3, 2, 4, dtype=D)
    flow(x)
    with pytest.raises(ForwardModeError, match="DoublingBlock"):
        jvp(flow, (x,), (torch.ones_like(x),))
    with pytest.raises(ForwardModeError, match="DoublingBlock"), fwAD.dual_level():
        flow(fwAD.make_dual(x, torch.ones_like(x)))


def test_uninitialised_actnorm_inside_a_transform_says_what_to_do():
    block = ActNorm(2).to(D)
    x = torch.randn(3, 2, 4, dtype=D)
    with pytest.raises(ForwardModeError, match="call the network once outside"):
        jvp(block, (x,), (torch.ones_like(x),))
    assert not block.initialized
