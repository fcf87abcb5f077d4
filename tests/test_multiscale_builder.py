"""The multiscale builder: coupling kinds in every network, custom step factories, squeeze-free and
squeezed-latent layouts, vector conditions for multiscale HINT, and the networks' specs."""
import pytest
import torch

from invnet.core.checks import gradient_error, invertibility_error, logdet_error, randomize_parameters_
from invnet.layers import COUPLINGS, AdditiveCoupling, AffineCoupling, HINTCoupling
from invnet.networks import (
    HINT,
    ConditionalCouplingFlow,
    ConditionalGlow,
    ConditionalHINT,
    Glow,
    GlowStep,
    MultiscaleConditionalHINT,
    MultiscaleFlow,
    MultiscaleHINT,
)
from invnet.training.network_spec import build_network, resolve_network_spec

D64 = torch.float64


def _exact(net, x, c=None, logdet=True):
    net = randomize_parameters_(net.double(), 0.1)
    assert invertibility_error(net, x, c) < 1e-12
    if logdet:
        assert logdet_error(net, x, c) < 1e-10
    assert gradient_error(net, x, c) < 1e-10
    assert gradient_error(net, x, c, inverse=True) < 1e-10
    return net


# (network, x shape, c shape)
ADDITIVE = [
    (lambda: Glow(2, hidden=6, levels=2, depth=2, ndim=1, coupling="additive"), (2, 2, 8), None),
    (lambda: Glow(3, hidden=6, levels=1, depth=2, ndim=0, cond_channels=2, coupling="additive"), (3, 3), (3, 2)),
    (lambda: ConditionalGlow(1, 2, hidden=6, levels=2, depth=1, ndim=2, coupling="additive"),
     (2, 1, 4, 4), (2, 2, 4, 4)),
    (lambda: ConditionalCouplingFlow(1, 2, ndim=2, depth=2, hidden=6, coupling="additive"), (2, 1, 4, 4), (2, 2, 4, 4)),
    (lambda: HINT(5, 6, depth=2, ndim=1, cond_channels=1, coupling="additive"), (2, 5, 3), (2, 1, 3)),
    (lambda: MultiscaleHINT(1, 6, levels=2, depth=1, ndim=1, cond_channels=1, coupling="additive"),
     (2, 1, 8), (2, 1, 8)),
    (lambda: ConditionalHINT(3, 2, 6, depth=2, ndim=0, coupling="additive"), (2, 3), (2, 2)),
    (lambda: MultiscaleConditionalHINT(1, 1, 6, levels=2, depth=1, ndim=1, coupling="additive"), (2, 1, 8), (2, 1, 8)),
]


@pytest.mark.parametrize("make,x_shape,c_shape", ADDITIVE)
def test_additive_coupling_in_every_network(make, x_shape, c_shape):
    net = make()
    couplings = [m for m in net.modules() if isinstance(m, (AffineCoupling, AdditiveCoupling))]
    assert couplings and all(isinstance(m, AdditiveCoupling) for m in couplings)
    x = torch.randn(*x_shape, dtype=D64)
    c = None if c_shape is None else torch.randn(*c_shape, dtype=D64)
    _exact(net, x, c)


def test_additive_glow_is_volume_preserving_but_for_actnorm():
    net = Glow(2, hidden=6, levels=2, depth=2, ndim=1, coupling="additive").double()
    x = torch.randn(3, 2, 8, dtype=D64)
    net(x)  # ActNorm initialisation
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "log_scale"):
                m.log_scale.zero_()
        _, logdet = net(x)
    assert float(logdet.abs().max()) == 0.0  # Householder 1x1 convolutions and additive couplings


def test_unknown_coupling_is_refused_everywhere():
    for make in (lambda: Glow(2, coupling="spline?"), lambda: HINT(3, coupling="spline?"),
                 lambda: ConditionalCouplingFlow(1, 1, ndim=1, coupling="spline?"),
                 lambda: HINTCoupling(4, coupling="spline?")):
        with pytest.raises(ValueError, match=r"coupling must be one of \['additive', 'affine', 'spline'\]"):
            make()


def test_a_new_coupling_kind_is_one_registry_entry(monkeypatch):
    def tight_affine(channels, hidden, ndim, cond_channels, swap, clamp, **kw):
        return AffineCoupling(channels, hidden, ndim, cond_channels, clamp=0.5, swap=swap, **kw)

    monkeypatch.setitem(COUPLINGS, "tight", tight_affine)
    net = Glow(2, hidden=6, levels=1, depth=2, ndim=1, coupling="tight")
    assert {m.clamp for m in net.modules() if isinstance(m, AffineCoupling)} == {0.5}
    hint = HINT(4, 6, depth=1, ndim=0, coupling="tight")
    assert {m.clamp for m in hint.modules() if isinstance(m, AffineCoupling)} == {0.5}


def test_custom_step_factory():
    def coupling_only(channels, cond_channels, ndim, scale, index):
        return [AdditiveCoupling(channels, 6, ndim, cond_channels, swap=bool(index % 2))]

    flow = MultiscaleFlow(coupling_only, channels=1, levels=2, depth=2, ndim=2, squeeze="checkerboard", cond_channels=1)
    assert flow.widths == (4, 8) and flow.keeps == (2, 0)
    x, c = torch.randn(2, 1, 8, 8, dtype=D64), torch.randn(2, 1, 8, 8, dtype=D64)
    _exact(flow, x, c, logdet=False)
    # the condition is squeezed with x: 4 channels at the first scale, 16 at the second
    assert [m.cond_channels for m in flow.modules() if isinstance(m, AdditiveCoupling)] == [4, 4, 16, 16]


def test_glow_without_squeeze_splits_channels_at_full_resolution():
    net = Glow(4, hidden=6, levels=2, depth=1, ndim=2, squeeze=None)
    x = torch.randn(2, 4, 5, 3, dtype=D64)  # no squeeze: any space size
    net = _exact(net, x, logdet=False)
    z, _ = net(x)
    assert [tuple(p.shape) for p in net.split_latent(z)] == [(2, 2, 5, 3), (2, 2, 5, 3)]
    assert torch.equal(net.merge_latent(net.split_latent(z)), z)


def test_squeezed_latent_with_several_scales():
    flow = MultiscaleFlow(GlowStep(hidden=6), channels=1, levels=2, depth=1, ndim=1, latent="squeezed")
    x = torch.randn(2, 1, 8, dtype=D64)
    flow = _exact(flow, x)
    z, _ = flow(x)
    assert z.shape == (2, 2, 4)  # the first squeeze is not undone
    parts = flow.split_latent(z)
    assert [tuple(p.shape) for p in parts] == [(2, 1, 4), (2, 2, 2)]
    assert torch.allclose(flow.merge_latent(parts), z, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="expects latent z with 2 channels"):
        flow.inverse(torch.randn(2, 1, 8, dtype=D64))


def test_multiscale_hint_takes_a_vector_condition():
    net = MultiscaleHINT(1, 6, levels=2, depth=1, ndim=2, cond_channels=3, vector_condition=True)
    x, c = torch.randn(2, 1, 4, 4, dtype=D64), torch.randn(2, 3, dtype=D64)
    _exact(net, x, c)
    assert net.sample(3, c[:1], shape=(1, 4, 4)).shape == (3, 1, 4, 4)
    with pytest.raises(ValueError, match="a vector condition"):
        net(x, torch.randn(2, 3, 4, 4, dtype=D64))


def test_specs_fill_in_a_vector_condition_for_hint_networks():
    # a job with a vector observation and field unknowns: the spec sets vector_condition itself
    for name in ("HINT", "MultiscaleHINT", "Glow", "ConditionalCouplingFlow"):
        spec = resolve_network_spec({"type": name, "hidden": 4, "depth": 1, "coupling": "additive"}, (2, 8, 8), (3,))
        net = build_network(spec)
        assert spec["vector_condition"] is True and net.cond_channels == 3
        assert net.log_prob(torch.randn(2, 2, 8, 8), torch.randn(2, 3)).shape == (2,)


def test_builder_argument_errors():
    with pytest.raises(ValueError, match="latent must be one of"):
        MultiscaleFlow(GlowStep(), 2, latent="flat")
    with pytest.raises(ValueError, match="levels and depth must be >= 1"):
        MultiscaleFlow(GlowStep(), 2, depth=0)
    with pytest.raises(ValueError, match="conv1x1 must be"):
        GlowStep(conv1x1="qr")
    with pytest.raises(ValueError, match="cannot be halved.*scale 3 of 3"):
        MultiscaleHINT(4, 4, levels=3, depth=1, ndim=0)  # 4 -> 2 -> 1 channel at the last scale
