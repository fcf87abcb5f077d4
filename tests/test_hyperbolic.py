"""Leapfrog (hyperbolic) layer and network."""
import pytest
import torch

import invnet
from invnet.core.checks import gradient_error, invertibility_error, logdet_error, randomize_parameters_, saved_bytes
from invnet.layers import HyperbolicLayer, TiedConvResidual
from invnet.networks import Hyperbolic

D = torch.float64
SPACE = {0: (), 1: (6,), 2: (4, 4), 3: (2, 2, 2)}


@pytest.mark.parametrize("ndim", [0, 1, 2, 3])
@pytest.mark.parametrize("activation", ["tanh", "leaky_relu"])
def test_layer_exact(ndim, activation):
    layer = randomize_parameters_(HyperbolicLayer(4, hidden=5, ndim=ndim, step=0.7, activation=activation).double())
    x = torch.randn((2, 4) + SPACE[ndim], dtype=D)
    assert invertibility_error(layer, x) < 1e-12
    assert logdet_error(layer, x) < 1e-10  # brute-force slogdet is 0: volume preserving
    assert gradient_error(layer, x) < 1e-10
    assert gradient_error(layer, x, inverse=True) < 1e-10


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_tied_residual_uses_the_adjoint(ndim):
    """K^T in the residual is the exact adjoint of K: the Jacobian of F is symmetric."""
    f = TiedConvResidual(2, 3, ndim).double()
    u = torch.randn((1, 2) + SPACE[ndim], dtype=D)
    jac = torch.autograd.functional.jacobian(lambda v: f(v).reshape(-1), u).reshape(u.numel(), u.numel())
    assert torch.allclose(jac, jac.T, atol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_network_exact_with_squeezes(ndim):
    net = randomize_parameters_(Hyperbolic(2, ndim=ndim, layers=2, stages=2, hidden=3).double())
    x = torch.randn((2, 2) + (4,) * ndim, dtype=D)
    assert invertibility_error(net, x) < 1e-12
    assert gradient_error(net, x) < 1e-10
    y, logdet = net(x)
    assert y.shape == (2, 2 * 2**ndim) + (2,) * ndim and logdet.abs().max() == 0


def test_network_logdet_brute_force_2d():
    net = randomize_parameters_(Hyperbolic(2, ndim=2, layers=2, stages=2, hidden=3).double())
    assert logdet_error(net, torch.randn(1, 2, 4, 4, dtype=D)) < 1e-10


def test_memory_flat_in_depth():
    x = torch.randn(2, 4, 8, 8, dtype=D, requires_grad=True)

    def count(layers, saving):
        net = Hyperbolic(4, ndim=2, layers=layers, hidden=4).double()
        with invnet.memory_saving(saving):
            return saved_bytes(lambda: net(x))

    assert count(2, True) == count(10, True)
    assert count(10, False) > 3 * count(2, True)


def test_bad_inputs():
    with pytest.raises(ValueError, match="even"):
        HyperbolicLayer(3)
    with pytest.raises(ValueError, match="step"):
        HyperbolicLayer(4, step=0)
    with pytest.raises(ValueError, match="activation"):
        HyperbolicLayer(4, activation="softplus")
    with pytest.raises(ValueError, match="odd"):
        HyperbolicLayer(4, kernel_size=2)
    with pytest.raises(ValueError, match="ndim"):
        Hyperbolic(4, ndim=0, stages=2)
    net = Hyperbolic(2, ndim=2, stages=2, layers=1, hidden=2)
    with pytest.raises(ValueError, match="even space sizes"):
        net(torch.zeros(1, 2, 5, 4))
    with pytest.raises(ValueError, match="2 channels"):
        net(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="space dimension"):
        net(torch.zeros(1, 2, 4, 4, 4))
