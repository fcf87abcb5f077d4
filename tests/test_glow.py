"""Glow: invertibility, logdet, memory-free gradients, latent structure, bad input."""
import pytest
import torch

import invnet
from invnet.core.checks import (
    gradient_error,
    invertibility_error,
    logdet_error,
    randomize_parameters_,
    saved_bytes,
)
from invnet.networks import Glow

D64 = torch.float64

# (ndim, channels, levels, space) small enough for a brute-force Jacobian
CASES = [(0, 3, 1, ()), (0, 5, 2, ()), (1, 1, 2, (8,)), (1, 3, 2, (4,)), (2, 1, 2, (4, 4)), (3, 1, 1, (2, 2, 2))]


def _net(ndim, channels, levels, squeeze="haar", **kw):
    net = Glow(channels, hidden=6, levels=levels, depth=2, ndim=ndim, squeeze=squeeze, **kw).double()
    net(torch.randn(4, channels, *([8] * ndim), dtype=D64))  # ActNorm init
    return randomize_parameters_(net, 0.2)


@pytest.mark.parametrize("ndim,channels,levels,space", CASES)
def test_invertible_and_logdet_matches_brute_force(ndim, channels, levels, space):
    net = _net(ndim, channels, levels)
    x = torch.randn(2, channels, *space, dtype=D64)
    assert invertibility_error(net, x) < 1e-12
    assert logdet_error(net, x) < 1e-10


@pytest.mark.parametrize("squeeze", ["checkerboard", "patch"])
def test_other_squeezes(squeeze):
    net = _net(2, 2, 2, squeeze=squeeze)
    x = torch.randn(2, 2, 4, 4, dtype=D64)
    assert invertibility_error(net, x) < 1e-12
    assert logdet_error(net, x) < 1e-10


@pytest.mark.parametrize(
    "ndim,channels,levels,space", [(0, 5, 2, ()), (1, 3, 3, (8,)), (2, 1, 2, (8, 8)), (3, 2, 1, (4, 4, 4))]
)
def test_memory_saving_gradients_equal_plain_autograd(ndim, channels, levels, space):
    net = _net(ndim, channels, levels)
    x = torch.randn(3, channels, *space, dtype=D64)
    assert gradient_error(net, x) < 1e-10
    assert gradient_error(net, x, inverse=True) < 1e-10


def test_explicit_backward_matches_autograd():
    net = _net(2, 1, 2)
    x = torch.randn(2, 1, 8, 8, dtype=D64, requires_grad=True)
    with invnet.memory_saving(False):
        z, ld = net(x)
    dz, dld = torch.randn_like(z), torch.randn_like(ld)
    gx, *gp = torch.autograd.grad([z, ld], [x] + list(net.parameters()), [dz, dld])
    res = net.backward(z.detach(), dz, dld)
    assert torch.allclose(res.x, x.detach(), atol=1e-12, rtol=0)
    assert torch.allclose(res.dx, gx, atol=1e-10, rtol=1e-10)
    for p, g in zip(net.parameters(), gp):
        assert torch.allclose(p.grad, g, atol=1e-10, rtol=1e-10)


def test_saved_bytes_flat_in_depth():
    def bytes_for(depth):
        net = Glow(2, hidden=8, levels=2, depth=depth, ndim=2).double()
        x = torch.randn(2, 2, 16, 16, dtype=D64, requires_grad=True)
        return saved_bytes(lambda: net.log_prob(x).sum())

    b2, b8 = bytes_for(2), bytes_for(8)
    x_bytes = 2 * 2 * 16 * 16 * 8
    assert b8 == b2
    assert b8 <= 4 * x_bytes  # z (and small per-sample terms), not depth x activations


def test_latent_split_and_merge_roundtrip_and_shapes():
    net = Glow(3, hidden=8, levels=3, depth=1, ndim=2)
    z = torch.randn(2, 3, 16, 16)
    parts = net.split_latent(z)
    assert [tuple(p.shape) for p in parts] == [(2, 6, 8, 8), (2, 12, 4, 4), (2, 48, 2, 2)]
    assert sum(p[0].numel() for p in parts) == z[0].numel()
    assert torch.allclose(net.merge_latent(parts), z, atol=1e-6)
    with pytest.raises(ValueError, match="3 scales"):
        net.merge_latent(parts[:2])


def test_stateless_inverse_and_sampling_without_forward():
    net = Glow(2, hidden=8, levels=2, depth=2, ndim=1)
    x = net.sample(3, shape=(2, 12))  # first call ever is an inverse
    assert x.shape == (3, 2, 12)
    z = torch.randn(2, 2, 20)  # another size, no forward in between
    assert torch.allclose(net(net.inverse(z)[0])[0], z, atol=1e-5)
    vec = Glow(5, hidden=8, levels=1, depth=2, ndim=0)
    assert vec.sample(4).shape == (4, 5)


def test_bad_input_errors():
    net = Glow(3, hidden=8, levels=3, depth=1, ndim=2)
    with pytest.raises(ValueError, match=r"divisible by 2\^3 = 8.*12"):
        net(torch.randn(1, 3, 12, 16))
    with pytest.raises(ValueError, match="3 channels, got 2"):
        net(torch.randn(1, 2, 16, 16))
    with pytest.raises(ValueError, match="space dimension"):
        net(torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="channels >= 2 for ndim=0"):
        Glow(1, hidden=8, levels=1, depth=1, ndim=0)
    with pytest.raises(ValueError, match="too few to split"):
        Glow(3, hidden=8, levels=2, depth=1, ndim=0)
    with pytest.raises(ValueError, match="squeeze must be one of"):
        Glow(3, squeeze="wavelet")
    with pytest.raises(ValueError, match="sample needs shape"):
        net.sample(2)


def test_convolutions_never_pad_themselves_and_zero_pads_are_modules():
    from invnet.layers import ZeroPad
    from invnet.networks import ConditionalGlow, ImageSummary

    net = ConditionalGlow(1, 2, hidden=8, levels=2, depth=1, ndim=3,
                          summary=ImageSummary(1, 2, out_size=(8, 8, 8), hidden=4))
    convs = [m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    assert convs and all(all(p == 0 for p in m.padding) for m in convs)
    reach = [m for m in convs if max(m.kernel_size) > 1]
    assert sum(isinstance(m, ZeroPad) for m in net.modules()) == len(reach)


@pytest.mark.parametrize("squeeze", ["patch", "checkerboard", "haar"])
def test_backward_leaves_the_callers_latent_and_cotangent_untouched(squeeze):
    """The level backward writes rebuilt parts in place; a squeeze that returns a view (1D patch
    order) must not let that write reach the caller's tensors."""
    from invnet.core.checks import randomize_parameters_

    net = randomize_parameters_(Glow(2, 8, levels=2, depth=1, ndim=1, squeeze=squeeze).double(), 0.1)
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    with torch.no_grad():
        z, _ = net(x)
    dz = torch.randn_like(z)
    z0, dz0 = z.clone(), dz.clone()
    x_rec, _, _ = net.backward(z, dz)
    assert torch.equal(z, z0) and torch.equal(dz, dz0)
    assert torch.allclose(x_rec, x, atol=1e-12)
