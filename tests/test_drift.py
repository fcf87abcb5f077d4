"""The reconstruction-drift measurement: exact in float64, per scale and per block, names a badly
conditioned block, and gives a trainer what it needs (thresholds, a remedy, metrics)."""
import warnings

import pytest
import torch

import invnet
import invnet.core.precision  # noqa: F401  (the remedy's code names it)
from invnet.core.drift import (
    ReconstructionDriftError,
    ReconstructionDriftWarning,
    reconstruction_drift,
)
from invnet.layers import ActNorm, AffineCoupling, HaarSqueeze, Inverted
from invnet.networks import HINT, ConditionalHINT, Glow, InvertibleUNet

D = torch.float64


def _glow(dtype=torch.float32, levels=3):
    torch.manual_seed(0)
    return Glow(2, hidden=8, levels=levels, depth=3, ndim=2).to(dtype)


def _ill_condition(coupling: AffineCoupling, log_scale: float = -12.0, shift: float = 1.0) -> None:
    """Make the coupling contract its active half by e^log_scale and shift it by ``shift``:
    y_a = x_a e^{-12} + 1 loses most of x_a's digits to the shift, and the inverse multiplies
    the rounding error back by e^{12} (an exploding inverse)."""
    coupling.clamp = abs(log_scale)
    out = coupling.conditioner.conv_out
    with torch.no_grad():
        n = coupling.n_active
        out.bias[:n] = -1e3 if log_scale < 0 else 1e3  # tanh saturates: s = +-clamp
        out.bias[n:] = shift


def test_untrained_glow_in_float64_rebuilds_to_round_off_at_every_level():
    net = _glow(D)
    x = torch.randn(4, 2, 16, 16, dtype=D)
    report = reconstruction_drift(net, x)
    assert report.error < 1e-14
    assert [s.space_shape for s in report.scales] == [(8, 8), (4, 4), (2, 2)]
    assert all(s.error < 1e-14 for s in report.scales)
    assert all(b.error < 1e-14 for b in report.blocks)
    # every block is named by a module path that leads back to it
    assert len(report.blocks) == 3 * 3 * 3
    for b in report.blocks:
        assert type(net.get_submodule(b.path)).__name__ == b.kind
    assert report.check(warn_above=1e-8, fail_above=1e-4) == "ok"
    assert set(report.as_metrics()) == {
        "reconstruction_error", "reconstruction_error/scale_0", "reconstruction_error/scale_1",
        "reconstruction_error/scale_2", "reconstruction_error/worst_block",
    }


@pytest.mark.parametrize("dtype", [torch.float32, D], ids=str)
def test_badly_conditioned_block_is_named_and_the_trainer_is_told_what_to_do(dtype):
    net = _glow(dtype)
    bad_path = "body.inner.steps.blocks.5"
    bad = net.get_submodule(bad_path)
    assert isinstance(bad, AffineCoupling)
    _ill_condition(bad)
    x = torch.randn(4, 2, 16, 16, dtype=dtype)
    report = reconstruction_drift(net, x)
    assert report.worst.path == bad_path and report.worst.clamp == 12.0
    others = [b.error for b in report.blocks if b.path != bad_path]
    assert report.worst.error > 100 * max(others)
    assert report.scales[1].worst.path == bad_path  # found at its own scale
    # the drift reaches the rebuilt input of the finer scale and of the whole network
    assert report.scales[0].error > 100 * max(others)
    assert report.error > 100 * max(others)
    if dtype == torch.float32:
        assert report.error > 1e-3  # ruinous in float32
        with pytest.raises(ReconstructionDriftError) as err:
            report.check(warn_above=1e-5, fail_above=1e-4)
        message = str(err.value)
        assert bad_path in message and "AffineCoupling" in message and "(now 12)" in message
        assert "pin_full_precision" not in message  # no autocast: float32 already
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = reconstruction_drift(net, x)
        assert low.autocast == torch.bfloat16 and low.worst.path == bad_path
        assert f"pin_full_precision(model.get_submodule({bad_path!r}))" in low.remedy()
        with pytest.warns(ReconstructionDriftWarning, match=bad_path):
            assert report.check(warn_above=1e-5, fail_above=1.0) == "warn"


def test_the_suggested_remedy_is_code_that_runs():
    net = _glow()
    bad_path = "body.steps.blocks.2"
    _ill_condition(net.get_submodule(bad_path))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = reconstruction_drift(net, torch.randn(2, 2, 16, 16))
    assert report.worst.path == bad_path
    code = report.remedy().split("(", 1)[1].rsplit(") or train", 1)[0]
    assert code.startswith("invnet.core.precision.pin_full_precision(")
    eval(code, {"invnet": invnet, "model": net})
    pinned = [m for m in net.modules() if isinstance(m, invnet.InvertibleModule) and not m.autocast_conditioners]
    assert pinned == [net.get_submodule(bad_path)]


def test_non_finite_drift_fails_and_thresholds_are_checked():
    net = _glow(levels=1)
    x = torch.randn(2, 2, 8, 8)
    report = reconstruction_drift(net, x)
    nan_report = type(report)(float("nan"), report.scales, report.blocks)
    with pytest.raises(ReconstructionDriftError):
        nan_report.check(warn_above=1e-3, fail_above=1e-1)
    with pytest.raises(ValueError, match="warn_above"):
        report.check(warn_above=1e-1, fail_above=1e-3)


def test_measurement_leaves_gradients_and_blocks_untouched():
    net = _glow()
    x = torch.randn(2, 2, 16, 16)
    net(x)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    reconstruction_drift(net, x)
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert not any(name in m.__dict__ for m in net.modules() for name in ("_forward", "_inverse", "_vjp"))
    # and training still runs the memory-free backward afterwards
    z, logdet = net(x)
    (0.5 * z.pow(2).sum() - logdet.sum()).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_sum_reduce_is_called_once_on_all_the_squares():
    net = _glow(D, levels=2)
    x = torch.randn(2, 2, 8, 8, dtype=D)
    calls = []

    def fake_allreduce(t):  # two identical ranks: every sum doubles, every ratio stays
        calls.append(t.dtype)
        return 2 * t

    alone, reduced = reconstruction_drift(net, x), reconstruction_drift(net, x, sum_reduce=fake_allreduce)
    assert calls == [torch.float64]
    assert reduced.error == pytest.approx(alone.error, rel=1e-12)
    assert [b.error for b in reduced.blocks] == pytest.approx([b.error for b in alone.blocks], rel=1e-12)


def test_other_networks_conditional_lanes_and_inverted_blocks():
    torch.manual_seed(0)
    cases = [
        (HINT(4, hidden=8, depth=2, ndim=2), torch.randn(2, 4, 8, 8), None),
        (ConditionalHINT(3, 2, hidden=8, depth=2, ndim=0), torch.randn(5, 3), torch.randn(5, 2)),
        (InvertibleUNet(4, ndim=2, levels=2, blocks=1, hidden=8), torch.randn(2, 4, 8, 8), None),
        (invnet.Chain(HaarSqueeze(), ActNorm(8), Inverted(HaarSqueeze())), torch.randn(2, 2, 8, 8), None),
    ]
    for net, x, c in cases:
        net = net.double()
        report = reconstruction_drift(net, x.double(), None if c is None else c.double())
        assert report.error < 1e-13, type(net).__name__
        assert all(s.error < 1e-13 for s in report.scales), type(net).__name__
    chain_report = report
    assert [b.direction for b in chain_report.blocks] == ["forward", "forward", "inverse"]
    assert [s.space_shape for s in chain_report.scales] == [(8, 8), (4, 4)]
    with pytest.raises(ValueError, match="InvertibleModule"):
        reconstruction_drift(torch.nn.Linear(2, 2), torch.randn(2, 2))


def test_warning_category_can_be_filtered_by_a_trainer():
    net = _glow(levels=1)
    _ill_condition(net.get_submodule("body.steps.blocks.2"))
    report = reconstruction_drift(net, torch.randn(2, 2, 8, 8))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ReconstructionDriftWarning)
        report.check(warn_above=1e-6, fail_above=10.0)
    assert [w.category for w in seen] == [ReconstructionDriftWarning]


def test_drift_that_no_single_block_explains_points_at_the_whole_network():
    net = _glow()
    x = torch.randn(2, 2, 16, 16)
    report = reconstruction_drift(net, x)
    spread = type(report)(1e-2, report.scales, report.blocks, torch.bfloat16)  # far above every block
    assert not spread.single_block
    assert "pin_full_precision(model)" in spread.remedy() and "clamp" not in spread.remedy()
    with pytest.raises(ReconstructionDriftError, match="no block stands out"):
        spread.check(warn_above=1e-4, fail_above=1e-3)
