"""The engine: the two faces, the memory-saving switch, flat saved bytes, and bad input."""
import pytest
import torch

import invnet
from invnet.core.checks import randomize_parameters_, saved_bytes
from invnet.layers import ActNorm, AffineCoupling, Conv1x1, HaarSqueeze, Squeeze

D = torch.float64


def glow_like(depth, channels=4, hidden=16, nd=2, cond=0):
    blocks = []
    for _ in range(depth):
        blocks += [ActNorm(channels), Conv1x1(channels), AffineCoupling(channels, hidden, nd, cond_channels=cond)]
    return invnet.Chain(*blocks)


def train_step_saved_bytes(flow, x, enabled):
    def step():
        with invnet.memory_saving(enabled):
            z, logdet = flow(x.requires_grad_(True))
            return (0.5 * (z**2).sum() - logdet.sum())

    return saved_bytes(step)


def test_saved_bytes_flat_in_depth_and_growing_without_memory_saving():
    x = torch.randn(4, 4, 16, 16)
    shallow, deep = glow_like(4), glow_like(32)
    shallow(x), deep(x)  # initialise ActNorm
    saving = [train_step_saved_bytes(f, x.clone(), True) for f in (shallow, deep)]
    plain = [train_step_saved_bytes(f, x.clone(), False) for f in (shallow, deep)]
    assert saving[1] <= 1.10 * saving[0]
    assert plain[1] > 6 * plain[0]  # the switch really takes a different path
    assert saving[1] < plain[1] / 20


def test_loss_backward_matches_plain_autograd_and_reaches_hooks():
    flow = randomize_parameters_(glow_like(3, nd=1, cond=2).to(D), 0.2)
    x = torch.randn(3, 4, 8, dtype=D)
    c = torch.randn(3, 2, 8, dtype=D)
    flow(x, c)
    grads = {}
    for enabled in (True, False):
        flow.zero_grad()
        seen = []
        hook = flow.blocks[2].conditioner.conv_in.weight.register_hook(seen.append)
        xi, ci = x.clone().requires_grad_(), c.clone().requires_grad_()
        with invnet.memory_saving(enabled):
            z, logdet = flow(xi, ci)
            loss = (z**3).mean() - 0.7 * logdet.mean()
        loss.backward()
        hook.remove()
        assert len(seen) == 1
        grads[enabled] = [xi.grad, ci.grad] + [p.grad.clone() for p in flow.parameters()]
    for a, b in zip(grads[True], grads[False]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_explicit_backward_accumulates_grad_like_autograd():
    flow = randomize_parameters_(glow_like(2, nd=2).to(D), 0.2)
    x = torch.randn(2, 4, 4, 4, dtype=D)
    flow(x)
    with torch.no_grad():
        y, logdet = flow(x)
    dy = torch.randn_like(y)
    dld = torch.randn(2, dtype=D)
    flow.zero_grad()
    x_rec, dx, dc = flow.backward(y, dy, dld)
    explicit = [p.grad.clone() for p in flow.parameters()]
    assert dc is None and torch.allclose(x_rec, x, atol=1e-12)
    flow.zero_grad()
    xi = x.clone().requires_grad_()
    with invnet.memory_saving(False):
        y2, ld2 = flow(xi)
    ((y2 * dy).sum() + (ld2 * dld).sum()).backward()
    assert torch.allclose(dx, xi.grad, rtol=1e-10, atol=1e-12)
    for a, p in zip(explicit, flow.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-10, atol=1e-12)


def test_gradient_clipping_and_optimizer_work():
    flow = glow_like(2, nd=2)
    x = torch.randn(8, 4, 8, 8)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        z, logdet = flow(x)
        loss = (0.5 * (z**2).sum((1, 2, 3)) - logdet).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 10.0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_memory_saving_inverse_direction_is_differentiable():
    flow = randomize_parameters_(glow_like(2, nd=1).to(D), 0.2)
    z = torch.randn(3, 4, 8, dtype=D)
    flow(z)
    out = {}
    for enabled in (True, False):
        zi = z.clone().requires_grad_()
        flow.zero_grad()
        with invnet.memory_saving(enabled):
            x, logdet_inv = flow.inverse(zi)
        ((x**2).sum() + logdet_inv.sum()).backward()
        out[enabled] = [zi.grad] + [p.grad.clone() for p in flow.parameters()]
    for a, b in zip(out[True], out[False]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# bad input: a ValueError naming what was expected, before any state changes


def test_wrong_channel_count_leaves_actnorm_uninitialised():
    flow = invnet.Chain(ActNorm(4), Conv1x1(4), AffineCoupling(4, 8, 2))
    with pytest.raises(ValueError, match="expects 4 channels, got 3"):
        flow(torch.randn(2, 3, 4, 4))
    assert not flow.blocks[0].initialized


def test_late_shape_error_is_raised_before_early_blocks_change_state():
    flow = invnet.Chain(ActNorm(2), Squeeze(), ActNorm(8), Squeeze())
    with pytest.raises(ValueError, match="even space sizes, got space shape \\(3, 3\\)"):
        flow(torch.randn(2, 2, 6, 6))
    assert not flow.blocks[0].initialized and not flow.blocks[2].initialized


def test_wrong_number_of_dimensions():
    with pytest.raises(ValueError, match="built for 2 space dimension"):
        AffineCoupling(4, 8, 2)(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="batch, channels"):
        ActNorm(4)(torch.randn(4))
    with pytest.raises(ValueError, match="1 to 3 space dimensions"):
        HaarSqueeze()(torch.randn(2, 4))


def test_condition_of_wrong_shape_or_missing():
    block = AffineCoupling(4, 8, 2, cond_channels=3)
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="needs a condition"):
        block(x)
    with pytest.raises(ValueError, match=r"condition c must have shape \(2, 3, \*\(8, 8\)\)"):
        block(x, torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="condition c must have shape"):
        block(x, torch.randn(2, 2, 8, 8))


def test_non_finite_values_rejected_before_init():
    an = ActNorm(3)
    x = torch.randn(2, 3, 4)
    x[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        an(x)
    assert not an.initialized
    with pytest.raises(ValueError, match="finite"):
        an.inverse(torch.full((2, 3, 4), float("inf")))
    assert not an.initialized


def test_integer_input_and_bad_constructor_arguments():
    with pytest.raises(ValueError, match="floating-point"):
        ActNorm(3)(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 channels"):
        AffineCoupling(1, 8, 0)
    with pytest.raises(ValueError, match="parametrization"):
        Conv1x1(3, "qr")
    with pytest.raises(ValueError, match="pattern"):
        Squeeze("column")
    with pytest.raises(ValueError, match="InvertibleModule"):
        invnet.Chain(torch.nn.Linear(2, 2))


def test_two_networks_do_not_share_state():
    a, b = glow_like(1), glow_like(1)
    a(torch.randn(4, 4, 4, 4))
    assert a.blocks[0].initialized and not b.blocks[0].initialized
