"""HINTCoupling and ConditionalAffine: exactness of inverse, logdet and hand-written backward."""
import pytest
import torch

import invnet
from invnet.core.checks import gradient_error, invertibility_error, logdet_error, randomize_parameters_, saved_bytes
from invnet.layers import AffineCoupling, ConditionalAffine, HINTCoupling, hint_conditioner_count

F64 = torch.float64


def space(ndim: int) -> tuple[int, ...]:
    return {0: (), 1: (5,), 2: (3, 3), 3: (2, 2, 2)}[ndim]


@pytest.mark.parametrize("ndim", [0, 1, 2, 3])
@pytest.mark.parametrize("channels", [2, 5, 8])
def test_hint_coupling_exact_in_every_ndim(ndim, channels):
    block = randomize_parameters_(HINTCoupling(channels, 6, ndim, cond_channels=2).double(), 0.1)
    x = torch.randn(2, channels, *space(ndim), dtype=F64)
    c = torch.randn(2, 2, *space(ndim), dtype=F64)
    assert invertibility_error(block, x, c) < 1e-12
    assert logdet_error(block, x, c) < 1e-10
    # gradients into x, the condition and every parameter; forward and inverse map
    assert gradient_error(block, x, c) < 1e-10
    assert gradient_error(block, x, c, inverse=True) < 1e-10


def test_hint_coupling_vector_condition_broadcasts_over_space():
    block = randomize_parameters_(HINTCoupling(4, 6, 2, cond_channels=3).double(), 0.1)
    x, c = torch.randn(2, 4, 3, 3, dtype=F64), torch.randn(2, 3, dtype=F64)
    assert invertibility_error(block, x, c) < 1e-12
    assert gradient_error(block, x, c) < 1e-10


def test_recursion_tree_has_one_coupling_per_node():
    for channels, leaf in [(2, 3), (5, 3), (8, 3), (16, 3), (7, 2)]:
        block = HINTCoupling(channels, 4, 0, leaf_channels=leaf)
        n = sum(isinstance(m, AffineCoupling) for m in block.modules())
        assert n == hint_conditioner_count(channels, leaf)
    assert hint_conditioner_count(16) == 15  # a full binary tree down to pairs


def test_jacobian_is_dense_lower_triangular_without_permutations():
    # y_1 = T_1(x_1) never sees x_2: entries above the diagonal vanish; with leaves of 2 channels
    # every entry on and below it is non-zero (every output depends on all inputs before it)
    block = randomize_parameters_(HINTCoupling(4, 8, 0, leaf_channels=2, permute=False).double(), 0.3)
    x = torch.randn(1, 4, dtype=F64)
    with invnet.memory_saving(False):
        jac = torch.autograd.functional.jacobian(lambda v: block(v)[0], x).reshape(4, 4)
    assert torch.all(torch.triu(jac, 1) == 0)
    assert torch.all(torch.tril(jac).abs()[torch.tril(torch.ones(4, 4, dtype=torch.bool))] > 1e-8)


def test_one_conditioner_pass_per_sub_coupling_in_backward():
    block = randomize_parameters_(HINTCoupling(8, 6, 1).double(), 0.1)
    calls = []
    for m in block.modules():
        if isinstance(m, AffineCoupling):
            m.conditioner.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 8, 5, dtype=F64, requires_grad=True)
    y, ld = block(x)
    n_forward = len(calls)
    (y.sum() + ld.sum()).backward()
    assert n_forward == hint_conditioner_count(8)
    assert len(calls) == 2 * n_forward  # exactly one more pass each in the backward


def test_memory_saving_keeps_only_the_output():
    block = randomize_parameters_(HINTCoupling(8, 16, 2).double(), 0.1)
    x = torch.randn(2, 8, 8, 8, dtype=F64, requires_grad=True)
    on = saved_bytes(lambda: block(x)[0])
    with invnet.memory_saving(False):
        off = saved_bytes(lambda: block(x)[0])
    assert on <= 2 * x.numel() * 8  # the output (and no activation of the tree)
    assert off > 10 * on


def test_conditional_affine_exact_with_field_and_vector_conditions():
    for c_shape in [(2, 2, 3, 3), (2, 2)]:
        block = randomize_parameters_(ConditionalAffine(3, 2, 6, 2).double(), 0.1)
        x, c = torch.randn(2, 3, 3, 3, dtype=F64), torch.randn(*c_shape, dtype=F64)
        assert invertibility_error(block, x, c) < 1e-12
        assert logdet_error(block, x, c) < 1e-10
        assert gradient_error(block, x, c) < 1e-10


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="at least 2 channels"):
        HINTCoupling(1, 4, 0)
    with pytest.raises(ValueError, match="leaf_channels"):
        HINTCoupling(4, 4, 0, leaf_channels=1)
    with pytest.raises(ValueError, match="cond_channels >= 1"):
        ConditionalAffine(3, 0, 4, 0)
    block = HINTCoupling(4, 4, 2, cond_channels=2)
    x = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="needs a condition"):
        block(x)
    with pytest.raises(ValueError, match=r"\(2, 2, \*\(4, 4\)\)"):
        block(x, torch.randn(3, 2, 4, 4))  # batch mismatch
    with pytest.raises(ValueError, match="condition c must have shape"):
        block(x, torch.randn(2, 2, 4, 5))  # space mismatch
    with pytest.raises(ValueError, match="expects 4 channels"):
        block(torch.randn(2, 3, 4, 4), torch.randn(2, 2, 4, 4))
