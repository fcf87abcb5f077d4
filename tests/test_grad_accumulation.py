"""Gradient accumulation over micro-batches (``.grad`` kept between backward passes): the
memory-free backward adds each block's parameter gradients into ``.grad`` as it finishes, so no
second copy of all gradients is alive; hooks still fire once per parameter and backward."""
import pytest
import torch

import invnet
from invnet.core.checks import randomize_parameters_, relative_error
from invnet.core.memory_trace import trace_live_bytes
from invnet.networks import ConditionalGlow, Glow

D = torch.float64


def glow(depth=2):
    torch.manual_seed(0)
    net = randomize_parameters_(Glow(2, hidden=8, levels=2, depth=depth, ndim=2).to(D), 0.2)
    x = torch.randn(6, 2, 8, 8, dtype=D)
    with torch.no_grad():
        net(x)  # data-dependent initialisation
    return net, x


def loss(net, x, c=None):
    z, ld = net(x, c)
    return 0.5 * (z**2).sum() - ld.sum()


def accumulate(net, x, micro=3, c=None):
    net.zero_grad(set_to_none=True)
    for xs, cs in zip(x.chunk(micro), (c.chunk(micro) if c is not None else [None] * micro)):
        loss(net, xs, cs).backward()
    return [p.grad.clone() for p in net.parameters()]


def errors(a, b):
    return max(relative_error(u, v, 1e-12) for u, v in zip(a, b))


# "1GB": the first micro-batch measures, the others keep every unit in segments (unlimited is
# plain autograd itself)
@pytest.mark.parametrize("budget", [None, "unlimited", "1GB"])
def test_accumulated_gradients_match_plain_autograd(budget):
    net, x = glow()
    with invnet.memory_saving(False):
        reference = accumulate(net, x)
    with invnet.memory_budget(budget):
        got = accumulate(net, x)
    assert errors(got, reference) <= 1e-10


def test_conditional_accumulation_and_zero_grad_without_none():
    torch.manual_seed(1)
    net = randomize_parameters_(ConditionalGlow(2, 2, hidden=8, levels=2, depth=2, ndim=1).to(D), 0.2)
    x, c = torch.randn(4, 2, 8, dtype=D), torch.randn(4, 2, 8, dtype=D)
    with invnet.memory_saving(False):
        reference = accumulate(net, x, micro=2, c=c)
    net.zero_grad(set_to_none=False)  # zeroed buffers kept: every micro-batch adds in place
    for xs, cs in zip(x.chunk(2), c.chunk(2)):
        loss(net, xs, cs).backward()
    assert errors([p.grad for p in net.parameters()], reference) <= 1e-10


def test_tensor_hooks_fire_once_per_backward_and_see_the_gradient():
    net, x = glow()
    with invnet.memory_saving(False):
        parts = [[g.clone() for g in torch.autograd.grad(loss(net, xs), list(net.parameters()))]
                 for xs in x.chunk(2)]
    seen = {i: [] for i, _ in enumerate(net.parameters())}
    for i, p in enumerate(net.parameters()):
        p.register_hook(lambda g, i=i: seen[i].append(g.clone()))
    net.zero_grad(set_to_none=True)
    for xs in x.chunk(2):
        loss(net, xs).backward()
    for i in seen:
        assert len(seen[i]) == 2
        assert errors(seen[i], [parts[0][i], parts[1][i]]) <= 1e-10


def test_post_accumulate_hooks_fire_once_with_the_complete_grad():
    net, x = glow()
    with invnet.memory_saving(False):
        reference = accumulate(net, x, micro=2)
    calls = {i: [] for i, _ in enumerate(net.parameters())}
    for i, p in enumerate(net.parameters()):
        p.register_post_accumulate_grad_hook(lambda t, i=i: calls[i].append(t.grad.clone()))
    got = accumulate(net, x, micro=2)
    assert errors(got, reference) <= 1e-10
    for i in range(len(list(net.parameters()))):
        assert len(calls[i]) == 2
        assert relative_error(calls[i][1], reference[i], 1e-12) <= 1e-10  # .grad final when it fires


def test_autograd_grad_and_backward_inputs_leave_other_grads_alone():
    net, x = glow()
    accumulate(net, x, micro=1)
    before = [p.grad.clone() for p in net.parameters()]
    xg = x.clone().requires_grad_(True)
    torch.autograd.grad(loss(net, xg), xg)
    loss(net, xg).backward(inputs=[xg])
    assert all(torch.equal(p.grad, b) for p, b in zip(net.parameters(), before))
    first = next(net.parameters())
    loss(net, x).backward(inputs=[first])
    assert all(torch.equal(p.grad, b) for p, b in list(zip(net.parameters(), before))[1:])
    assert not torch.equal(first.grad, before[0])


def test_accumulating_step_peak_does_not_grow_with_the_parameters():
    """Live tensor bytes of a backward with ``.grad`` already there (accumulation), counted
    exactly: flat in depth, while the parameters grow fourfold."""
    peaks, params = [], []
    for depth in (2, 8):
        net, x = glow(depth)
        loss(net, x).backward()
        existing = list(net.parameters()) + [p.grad for p in net.parameters()]
        peaks.append(trace_live_bytes(lambda net=net, x=x: loss(net, x).backward(), preexisting=existing).peak_bytes)
        params.append(sum(p.numel() * p.element_size() for p in net.parameters()))
    assert params[1] >= 3.5 * params[0]
    assert peaks[1] - peaks[0] <= 0.1 * (params[1] - params[0])
