"""Glow as a density: exp(log_prob) integrates to one; samples follow the density."""
import torch

from invnet.core.checks import randomize_parameters_
from invnet.networks import Glow

D64 = torch.float64


def _grid(lim: float, n: int):
    t = torch.linspace(-lim, lim, n, dtype=D64)
    gx, gy = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), (t[1] - t[0]) ** 2


def _moments_on_grid(net, lim=12.0, n=481):
    pts, area = _grid(lim, n)
    with torch.no_grad():
        p = torch.exp(net.log_prob(pts)) * area
    mass = p.sum()
    mean = (p[:, None] * pts).sum(0) / mass
    centred = pts - mean
    cov = (p[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0) / mass
    return float(mass), mean, cov


def test_density_integrates_to_one():
    net = Glow(2, hidden=16, levels=1, depth=4, ndim=0).double()
    net(torch.randn(256, 2, dtype=D64))  # ActNorm init
    randomize_parameters_(net, 0.3, seed=3)
    mass, _, _ = _moments_on_grid(net)
    assert abs(mass - 1.0) < 0.01


def test_fitted_to_gaussian_samples_that_gaussian():
    torch.manual_seed(0)
    mu = torch.tensor([1.0, -2.0], dtype=D64)
    cov = torch.tensor([[2.0, 1.2], [1.2, 1.5]], dtype=D64)
    chol = torch.linalg.cholesky(cov)
    net = Glow(2, hidden=16, levels=1, depth=3, ndim=0).double()
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(300):
        x = mu + torch.randn(256, 2, dtype=D64) @ chol.T
        loss = -net.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # 1) samples follow the model's own density: moments of 40000 samples against moments of
    #    exp(log_prob) on a grid, within 4 standard errors
    n = 40000
    with torch.no_grad():
        s = net.sample(n, generator=torch.Generator().manual_seed(1))
    mass, m_grid, c_grid = _moments_on_grid(net)
    assert abs(mass - 1) < 0.01
    se_mean = torch.sqrt(torch.diagonal(c_grid) / n)
    assert bool(((s.mean(0) - m_grid).abs() < 4 * se_mean).all())
    se_cov = torch.sqrt((torch.diagonal(c_grid)[:, None] * torch.diagonal(c_grid)[None, :] + c_grid**2) / n)
    assert bool(((torch.cov(s.T) - c_grid).abs() < 4 * se_cov).all())
    # 2) the model is the target Gaussian up to the fit of a short training
    assert float((s.mean(0) - mu).abs().max()) < 0.1
    assert float((torch.cov(s.T) - cov).abs().max() / cov.abs().max()) < 0.1
    # the fitted log-density matches the Gaussian's where the mass is
    x = mu + torch.randn(2000, 2, dtype=D64) @ chol.T
    exact = torch.distributions.MultivariateNormal(mu, cov).log_prob(x)
    with torch.no_grad():
        gap = float((exact - net.log_prob(x)).mean())
    assert -0.02 < gap < 0.05  # forward KL (nats) up to the Monte-Carlo error of 2000 points
