"""Mixed precision through the memory-free backward: under ``torch.autocast`` the conditioners run
in bfloat16/float16, the invertible arithmetic stays in float32, and the backward rebuilds under
the forward's autocast state wherever ``loss.backward()`` is called.

Tolerances. Gradients are compared as one relative 2-norm over every gradient (input, condition,
parameters), memory saving on against off, both under the same autocast:

* a single block: <= 1e-4. Its rebuild feeds the conditioner a bit-identical input (the passive
  half is copied), so the two modes differ only by float32 rounding in the written-out arithmetic
  and by the rare low-precision rounding of a cotangent that float32 rounding pushed across a
  rounding boundary;
* a network: <= 8 u in bfloat16 and <= 32 u in float16, u the unit roundoff (2^-8, 2^-11), and
  at most 1x (bfloat16) or 4x (float16) the change that low precision itself makes to the
  same gradients (against float32). Deeper in the backward a rebuilt input differs from the true
  one by round-off, which the low-precision conditioners turn into a drift of a fraction of u (a
  rebuilt input that rounds to the other low-precision neighbour moves the conditioner's output by
  one unit there; docs/precision.md measures it: 0.2-0.3 u at a network's input). Where the drift
  moves a conditioner's ReLU across its kink, or a value across a rounding boundary, the local
  gradient changes by more than u, and that propagates. Measured (four networks, three or four
  seeds, one and two threads): bfloat16 0-2.5 u, at most 0.45x the bfloat16 effect; float16 0-19 u (the
  scaled loss of the GradScaler test, two threads), at most 2.8x the float16 effect, because
  float16's finer grid makes the same round-off a larger fraction of its unit. CPU kernels round
  differently with one and with two threads (each deterministic), so both were measured.
"""
import pytest
import torch

import invnet
from invnet.core.checks import randomize_parameters_
from invnet.core.precision import AutocastState, pin_full_precision
from invnet.layers import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    ChannelPermutation,
    ConditionalAffine,
    Conv1x1,
    HaarSqueeze,
    HINTCoupling,
    HyperbolicLayer,
    IRIMCoupling,
    LeakyReLU,
    LearnableDownsample,
    Squeeze,
)
from invnet.networks import HINT, ConditionalGlow, ConditionalHINT, Glow
from invnet.operators import as_operator

LOW = [torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# networks, memory saving on against off: at most this many units u, and at most this multiple of
# the change low precision itself makes to the gradients (see the module docstring)
NETWORK_UNITS = {torch.bfloat16: 8, torch.float16: 32}
NETWORK_RATIO = {torch.bfloat16: 1.0, torch.float16: 4.0}


def _irim():
    a = torch.randn(10, 16, generator=torch.Generator().manual_seed(3)) / 4
    return IRIMCoupling(as_operator(a, domain_shape=(1, 4, 4)), channels=3, hidden=8)


# name: (constructor, x shape, c shape or None)
BLOCKS = {
    "affine": (lambda: AffineCoupling(5, 16, 2), (3, 5, 8, 8), None),
    "affine_cond": (lambda: AffineCoupling(5, 16, 2, cond_channels=2, swap=True), (3, 5, 8, 8), (3, 2, 8, 8)),
    "affine_vector": (lambda: AffineCoupling(5, 16, 0, cond_channels=2), (6, 5), (6, 2)),
    "additive": (lambda: AdditiveCoupling(5, 16, 3), (2, 5, 4, 4, 4), None),
    "conditional_affine": (lambda: ConditionalAffine(3, 2, 16, 2), (3, 3, 8, 8), (3, 2, 8, 8)),
    "hint": (lambda: HINTCoupling(6, 16, 2, cond_channels=2), (3, 6, 8, 8), (3, 2, 8, 8)),
    "irim": (_irim, (3, 3, 4, 4), (3, 10)),
    "hyperbolic": (lambda: HyperbolicLayer(4, 16, 2), (3, 4, 8, 8), None),
    "actnorm": (lambda: ActNorm(4), (3, 4, 8, 8), None),
    "conv1x1": (lambda: Conv1x1(4), (3, 4, 8, 8), None),
    "conv1x1_lu": (lambda: Conv1x1(4, "lu"), (3, 4, 8), None),
    "permutation": (lambda: ChannelPermutation(4, "random"), (3, 4, 8), None),
    "squeeze": (lambda: Squeeze(), (3, 4, 8, 8), None),
    "haar": (lambda: HaarSqueeze(), (3, 4, 8, 8), None),
    "learnable_downsample": (lambda: LearnableDownsample(4, 2), (3, 4, 8, 8), None),
    "leaky_relu": (lambda: LeakyReLU(0.3), (3, 4, 8, 8), None),
}
# blocks without a conditioner: autocast must not change a single bit of what they compute
PURE_ARITHMETIC = ["actnorm", "conv1x1", "conv1x1_lu", "permutation", "squeeze", "haar",
                   "learnable_downsample", "leaky_relu"]

NETWORKS = {
    "glow": (lambda: Glow(2, hidden=16, levels=2, depth=4, ndim=2), (4, 2, 16, 16), None),
    "conditional_glow": (
        lambda: ConditionalGlow(2, 2, hidden=16, levels=2, depth=4, ndim=2), (4, 2, 16, 16), (4, 2, 16, 16)
    ),
    "hint": (lambda: HINT(4, hidden=16, depth=4, ndim=2), (4, 4, 16, 16), None),
    "conditional_hint": (lambda: ConditionalHINT(4, 2, hidden=16, depth=4, ndim=2), (4, 4, 16, 16), (4, 2, 16, 16)),
}


def _build(spec, device="cpu", seed=0):
    make, x_shape, c_shape = spec
    torch.manual_seed(seed)
    module = randomize_parameters_(make(), 0.05, seed=seed).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(x_shape, generator=gen).to(device)
    c = None if c_shape is None else torch.randn(c_shape, generator=gen).to(device)
    with torch.no_grad():
        module(x, c)  # data-dependent initialisation outside the comparison
    return module, x, c


def _gradients(module, x, c, dtype, saving, backward_inside=False):
    """Every gradient of a maximum-likelihood-like loss; the forward under autocast, the backward
    outside it (the standard pattern) unless ``backward_inside``."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    c = None if c is None else c.clone().requires_grad_(True)
    device_type = x.device.type
    with invnet.memory_saving(saving):
        with torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            z, logdet = module(x, c)
            loss = 0.5 * z.pow(2).sum() - logdet.sum() + z.sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
    found = [x.grad] + ([] if c is None else [c.grad])
    found += [p.grad for p in module.parameters() if p.requires_grad]
    return [torch.zeros(()) if g is None else g.detach().double().cpu() for g in found]


def _relative_difference(a, b):
    num = sum(float((u - v).pow(2).sum()) for u, v in zip(a, b))
    den = sum(float(v.pow(2).sum()) for v in b)
    return (num / den) ** 0.5


def _on_off(spec, dtype, device="cpu"):
    """Relative gradient differences: memory saving on against off (both under autocast), and
    off under autocast against off in float32."""
    module, x, c = _build(spec, device=device)
    on = _gradients(module, x, c, dtype, saving=True)
    off = _gradients(module, x, c, dtype, saving=False)
    full = _gradients(module, x, c, None, saving=False)
    return _relative_difference(on, off), _relative_difference(off, full)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_gradients_with_memory_saving_match_plain_autograd_under_autocast(name, dtype):
    on_off, _ = _on_off(BLOCKS[name], dtype)
    assert on_off <= 1e-4


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_gradients_with_memory_saving_match_plain_autograd_under_autocast(name, dtype):
    on_off, low_effect = _on_off(NETWORKS[name], dtype)
    assert on_off <= NETWORK_UNITS[dtype] * UNIT_ROUNDOFF[dtype]
    assert on_off <= NETWORK_RATIO[dtype] * low_effect
    # not vacuous: the conditioners really ran in low precision (the gradients moved from float32)
    assert low_effect > 0.5 * UNIT_ROUNDOFF[dtype]


@pytest.mark.parametrize("name", list(NETWORKS))
def test_standard_pattern_backward_outside_autocast_equals_backward_inside(name):
    net, x, c = _build(NETWORKS[name])
    outside = _gradients(net, x, c, torch.bfloat16, saving=True)
    inside = _gradients(net, x, c, torch.bfloat16, saving=True, backward_inside=True)
    assert all(torch.equal(a, b) for a, b in zip(outside, inside))


@pytest.mark.parametrize("name", PURE_ARITHMETIC)
def test_invertible_arithmetic_is_untouched_by_autocast(name):
    block, x, c = _build(BLOCKS[name])
    with torch.no_grad():
        y, logdet = block(x, c)
        x_rec, _ = block.inverse(y, c)
        for dtype in LOW:
            with torch.autocast("cpu", dtype=dtype):
                y_low, logdet_low = block(x, c)
                x_rec_low, _ = block.inverse(y, c)
            assert y_low.dtype == logdet_low.dtype == torch.float32
            assert torch.equal(y_low, y) and torch.equal(logdet_low, logdet) and torch.equal(x_rec_low, x_rec)


def test_couplings_run_the_conditioner_in_low_precision_and_the_affine_map_in_float32():
    block, x, _ = _build(BLOCKS["affine"])
    with torch.no_grad():
        y, logdet = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_low, logdet_low = block(x)
            x_rec = block.inverse(y_low)[0]
    assert y_low.dtype == logdet_low.dtype == x_rec.dtype == torch.float32
    passive = block.n_passive
    assert torch.equal(y_low[:, :passive], x[:, :passive])  # copied, never rounded
    assert not torch.equal(y_low, y)  # the conditioner did run in bfloat16
    # the rebuild under the same state is float32-exact, not bfloat16-exact
    assert float((x_rec - x).abs().max()) < 1e-5 * float(x.abs().max())


def test_pinned_block_runs_its_conditioner_in_full_precision():
    block, x, _ = _build(BLOCKS["affine"])
    with torch.no_grad():
        y, _ = block(x)
        pin_full_precision(block)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_pinned, _ = block(x)
        pin_full_precision(block, pinned=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_unpinned, _ = block(x)
    assert torch.equal(y_pinned, y) and not torch.equal(y_unpinned, y)


def test_float64_networks_are_left_alone_by_autocast():
    net, x, c = _build(NETWORKS["conditional_glow"])
    net, x, c = net.double(), x.double(), c.double()
    plain = _gradients(net, x, c, None, saving=True)
    under_autocast = _gradients(net, x, c, torch.bfloat16, saving=True)
    reference = _gradients(net, x, c, torch.bfloat16, saving=False)
    assert _relative_difference(under_autocast, plain) == 0.0
    assert _relative_difference(under_autocast, reference) < 1e-12


def _fp16_step(net, x, saving, scaler=None, dtype=torch.float16):
    """One float16 step of a maximum-likelihood loss (the trainer's pattern when ``scaler`` is
    given); returns the unscaled gradients and whether the optimizer changed the parameters."""
    net.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    with invnet.memory_saving(saving):
        with torch.autocast("cpu", dtype=dtype or torch.float16, enabled=dtype is not None):
            z, logdet = net(x)
            loss = (0.5 * z.pow(2).sum() - logdet.sum()) / x.numel()
        (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is None:
        return [p.grad.detach().double().clone() for p in net.parameters()], False
    scaler.unscale_(opt)
    grads = [p.grad.detach().double().clone() for p in net.parameters()]
    before = [p.detach().clone() for p in net.parameters()]
    scaler.step(opt)
    scaler.update()
    changed = any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
    return grads, changed


def test_float16_with_gradient_scaling_passes_scaled_gradients_through_the_bridge():
    net, x, _ = _build(NETWORKS["glow"])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    scaled = {}
    for saving in (True, False):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        scaled[saving], changed = _fp16_step(net, x, saving, scaler)
        assert changed and scaler.get_scale() == 2.0**12  # finite: the step was taken
        net.load_state_dict(state)
    # the bridge is linear in the cotangents: scaling by 2^12 and unscaling changes the memory-free
    # gradients by float16 underflow only (measured 0.7 u), as it does plain autograd's
    unscaled = _fp16_step(net, x, True)[0]
    assert _relative_difference(scaled[True], unscaled) <= 2 * UNIT_ROUNDOFF[torch.float16]
    low_effect = _relative_difference(_fp16_step(net, x, False)[0], _fp16_step(net, x, False, dtype=None)[0])
    on_off = _relative_difference(scaled[True], scaled[False])
    assert on_off <= NETWORK_UNITS[torch.float16] * UNIT_ROUNDOFF[torch.float16]
    assert on_off <= NETWORK_RATIO[torch.float16] * low_effect
    # an overflowing scale makes inf/nan gradients: the scaler sees them, skips the step and
    # backs off; the bridge neither raises nor hides them
    for saving in (True, False):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**80)
        grads, changed = _fp16_step(net, x, saving, scaler)
        assert not changed and scaler.get_scale() < 2.0**80
        assert any(not bool(torch.isfinite(g).all()) for g in grads)


def test_autocast_state_is_captured_per_device_type():
    with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
        cpu = AutocastState.capture("cpu")
    assert (cpu.device_type, cpu.enabled, cpu.dtype, cpu.cache_enabled) == ("cpu", True, torch.float16, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        other = AutocastState.capture("cuda")  # CPU autocast says nothing about CUDA tensors
    assert not other.enabled


def test_memory_saving_backward_under_autocast_grows_with_depth_by_the_parameter_gradients_only():
    from invnet.core.memory_trace import trace_live_bytes

    def peak_and_parameter_bytes(depth):
        torch.manual_seed(0)
        flow = Glow(2, hidden=32, levels=2, depth=depth, ndim=2, conv1x1="lu")
        x = torch.randn(8, 2, 32, 32)
        flow(x)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                z, logdet = flow(x)
                loss = 0.5 * z.pow(2).sum() - logdet.sum()
            loss.backward()

        return trace_live_bytes(step).peak_bytes, sum(p.numel() * p.element_size() for p in flow.parameters())

    (shallow, params_shallow), (deep, params_deep) = peak_and_parameter_bytes(2), peak_and_parameter_bytes(8)
    # the .grad buffers of the added steps, nothing else: no activations, and no low-precision
    # weight copies kept by autocast's cast cache (with the cache on in the backward: 2.4x)
    assert deep - shallow <= 1.05 * (params_deep - params_shallow)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none present)")


@cuda
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_cuda_network_gradients_with_memory_saving_match_plain_autograd_under_autocast(name, dtype):
    on_off, low_effect = _on_off(NETWORKS[name], dtype, device="cuda")
    assert on_off <= NETWORK_UNITS[dtype] * UNIT_ROUNDOFF[dtype]
    assert on_off <= NETWORK_RATIO[dtype] * low_effect


@cuda
def test_cuda_standard_pattern_and_float32_invertible_arithmetic():
    net, x, c = _build(NETWORKS["conditional_glow"], device="cuda")
    outside = _gradients(net, x, c, torch.bfloat16, saving=True)
    inside = _gradients(net, x, c, torch.bfloat16, saving=True, backward_inside=True)
    assert _relative_difference(outside, inside) <= 8 * UNIT_ROUNDOFF[torch.bfloat16]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        z, logdet = net(x, c)
    assert z.dtype == logdet.dtype == torch.float32
    block, x, _ = _build(BLOCKS["conv1x1"], device="cuda")
    with torch.no_grad():
        y = block(x)[0]
        with torch.autocast("cuda", dtype=torch.float16):
            assert torch.equal(block(x)[0], y)
