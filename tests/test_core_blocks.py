"""Every block of the core, in every ndim: invertibility, logdet against a brute-force Jacobian,
and hand-written backward against plain autograd (float64)."""
import pytest
import torch

import invnet
from invnet.core.checks import gradient_error, invertibility_error, logdet_error, randomize_parameters_
from invnet.layers import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    ChannelPermutation,
    Conv1x1,
    HaarSqueeze,
    LeakyReLU,
    Logit,
    Sigmoid,
    SplineCoupling,
    Squeeze,
)

D = torch.float64
SPACE = {0: (), 1: (8,), 2: (4, 8), 3: (4, 4, 4)}


def make(name, nd, channels=5, cond=3):
    return {
        "actnorm": lambda: ActNorm(channels),
        "conv1x1_householder": lambda: Conv1x1(channels),
        "conv1x1_lu": lambda: Conv1x1(channels, "lu"),
        "affine": lambda: AffineCoupling(channels, 8, nd),
        "affine_cond": lambda: AffineCoupling(channels, 8, nd, cond_channels=cond, swap=True),
        "additive": lambda: AdditiveCoupling(channels, 8, nd),
        "additive_cond": lambda: AdditiveCoupling(channels, 8, nd, cond_channels=cond),
        "spline": lambda: SplineCoupling(channels, 8, nd, bins=4, tail_bound=2.0),
        "spline_cond": lambda: SplineCoupling(channels, 8, nd, cond_channels=cond, swap=True, bins=5),
        "leaky": lambda: LeakyReLU(0.4),
        "sigmoid": lambda: Sigmoid(),
        "permutation": lambda: ChannelPermutation(channels, "random", seed=3),
        "squeeze": lambda: Squeeze(),
        "squeeze_patch": lambda: Squeeze("patch"),
        "haar": lambda: HaarSqueeze(),
    }[name]().to(D)


BLOCKS = ["actnorm", "conv1x1_householder", "conv1x1_lu", "affine", "affine_cond", "additive",
          "additive_cond", "spline", "spline_cond", "leaky", "sigmoid", "permutation", "squeeze", "squeeze_patch",
          "haar"]
# Spline parameters enter through softmax and exp: noise of 0.3 on every weight makes log-slopes
# beyond -15, where any inverse loses digits to the map's conditioning (tests/test_spline.py
# checks the inverse's error against that conditioning instead).
NOISE = {"spline": 0.1, "spline_cond": 0.1}
CASES = [(b, nd) for b in BLOCKS for nd in range(4) if not (b.startswith(("squeeze", "haar")) and nd == 0)]


def inputs(name, nd, channels=5, cond=3):
    x = torch.randn(3, channels, *SPACE[nd], dtype=D)
    c = torch.randn(3, cond, *SPACE[nd], dtype=D) if name.endswith("_cond") else None
    return x, c


@pytest.mark.parametrize("name,nd", CASES)
def test_invertible_and_exact_logdet(name, nd):
    block = randomize_parameters_(make(name, nd), NOISE.get(name, 0.3))
    x, c = inputs(name, nd)
    assert invertibility_error(block, x, c) <= 1e-12
    assert logdet_error(block, x, c) <= 1e-10


@pytest.mark.parametrize("name,nd", CASES)
def test_handwritten_backward_matches_autograd(name, nd):
    block = randomize_parameters_(make(name, nd), NOISE.get(name, 0.3))
    x, c = inputs(name, nd)
    block(x, c)  # data-dependent init first, so both modes see the same parameters
    assert gradient_error(block, x, c) <= 1e-10
    assert gradient_error(block, x, c, inverse=True) <= 1e-10


def test_logit_is_sigmoid_inverse():
    x = torch.rand(4, 3, 5, dtype=D) * 0.98 + 0.01
    logit = Logit()
    assert invertibility_error(logit, x) <= 1e-12
    assert logdet_error(logit, x) <= 1e-10
    assert gradient_error(logit, x) <= 1e-10
    y, ld = logit(x)
    x2, ld2 = Sigmoid()(y)
    assert torch.allclose(x2, x, atol=1e-14) and torch.allclose(ld2, -ld, atol=1e-12)


@pytest.mark.parametrize("nd", [0, 1, 2, 3])
def test_mixed_chain_with_condition(nd):
    """A chain mixing every block, conditional and not, weighting output and logdet arbitrarily."""
    x, c = inputs("x_cond", nd, channels=6, cond=2)
    blocks = [ActNorm(6), Conv1x1(6), AffineCoupling(6, 8, nd, cond_channels=2), LeakyReLU(0.5),
              Conv1x1(6, "lu"), AdditiveCoupling(6, 8, nd, cond_channels=2, swap=True), ChannelPermutation(6)]
    if nd > 0:
        blocks += [HaarSqueeze(), ActNorm(6 * 2**nd), Squeeze(), Conv1x1(6 * 4**nd)]
    flow = randomize_parameters_(invnet.Chain(*blocks).to(D), 0.2)
    flow(x, c)
    assert invertibility_error(flow, x, c) <= 1e-12
    assert gradient_error(flow, x, c) <= 1e-10
    assert gradient_error(flow, x, c, inverse=True) <= 1e-10
    if nd <= 1:
        assert logdet_error(flow, x, c) <= 1e-9


def test_vector_condition_broadcasts_over_space():
    block = randomize_parameters_(AffineCoupling(4, 8, 2, cond_channels=3).to(D), 0.3)
    x = torch.randn(2, 4, 4, 4, dtype=D)
    c = torch.randn(2, 3, dtype=D)
    assert invertibility_error(block, x, c) <= 1e-12
    assert gradient_error(block, x, c) <= 1e-10


def test_odd_channel_counts_split_unequally():
    block = AffineCoupling(5, 8, 0)
    assert (block.n_passive, block.n_active) == (2, 3)
    block = AffineCoupling(5, 8, 0, swap=True)
    x = torch.randn(3, 5, dtype=D)
    randomize_parameters_(block.to(D), 0.3)
    y, _ = block(x)
    assert torch.equal(y[:, 3:], x[:, 3:])  # the last 2 channels are passive


def test_squeeze_patterns_are_permutations():
    x = torch.arange(2 * 2 * 4 * 4 * 4, dtype=D).reshape(2, 2, 4, 4, 4)
    for pattern in ("checkerboard", "patch"):
        y, _ = Squeeze(pattern)(x)
        assert y.shape == (2, 16, 2, 2, 2)
        assert torch.equal(torch.sort(y.flatten()).values, x.flatten())
    y, _ = Squeeze("patch")(torch.arange(16.).reshape(1, 1, 4, 4))
    assert y[0, 1].tolist() == [[2.0, 3.0], [6.0, 7.0]]  # top-right quadrant


def test_haar_low_pass_is_scaled_mean():
    x = torch.randn(2, 3, 8, 8, dtype=D)
    y, _ = HaarSqueeze()(x)
    low = y[:, ::4]
    expected = torch.nn.functional.avg_pool2d(x, 2) * 2
    assert torch.allclose(low, expected, atol=1e-12)
    assert torch.allclose((y**2).sum(), (x**2).sum())  # orthonormal


def test_actnorm_initialises_from_first_batch_forward_and_inverse():
    x = 3 * torch.randn(64, 4, 10, dtype=D) + 2
    an = ActNorm(4).to(D)
    y, _ = an(x)
    assert torch.allclose(y.mean((0, 2)), torch.zeros(4, dtype=D), atol=1e-10)
    assert torch.allclose(y.std((0, 2), unbiased=False), torch.ones(4, dtype=D), atol=1e-5)
    an2 = ActNorm(4).to(D)
    x2, _ = an2.inverse(x)
    assert an2.initialized
    assert torch.allclose(x2.mean((0, 2)), torch.zeros(4, dtype=D), atol=1e-10)
    assert torch.allclose(x2.std((0, 2), unbiased=False), torch.ones(4, dtype=D), atol=1e-5)


def test_householder_is_orthogonal_and_lu_logdet_needs_no_dense_determinant():
    conv = Conv1x1(7).to(D)
    w = conv.weight()
    assert torch.allclose(w @ w.T, torch.eye(7, dtype=D), atol=1e-12)
    lu = randomize_parameters_(Conv1x1(7, "lu").to(D), 0.3)
    assert torch.allclose(lu.log_diag.sum(), torch.linalg.slogdet(lu.weight())[1], atol=1e-12)
    assert torch.allclose(lu.weight_inverse() @ lu.weight(), torch.eye(7, dtype=D), atol=1e-12)
