"""HINT and MultiscaleHINT networks: exactness, stateless latents, memory, density and sampling."""

import pytest
import torch

import invnet
from invnet.core.checks import gradient_error, invertibility_error, logdet_error, randomize_parameters_, saved_bytes
from invnet.networks import HINT, MultiscaleHINT

F64 = torch.float64


def space(ndim: int, size: int) -> tuple[int, ...]:
    return (size,) * ndim


@pytest.mark.parametrize("ndim", [0, 1, 2, 3])
def test_hint_exact_in_every_ndim(ndim):
    net = randomize_parameters_(HINT(3, 6, depth=2, ndim=ndim, cond_channels=2).double(), 0.1)
    s = space(ndim, 3 if ndim < 3 else 2)
    x, c = torch.randn(2, 3, *s, dtype=F64), torch.randn(2, 2, *s, dtype=F64)
    assert invertibility_error(net, x, c) < 1e-12
    assert logdet_error(net, x, c) < 1e-10
    assert gradient_error(net, x, c) < 1e-10
    assert gradient_error(net, x, c, inverse=True) < 1e-10


@pytest.mark.parametrize("ndim,squeeze", [(0, "haar"), (1, "haar"), (2, "checkerboard"), (2, "haar"), (3, "patch")])
def test_multiscale_hint_exact_in_every_ndim(ndim, squeeze):
    channels = 4 if ndim == 0 else 1
    net = MultiscaleHINT(channels, 6, levels=2, depth=1, ndim=ndim, squeeze=squeeze, cond_channels=1)
    net = randomize_parameters_(net.double(), 0.1)
    x = torch.randn(2, channels, *space(ndim, 4), dtype=F64)
    c = torch.randn(2, 1, *space(ndim, 4), dtype=F64)
    assert invertibility_error(net, x, c) < 1e-12
    if ndim < 3:  # brute-force Jacobian of a 3D field is slow; 3D logdets are covered by the layers
        assert logdet_error(net, x, c) < 1e-10
    assert gradient_error(net, x, c) < 1e-10
    assert gradient_error(net, x, c, inverse=True) < 1e-10


def test_multiscale_latent_has_the_shape_of_x_and_cuts_into_scales():
    net = MultiscaleHINT(3, 8, levels=3, depth=1, ndim=2).double()
    x = torch.randn(2, 3, 16, 8, dtype=F64)
    z, _ = net(x)
    assert z.shape == x.shape
    parts = net.split_latent(z)
    # scale k factors out half of its 3 * 4 * ... channels at space size / 2**(k+1)
    assert [tuple(p.shape) for p in parts] == [(2, 6, 8, 4), (2, 12, 4, 2), (2, 48, 2, 1)]
    assert sum(p.numel() for p in parts) == z.numel()
    assert torch.allclose(net.merge_latent(parts), z, atol=1e-13)
    # the parts are an orthogonal re-arrangement of z: same squared norm (same Gaussian density)
    total = sum(-0.5 * (p**2).flatten(1).sum(1) for p in parts)
    assert torch.allclose(total, -0.5 * (z**2).flatten(1).sum(1), atol=1e-9)


def test_inverse_needs_no_previous_forward():
    # two identical fresh networks: one inverts first, the other runs forward first
    torch.manual_seed(3)
    a = MultiscaleHINT(2, 8, levels=2, depth=1, ndim=1).double()
    z = torch.randn(3, 2, 8, dtype=F64)
    x, ld_inv = a.inverse(z)
    z_back, ld = a(x)
    assert torch.allclose(z_back, z, atol=1e-12) and torch.allclose(ld, -ld_inv, atol=1e-10)


def _train_step_bytes(net, x, c=None):
    def step():
        return -net.log_prob(x.requires_grad_(True), c).sum()

    return saved_bytes(step)


def test_saved_bytes_flat_in_depth():
    x = torch.randn(2, 2, 8, 8)
    for make in (lambda d: HINT(2, 16, depth=d, ndim=2), lambda d: MultiscaleHINT(2, 16, levels=2, depth=d, ndim=2)):
        shallow, deep = make(1), make(4)
        shallow(x), deep(x)  # ActNorm initialisation
        saving = [_train_step_bytes(n, x.clone()) for n in (shallow, deep)]
        with invnet.memory_saving(False):
            plain = [_train_step_bytes(n, x.clone()) for n in (shallow, deep)]
        assert saving[1] == saving[0]
        assert plain[1] > 3 * plain[0] and saving[1] < plain[1] / 10


def test_density_integrates_to_one():
    net = randomize_parameters_(HINT(2, 16, depth=2, ndim=0, mixing="lu").double(), 0.2)
    # heavy-ish tails (samples reach |x| ~ 37): a wide grid; measured mass 0.99992
    g = torch.linspace(-30, 30, 1201, dtype=F64)
    pts = torch.cartesian_prod(g, g)
    with torch.no_grad():
        net(torch.randn(256, 2, dtype=F64))  # ActNorm initialisation on standard data
        p = torch.exp(net.log_prob(pts))
    mass = float(p.sum() * (g[1] - g[0]) ** 2)
    assert abs(mass - 1.0) < 0.01


def test_fitted_hint_samples_the_target_gaussian():
    # Fit to N(m, L L^T) by maximum likelihood (200 Adam steps), then sample.
    # Measured at this seed: KL(p||q) 0.006 nats, mean error 0.04 std, covariance error 6%
    # (fit error; the sampling error of 20000 draws is 0.007 std). Tolerances leave ~3x margin.
    m = torch.tensor([1.0, -2.0, 0.5])
    L = torch.tensor([[1.0, 0, 0], [0.8, 0.6, 0], [-0.5, 0.3, 0.4]])
    S = L @ L.T
    net = HINT(3, hidden=16, depth=2, ndim=0, mixing="lu")
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(200):
        loss = -net.log_prob(m + torch.randn(256, 3) @ L.T).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        s = net.sample(20000, generator=torch.Generator().manual_seed(0))
        xs = m + torch.randn(20000, 3, generator=torch.Generator().manual_seed(5)) @ L.T
        kl = float((torch.distributions.MultivariateNormal(m, S).log_prob(xs) - net.log_prob(xs)).mean())
    assert kl < 0.03
    assert float(((s.mean(0) - m) / S.diagonal().sqrt()).abs().max()) < 0.15
    assert float(torch.linalg.norm(torch.cov(s.T) - S) / torch.linalg.norm(S)) < 0.15


def test_sample_with_conditions_and_bits_per_dim():
    net = HINT(2, 8, depth=1, ndim=1, cond_channels=3)
    c = torch.randn(1, 3, 6)
    assert net.sample(4, c=c).shape == (4, 2, 6)  # one row serves all, shape taken from c
    assert net.sample(2, c=torch.randn(2, 3, 6), temperature=0.5).shape == (2, 2, 6)
    x = torch.randn(5, 2, 6)
    bpd = net.bits_per_dim(x, torch.randn(5, 3, 6))
    assert bpd.shape == (5,) and bool(torch.isfinite(bpd).all())
    with pytest.raises(ValueError, match="one condition per sample"):
        net.sample(3, c=torch.randn(2, 3, 6))


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="2 channel"):
        HINT(1, 8, 2, 0)
    with pytest.raises(ValueError, match="cannot be halved"):
        MultiscaleHINT(3, 8, levels=2, depth=1, ndim=0)  # 3 -> keeps 1 channel: no coupling possible
    with pytest.raises(ValueError, match="squeeze"):
        MultiscaleHINT(2, 8, levels=2, depth=1, ndim=2, squeeze="bogus")
    with pytest.raises(ValueError, match="mixing"):
        HINT(2, 8, 1, 2, mixing="bogus")
    net = MultiscaleHINT(2, 8, levels=2, depth=1, ndim=2, cond_channels=1)
    with pytest.raises(ValueError, match=r"divisible by 2\*\*levels = 4"):
        net(torch.randn(2, 2, 8, 6), torch.randn(2, 1, 8, 6))
    with pytest.raises(ValueError, match="field condition"):
        net(torch.randn(2, 2, 8, 8), torch.randn(2, 1))
    with pytest.raises(ValueError, match="condition c must have shape"):
        net(torch.randn(2, 2, 8, 8), torch.randn(3, 1, 8, 8))  # batch mismatch
    with pytest.raises(ValueError, match="condition c must have shape"):
        net(torch.randn(2, 2, 8, 8), torch.randn(2, 1, 4, 8))  # space mismatch
    with pytest.raises(ValueError, match="2 space dimension"):
        net(torch.randn(2, 2, 8), torch.randn(2, 1, 8))
