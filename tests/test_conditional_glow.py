"""ConditionalGlow and summary networks: exactness, gradients into c and the summary, bad input."""
import pytest
import torch

import invnet
from invnet.core.checks import (
    gradient_error,
    invertibility_error,
    logdet_error,
    randomize_parameters_,
    relative_error,
)
from invnet.networks import ConditionalGlow, ImageSummary, VectorSummary

D64 = torch.float64


def _net(ndim, channels, cond, levels, vector=False, summary=None, scale=0.2):
    net = ConditionalGlow(channels, cond, hidden=6, levels=levels, depth=2, ndim=ndim,
                          vector_condition=vector, summary=summary).double()
    return randomize_parameters_(net, scale)


@pytest.mark.parametrize("ndim,vector,levels,space", [
    (0, True, 1, ()), (1, False, 2, (4,)), (2, False, 1, (2, 2)), (2, True, 1, (2, 2)), (3, False, 1, (2, 2, 2)),
])
def test_invertible_logdet_and_gradients(ndim, vector, levels, space):
    net = _net(ndim, 2, 3, levels, vector)
    x = torch.randn(2, 2, *space, dtype=D64)
    c = torch.randn(2, 3, dtype=D64) if vector else torch.randn(2, 3, *space, dtype=D64)
    assert invertibility_error(net, x, c) < 1e-12
    assert logdet_error(net, x, c) < 1e-10
    assert gradient_error(net, x, c) < 1e-10  # includes d/dc
    assert gradient_error(net, x, c, inverse=True) < 1e-10


def test_multiscale_field_condition_gradients():
    net = _net(2, 1, 2, 2, scale=0.1)  # 0.2 drives the 32-channel conditioners to large shifts
    x, c = torch.randn(2, 1, 8, 8, dtype=D64), torch.randn(2, 2, 8, 8, dtype=D64)
    assert invertibility_error(net, x, c) < 1e-12
    assert gradient_error(net, x, c) < 1e-10


def _grads_with_summary(net, x, y, saving):
    params = list(net.parameters())
    y = y.clone().requires_grad_(True)
    with invnet.memory_saving(saving):
        loss = -net.log_prob(x, y).sum()
    return torch.autograd.grad(loss, [y] + params)


@pytest.mark.parametrize("kind", ["image", "vector"])
def test_gradients_reach_summary_network(kind):
    if kind == "image":
        summary = ImageSummary(1, 2, out_size=(8, 8), hidden=5)
        net = _net(2, 1, 2, 2, summary=summary)
        x, y = torch.randn(3, 1, 8, 8, dtype=D64), torch.randn(3, 1, 5, 3, dtype=D64)
    else:
        summary = VectorSummary(6, 3, hidden=8)
        net = _net(0, 4, 3, 1, summary=summary)
        x, y = torch.randn(3, 4, dtype=D64), torch.randn(3, 2, 3, dtype=D64)
    on = _grads_with_summary(net, x, y, True)
    off = _grads_with_summary(net, x, y, False)
    assert max(relative_error(a, b) for a, b in zip(on, off)) < 1e-10
    n_summary = len(list(summary.parameters()))
    summary_grads = on[-n_summary:]
    assert all(float(g.abs().max()) > 0 for g in summary_grads)


def test_sampling_with_one_or_many_conditions():
    net = ConditionalGlow(1, 1, hidden=8, levels=2, depth=1, ndim=2)
    c = torch.randn(1, 1, 8, 8)
    assert net.sample(4, c).shape == (4, 1, 8, 8)
    assert net.sample(3, c.expand(3, 1, 8, 8), temperature=0.5).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="one condition per sample"):
        net.sample(3, torch.randn(2, 1, 8, 8))
    vec = ConditionalGlow(3, 2, hidden=8, levels=1, depth=1, ndim=0)
    assert vec.sample(5, torch.randn(1, 2)).shape == (5, 3)


def test_bad_condition_errors():
    net = ConditionalGlow(2, 3, hidden=8, levels=2, depth=1, ndim=2)
    x = torch.randn(2, 2, 8, 8)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 8, 8\).*got \(3, 3, 8, 8\)"):
        net(x, torch.randn(3, 3, 8, 8))  # batch mismatch
    with pytest.raises(ValueError, match=r"shape \(2, 3, 8, 8\).*got \(2, 3, 4, 4\)"):
        net(x, torch.randn(2, 3, 4, 4))  # space mismatch
    with pytest.raises(ValueError, match="needs a condition"):
        net(x)
    with pytest.raises(ValueError, match="cond_channels >= 1"):
        ConditionalGlow(2, 0)
    summary = ImageSummary(1, 3, out_size=(8, 8))
    with pytest.raises(ValueError, match="ImageSummary expects"):
        ConditionalGlow(2, 3, hidden=8, levels=2, depth=1, summary=summary).log_prob(x, torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match="VectorSummary expects observations of 6"):
        VectorSummary(6, 2)(torch.randn(2, 5))
