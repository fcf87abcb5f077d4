"""Invertible U-Net and its parts: learnable downsampling, Inverted, ChannelSubset."""
import pytest
import torch

import invnet
from invnet.core.checks import gradient_error, invertibility_error, logdet_error, randomize_parameters_, saved_bytes
from invnet.layers import ActNorm, ChannelSubset, HaarSqueeze, Inverted, LearnableDownsample
from invnet.networks import InvertibleUNet

D = torch.float64


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_learnable_downsample_exact(ndim):
    down = LearnableDownsample(2, ndim).double()
    x = torch.randn((2, 2) + (4,) * ndim, dtype=D)
    assert torch.allclose(down(x)[0], HaarSqueeze()(x)[0], atol=1e-14)  # starts as Haar
    randomize_parameters_(down, scale=0.3)
    assert not torch.allclose(down(x)[0], HaarSqueeze()(x)[0], atol=1e-3)
    assert invertibility_error(down, x) < 1e-12
    assert gradient_error(down, x) < 1e-10
    assert gradient_error(down, x, inverse=True) < 1e-10
    up = Inverted(down)
    assert gradient_error(up, down(x)[0]) < 1e-10


def test_learnable_downsample_logdet_brute_force():
    down = randomize_parameters_(LearnableDownsample(1, 2).double(), scale=0.3)
    assert logdet_error(down, torch.randn(1, 1, 4, 4, dtype=D)) < 1e-10


def test_channel_subset_exact():
    inner = randomize_parameters_(ActNorm(3).double())
    sub = ChannelSubset(inner, skip=2)
    x = torch.randn(2, 5, 3, dtype=D)
    y, _ = sub(x)
    assert torch.equal(y[:, :2], x[:, :2])
    assert invertibility_error(sub, x) < 1e-12
    assert logdet_error(sub, x) < 1e-10
    assert gradient_error(sub, x) < 1e-10
    assert gradient_error(sub, x, inverse=True) < 1e-10


@pytest.mark.parametrize("ndim,coupling", [(1, "affine"), (2, "additive"), (3, "additive"), (2, "affine")])
def test_iunet_exact(ndim, coupling):
    net = randomize_parameters_(InvertibleUNet(3, ndim=ndim, levels=2, blocks=1, hidden=3, coupling=coupling).double())
    x = torch.randn((2, 3) + (4,) * ndim, dtype=D)
    y, logdet = net(x)
    assert y.shape == x.shape
    assert invertibility_error(net, x) < 1e-12
    assert gradient_error(net, x) < 1e-10
    assert gradient_error(net, x, inverse=True) < 1e-10
    if coupling == "additive":
        assert logdet.abs().max() < 1e-12


def test_iunet_logdet_brute_force():
    net = randomize_parameters_(InvertibleUNet(2, ndim=2, levels=2, blocks=1, hidden=3, coupling="affine").double())
    assert logdet_error(net, torch.randn(1, 2, 4, 4, dtype=D)) < 1e-10


def test_iunet_memory_flat_in_depth():
    x = torch.randn(2, 2, 8, 8, dtype=D, requires_grad=True)

    def count(levels, blocks, saving):
        net = InvertibleUNet(2, ndim=2, levels=levels, blocks=blocks, hidden=4).double()
        with invnet.memory_saving(saving):
            return saved_bytes(lambda: net(x))

    flat = count(1, 1, True)
    assert count(3, 1, True) == flat and count(3, 3, True) == flat
    assert count(3, 3, False) > 3 * flat


def test_bad_inputs():
    with pytest.raises(ValueError, match="2 channels"):
        InvertibleUNet(1)
    with pytest.raises(ValueError, match="coupling"):
        InvertibleUNet(2, coupling="cubic")  # not a key of COUPLINGS
    with pytest.raises(ValueError, match="space dimensions"):
        InvertibleUNet(2, ndim=0)
    net = InvertibleUNet(2, ndim=2, levels=3, blocks=1, hidden=2)
    with pytest.raises(ValueError, match="even space sizes"):
        net(torch.zeros(1, 2, 6, 8))  # 6 -> 3 is odd at the third level
    with pytest.raises(ValueError, match="channels"):
        net(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="skip"):
        ChannelSubset(ActNorm(2), skip=0)
    with pytest.raises(ValueError, match="InvertibleModule"):
        Inverted(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="channels"):
        LearnableDownsample(2, 2)(torch.zeros(1, 3, 4, 4))
