"""The kernel rule of invnet.layers.kernels (exact arithmetic, and no reference convolution kernel
at shapes that used to fall into it, checked through the profiler's op names, which do not depend
on timing), and the host read-backs of a training step (invnet.core.value_checks)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import invnet
from invnet.core.checks import gradient_error, invertibility_error, logdet_error, randomize_parameters_
from invnet.layers import ActNorm, AffineCoupling, ConvConditioner, kernels
from invnet.networks import ConditionalGlow, ConditionalHINT, MultiscaleConditionalHINT

D = torch.float64
REFERENCE_OPS = ("slow_conv3d", "slow_conv2d", "thnn_conv2d", "slow_conv_dilated")
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def op_names(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def reference_ops(names: set[str]) -> set[str]:
    return {n for n in names if any(r in n for r in REFERENCE_OPS)}


@pytest.fixture
def layout_rule_in_float64(monkeypatch):
    """Run rule 2 (channels-last, folding) in float64 too: oneDNN does not compute float64, but
    the layout and fold arithmetic around it can then be held to float64 tolerances."""
    monkeypatch.setattr(kernels, "ONEDNN_DTYPES", kernels.ONEDNN_DTYPES + (D,))


CONV_CASES = [
    # (space, batch, c_in, c_out, kernel) of an already padded input: even and odd lengths, a
    # first axis too short to fold along (3 with kernel 3), pointwise kernels and kernel 5
    (space, batch, cin, cout, k)
    for space in [(9,), (10,), (6, 7), (3, 9), (6, 6, 6), (7, 5, 6), (3, 3, 8), (5, 3, 9)]
    for batch in (1, 2)
    for cin, cout, k in [(1, 3, 3), (3, 2, 3), (2, 4, 1), (2, 3, 5)]
    if min(space) >= k
]


@pytest.mark.parametrize("space,batch,cin,cout,k", CONV_CASES)
def test_conv_rule_is_the_same_map_in_float64(layout_rule_in_float64, space, batch, cin, cout, k):
    x = torch.randn(batch, cin, *space, dtype=D, requires_grad=True)
    w = torch.randn(cout, cin, *(k,) * len(space), dtype=D, requires_grad=True)
    b = torch.randn(cout, dtype=D, requires_grad=True)
    y = kernels.conv(x, w, b)
    y_ref = getattr(F, f"conv{len(space)}d")(x, w, b)
    assert y.shape == y_ref.shape
    g = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, (x, w, b), g)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), g)
    assert (y - y_ref).abs().max() <= 1e-12 * y_ref.abs().max()
    for a, r in zip(grads, grads_ref):
        assert (a - r).abs().max() <= 1e-12 * r.abs().max()


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_rule_float32_matches_pytorch(nd, batch):
    space = {1: (40,), 2: (18, 20), 3: (10, 12, 9)}[nd]
    x = torch.randn(batch, 3, *space, requires_grad=True)
    w = torch.randn(5, 3, *(3,) * nd, requires_grad=True)
    y = kernels.conv(x, w, None)
    y_ref = getattr(F, f"conv{nd}d")(x, w)
    g = torch.randn_like(y_ref)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), g)
    for a, r in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
        assert (a - r).abs().max() <= 1e-5 * r.abs().max()


def test_pointwise_is_a_matrix_product_in_every_layout():
    w, b = torch.randn(4, 3, 1, 1, 1, dtype=D), torch.randn(4, dtype=D)
    x = torch.randn(2, 3, 5, 4, 3, dtype=D)
    ref = F.conv3d(x, w, b)
    for inp in (x, x.contiguous(memory_format=torch.channels_last_3d)):
        assert (kernels.pointwise(inp, w, b) - ref).abs().max() <= 1e-13
    assert (kernels.pointwise(x[:, :, 0, 0, 0], w, None) - ref[:, :, 0, 0, 0] + b).abs().max() <= 1e-13


def test_conv_rejects_mismatched_ranks():
    with pytest.raises(ValueError, match="same rank"):
        kernels.conv(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3), None)


@pytest.mark.parametrize("threads", [1, 2])
@needs_onednn
def test_3d_conditioner_avoids_the_reference_kernel(threads):
    """A 3D conditioner at a shape PyTorch sends to slow_conv3d (batch 1, 4 -> 8 channels, 32^3):
    forward and backward through the kernel rule run on oneDNN only."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        net = ConvConditioner(4, 8, hidden=8, ndim=3, zero_init=False)
        x = torch.randn(1, 4, 32, 32, 32, requires_grad=True)
        padded = torch.randn(1, 4, 34, 34, 34)
        if not kernels.reference_kernel_chosen(padded, net.conv_in.weight, net.conv_in.bias):
            pytest.skip("this PyTorch no longer sends the shape to its reference kernel")
        with kernels.reference_kernels():  # the shape is one that used to be slow
            assert "aten::slow_conv3d_forward" in op_names(lambda: net(x).sum().backward())
        names = op_names(lambda: net(x).sum().backward())
    finally:
        torch.set_num_threads(previous)
    assert not reference_ops(names), sorted(reference_ops(names))
    assert "aten::mkldnn_convolution" in names
    assert "aten::convolution_backward" in names  # the backward ran (on oneDNN, like the forward)


@needs_onednn
def test_3d_coupling_training_step_avoids_the_reference_kernel():
    block = randomize_parameters_(AffineCoupling(8, hidden=8, ndim=3, cond_channels=2), 0.1)
    x, c = torch.randn(1, 8, 16, 32, 32), torch.randn(1, 2, 16, 32, 32)
    names = op_names(lambda: block(x, c)[0].square().sum().backward())
    assert not reference_ops(names), sorted(reference_ops(names))
    assert "aten::mkldnn_convolution" in names


@needs_onednn
def test_2d_conditioner_avoids_the_reference_kernel():
    net = ConvConditioner(3, 4, hidden=6, ndim=2, zero_init=False)
    x = torch.randn(1, 3, 40, 40, requires_grad=True)
    with kernels.reference_kernels():  # 3 x 42 x 42 < PyTorch's threshold: thnn_conv2d
        assert reference_ops(op_names(lambda: net(x).sum().backward()))
    names = op_names(lambda: net(x).sum().backward())
    assert not reference_ops(names), sorted(reference_ops(names))


def test_1d_keeps_pytorchs_choice():
    """1D is rule 3: PyTorch's 1 x L reference kernel is as fast as oneDNN (measured)."""
    x, w = torch.randn(1, 3, 50), torch.randn(4, 3, 3)
    assert torch.equal(kernels.conv(x, w, None), F.conv1d(x, w))


def test_fold_path_keeps_the_conformance_tolerances(layout_rule_in_float64):
    """A 3D coupling on a batch of one (the folded path) in float64: invertibility, logdet against
    the brute-force Jacobian, memory saving on vs off."""
    block = randomize_parameters_(AffineCoupling(4, hidden=6, ndim=3, cond_channels=1), 0.3).to(D)
    x, c = torch.randn(1, 4, 4, 3, 4, dtype=D), torch.randn(1, 1, 4, 3, 4, dtype=D)
    assert invertibility_error(block, x, c) <= 1e-12
    assert logdet_error(block, x, c) <= 1e-10
    assert gradient_error(block, x, c) <= 1e-10


def test_float32_fast_path_memory_saving_matches_plain_autograd():
    block = randomize_parameters_(AffineCoupling(6, hidden=8, ndim=3, cond_channels=2), 0.1)
    x, c = torch.randn(1, 6, 8, 10, 8), torch.randn(1, 2, 8, 10, 8)
    assert gradient_error(block, x, c) <= 1e-5


# -- host read-backs ----------------------------------------------------------------------------
class CountReadBacks(TorchDispatchMode):
    """Counts every op that makes a GPU wait for the host or the host for the GPU: value
    read-backs (``_local_scalar_dense``, behind ``.item()``, ``bool(t)``, ``float(t)``, ``if t:``),
    ops whose output size depends on data, and tensors made from Python data (``lift_fresh``:
    ``torch.tensor([...], device=...)`` is a blocking host-to-device copy)."""

    OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
           torch.ops.aten.masked_select.default, torch.ops.aten.equal.default, torch.ops.aten.lift_fresh.default}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def training_step_read_backs(net, x, c) -> int:
    (-net.log_prob(x, c).mean()).backward()  # warm-up: ActNorm initialises (reads its flag)
    with CountReadBacks() as counter:
        (-net.log_prob(x, c).mean()).backward()
    return counter.count


@pytest.mark.parametrize("name", ["glow", "hint", "multiscale_hint"])
def test_a_training_step_reads_back_once_and_not_at_all_without_value_checks(name):
    if name == "glow":
        net = ConditionalGlow(1, 1, hidden=4, levels=2, depth=3, ndim=3)
        x, c = torch.randn(2, 1, 8, 8, 8), torch.randn(2, 1, 8, 8, 8)
    elif name == "hint":
        net = ConditionalHINT(2, 2, hidden=4, depth=3, ndim=3)
        x, c = torch.randn(2, 2, 8, 8, 8), torch.randn(2, 2, 8, 8, 8)
    else:  # Haar squeezes on both lanes
        net = MultiscaleConditionalHINT(1, 1, hidden=4, levels=2, depth=1, ndim=3)
        x, c = torch.randn(2, 1, 8, 8, 8), torch.randn(2, 1, 8, 8, 8)
    # the one read-back: x and c checked finite together at the top-level call; none per block
    assert training_step_read_backs(net, x, c) == 1
    with invnet.value_checks(False):
        assert training_step_read_backs(net, x, c) == 0


def test_value_checks_switch_is_scoped_and_errors_still_name_the_tensor():
    block = ActNorm(2)
    bad = torch.tensor([[1.0, float("nan")]])
    with pytest.raises(ValueError, match="the condition c must hold only finite values"):
        invnet.layers.AffineCoupling(2, 4, ndim=0, cond_channels=1)(torch.ones(1, 2), bad[:, 1:])
    with invnet.value_checks(False):
        assert not invnet.value_checks_enabled()
        block(bad)  # no error: the check is off
    assert invnet.value_checks_enabled()
    with pytest.raises(ValueError, match="x must hold only finite values"):
        ActNorm(2)(bad)
    with pytest.raises(ValueError, match="strictly inside"):
        invnet.layers.Logit()(torch.tensor([[0.5, 1.5]]))


def test_actnorm_host_flag_follows_loaded_state():
    a, b = ActNorm(3), ActNorm(3)
    a(torch.randn(4, 3))
    assert a.initialized and not b.initialized
    b.load_state_dict(a.state_dict())
    assert b.initialized
    a.load_state_dict(ActNorm(3).state_dict())  # an uninitialised state: initialise again
    assert not a.initialized
