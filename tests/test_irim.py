"""i-RIM coupling, the learned loop and the operator wrappers."""
import numpy as np
import pytest
import torch

import invnet
from invnet.core.checks import gradient_error, invertibility_error, logdet_error, randomize_parameters_, saved_bytes
from invnet.layers import IRIMCoupling
from invnet.networks import LearnedLoop
from invnet.operators import ForwardOperator, adjoint_test, as_operator, misfit_gradient

D = torch.float64


def _matrix(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=D) / n**0.5


def _operators():
    """The same matrix behind the three accepted kinds of operator, on a 2D 4x4 estimate."""
    import pylops

    a = _matrix(10, 16)
    shape = (1, 4, 4)
    callables = as_operator(
        lambda x: x.reshape(x.shape[0], -1) @ a.T,
        adjoint=lambda y: (y @ a).reshape((y.shape[0],) + shape),
        domain_shape=shape, range_shape=(10,),
    )
    return {
        "matrix": as_operator(a, domain_shape=shape),
        "sparse": as_operator(a.to_sparse(), domain_shape=shape),
        "sparse_csr": as_operator(a.to_sparse_csr(), domain_shape=shape),
        "pylops": as_operator(pylops.MatrixMult(a.numpy()), domain_shape=shape),
        "callables": callables,
    }


@pytest.mark.parametrize("kind", ["matrix", "sparse", "sparse_csr", "pylops", "callables"])
def test_operator_wrappers_adjoint_and_agree(kind):
    op = _operators()[kind]
    assert adjoint_test(op) < 1e-12
    ref = _operators()["matrix"]
    x = torch.randn(3, 1, 4, 4, dtype=D)
    assert torch.allclose(op.forward(x), ref.forward(x), atol=1e-13)


def test_pylops_2d_operator_adjoint():
    import pylops

    op = as_operator(pylops.FirstDerivative((6, 5), axis=0), domain_shape=(1, 6, 5), range_shape=(1, 6, 5))
    assert adjoint_test(op) < 1e-12


def test_bad_operators_refused():
    with pytest.raises(ValueError, match="adjoint"):
        as_operator(lambda x: 2 * x, adjoint=lambda y: y, domain_shape=(3,), range_shape=(3,))
    with pytest.raises(ValueError, match="domain_shape"):
        as_operator(_matrix(4, 6), domain_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="adjoint"):
        as_operator(lambda x: x)
    with pytest.raises(ValueError, match="operator must be"):
        as_operator("radon")
    op = as_operator(_matrix(4, 6))
    with pytest.raises(ValueError, match="shape"):
        op.forward(torch.zeros(2, 5, dtype=D))


@pytest.mark.parametrize("kind", ["pylops", "callables"])
def test_misfit_gradient_vjp_matches_autograd(kind):
    op = _operators()[kind]
    a = _matrix(10, 16)
    x = torch.randn(2, 1, 4, 4, dtype=D, requires_grad=True)
    y = torch.randn(2, 10, dtype=D, requires_grad=True)
    w = torch.randn(2, 1, 4, 4, dtype=D)
    gx, gy = torch.autograd.grad((misfit_gradient(op, x, y) * w).sum(), (x, y))
    xr, yr = x.detach().requires_grad_(), y.detach().requires_grad_()
    ref = ((xr.reshape(2, -1) @ a.T - yr) @ a).reshape(2, 1, 4, 4)
    rx, ry = torch.autograd.grad((ref * w).sum(), (xr, yr))
    assert torch.allclose(gx, rx, atol=1e-13) and torch.allclose(gy, ry, atol=1e-13)


def _block_case(ndim):
    """An operator on an estimate with ``ndim`` space dims (0 = vectors) and a matching state."""
    domain = {0: (3,), 1: (1, 6), 2: (1, 4, 4), 3: (1, 2, 2, 2)}[ndim]
    n = int(np.prod(domain))
    op = as_operator(_matrix(7, n), domain_shape=domain)
    channels = domain[0] + 2
    state = torch.randn((2, channels) + domain[1:], dtype=D)
    y = torch.randn(2, 7, dtype=D)
    return op, channels, state, y


@pytest.mark.parametrize("ndim", [0, 1, 2, 3])
def test_irim_coupling_exact(ndim):
    op, channels, s, y = _block_case(ndim)
    block = randomize_parameters_(IRIMCoupling(op, channels, hidden=6).double(), scale=0.3)
    assert invertibility_error(block, s, y) < 1e-12
    assert logdet_error(block, s, y) < 1e-10
    assert gradient_error(block, s, y) < 1e-10
    assert gradient_error(block, s, y, inverse=True) < 1e-10


@pytest.mark.parametrize("kind", ["pylops", "callables"])
@pytest.mark.parametrize("share", [False, True])
def test_learned_loop_gradients_through_any_operator(kind, share):
    op = _operators()[kind]
    loop = randomize_parameters_(LearnedLoop(op, channels=3, iterations=3, hidden=6, share_weights=share).double())
    s = torch.randn(2, 3, 4, 4, dtype=D)
    y = torch.randn(2, 10, dtype=D)
    assert invertibility_error(loop, s, y) < 1e-12
    assert gradient_error(loop, s, y) < 1e-10


def test_learned_loop_gradient_matches_plain_autograd_through_the_misfit():
    """With memory saving off the loop is plain autograd through a torch-visible operator, so it
    checks the closed-form misfit VJP and the hand-written backward together."""
    a = _matrix(10, 16)
    shape = (1, 4, 4)
    plain = ForwardOperator(lambda x: x.reshape(x.shape[0], -1) @ a.T,
                            lambda y: (y @ a).reshape((y.shape[0],) + shape), shape, (10,))
    loop = randomize_parameters_(LearnedLoop(plain, channels=3, iterations=2, hidden=6).double())
    y = torch.randn(2, 10, dtype=D)
    x_true = torch.randn(2, 1, 4, 4, dtype=D)

    def grads(saving):
        loop.zero_grad()
        with invnet.memory_saving(saving):
            ((loop.reconstruct(y) - x_true) ** 2).sum().backward()
        return [p.grad.clone() for p in loop.parameters()]

    for g1, g2 in zip(grads(True), grads(False)):
        assert (g1 - g2).abs().max() <= 1e-10 * g2.abs().max().clamp_min(1e-30)


def test_learned_loop_memory_flat_in_iterations():
    op = _operators()["matrix"]
    y = torch.randn(2, 10, dtype=D)

    def count(iters, saving):
        loop = LearnedLoop(op, channels=3, iterations=iters, hidden=6).double()
        s = loop.initial_state(y).requires_grad_(True)
        with invnet.memory_saving(saving):
            return saved_bytes(lambda: loop(s, y))

    assert count(2, True) == count(8, True)
    assert count(8, False) > 3 * count(2, True)  # the comparison is not void: autograd keeps more


def test_irim_bad_inputs():
    op, channels, s, y = _block_case(2)
    with pytest.raises(ValueError, match="memory"):
        IRIMCoupling(op, channels=1)
    with pytest.raises(ValueError, match="iterations"):
        LearnedLoop(op, channels=3, iterations=0)
    block = IRIMCoupling(op, channels).double()
    with pytest.raises(ValueError, match="observation"):
        block(s)
    with pytest.raises(ValueError, match="observation"):
        block(s, torch.zeros(2, 6, dtype=D))
    with pytest.raises(ValueError, match="space shape"):
        block(torch.zeros(2, channels, 4, 5, dtype=D), y)
    loop = LearnedLoop(op, channels=3, iterations=1)
    with pytest.raises(ValueError, match="observation"):
        loop.reconstruct(torch.zeros(2, 9))
