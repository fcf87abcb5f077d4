"""Decomposed networks equal the serial run on the gathered volume (float64, <= 1e-10 relative):
forward, inverse, logdet, log_prob, and all gradients (input, condition, parameters, and through
the inverse), with memory saving on and off, over 1D and 2D process grids in 2D and 3D, with and
without batch ranks. ActNorms are left uninitialised so their first call must see global
statistics. Run: mpiexec -n N python -m mpi4py tests/mpi/decomposed.py [gloo] [--only NAME]"""
import copy
import inspect
import sys

import torch
from _common import Verdict, make_comm, rel

import invnet
from invnet.core.checks import randomize_parameters_
from invnet.distributed import Partition, decompose, sum_over_ranks
from invnet.layers import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    ChannelPermutation,
    Conv1x1,
    HaarSqueeze,
    LeakyReLU,
    Squeeze,
)
from invnet.networks.density import StandardNormal

torch.set_default_dtype(torch.float64)
comm = make_comm(sys.argv)
v = Verdict(comm)
n = comm.size
TOL = 1e-10
CHANNELS, COND = 3, 2


def core_network(ndim: int, channels: int, cond: int) -> invnet.Chain:
    """Every core block, two squeeze levels, conditioners with halo width 1 (3x3) and 2 (5x5)."""
    c1 = channels * 2**ndim
    c2 = c1 * 2**ndim
    return invnet.Chain(
        ActNorm(channels, ndim),
        AffineCoupling(channels, hidden=6, ndim=ndim, cond_channels=cond),
        Conv1x1(channels, parametrization="lu"),
        LeakyReLU(),
        Squeeze(ndim=ndim),
        AdditiveCoupling(c1, hidden=6, ndim=ndim, swap=True, kernel_size=5),
        ChannelPermutation(c1, kind="random"),
        HaarSqueeze(ndim=ndim),
        ActNorm(c2, ndim),
        Conv1x1(c2),
        AffineCoupling(c2, hidden=6, ndim=ndim, swap=True),
    )


def _network_builder(cls, ndim):
    params = inspect.signature(cls).parameters

    def build(ch, cond):
        kwargs = {}
        for key, val in (("ndim", ndim), ("hidden", 6), ("depth", 1), ("levels", 2), ("cond_channels", cond)):
            if key in params:
                kwargs[key] = val
        return cls(ch, **kwargs)

    return build


def networks(ndim):
    """(name, builder(channels, cond) -> network, takes a condition)."""
    yield "core-chain", (lambda ch, cond: core_network(ndim, ch, cond)), True
    for name in ("Glow", "ConditionalGlow", "HINT", "ConditionalHINT", "MultiscaleHINT", "MultiscaleConditionalHINT"):
        cls = getattr(invnet.networks, name, None)
        if cls is not None:
            yield name, _network_builder(cls, ndim), "Conditional" in name


def grids(ndim):
    """Process grids for this world size: 1D and 2D spatial layouts, and batch x space."""
    if n == 1:
        return [(1,) * (ndim + 1)]
    if n == 2:
        return [(1, 2) + (1,) * (ndim - 1), (1,) * ndim + (2,), (2,) + (1,) * ndim]
    return [(1, 2, 2) + (1,) * (ndim - 2), (1, 4) + (1,) * (ndim - 1), (2, 1) + (1,) * (ndim - 2) + (2,)]


def block_of(t, part, bsl):
    """This rank's block of a global array whose space may be squeezed: the same relative block."""
    space = tuple(slice(c * (m // p), (c + 1) * (m // p)) for c, m, p in zip(part.coords, t.shape[2:], part.space_grid))
    return t[(bsl, slice(None)) + space].detach().contiguous()


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def run_case(name, build, conditional, ndim, grid, memory_saving):
    space = (16, 16) if ndim == 2 else (16, 8, 8)
    batch = 2 * grid[0]
    label = f"{name} {ndim}D grid={grid} memory_saving={memory_saving}"
    gen = torch.Generator().manual_seed(11)  # identical global data and weights on every rank
    x = torch.randn((batch, CHANNELS) + space, generator=gen)
    c = torch.randn((batch, COND) + space, generator=gen) if conditional else None
    torch.manual_seed(5)
    net = build(CHANNELS, COND if conditional else 0).double()
    # multiscale HINT stacks recursive couplings on every level: noise of 0.1 on every weight makes
    # its serial inverse itself blow up in 3D (relative error ~1e2), so perturb it less
    randomize_parameters_(net, scale=0.02 if name.startswith("Multiscale") else 0.1, seed=3)
    serial = copy.deepcopy(net)
    base = getattr(serial, "base", StandardNormal())
    part = Partition(space, grid, comm)
    flow = decompose(net, part)
    bsl = part.batch_slice(batch)
    local_batch = batch // grid[0]

    with invnet.memory_saving(memory_saving):
        # serial reference on the whole volume: loss = mean NLL + <w, z> / batch
        xs = x.clone().requires_grad_(True)
        cs = None if c is None else c.clone().requires_grad_(True)
        z_s, ld_s = serial(xs, cs)
        w_z = torch.randn(z_s.shape, generator=gen)
        lp_s = base.log_prob(z_s) + ld_s
        loss_s = (-lp_s.sum() + (w_z * z_s).sum()) / batch
        inputs_s = [xs] + ([cs] if cs is not None else []) + list(serial.parameters())
        g_s = grads_of(loss_s, inputs_s)

        # decomposed run on this rank's block (batch-mean over the local samples)
        xl = part.local_view(x).requires_grad_(True)
        cl = None if c is None else part.local_view(c).requires_grad_(True)
        z_l, ld_l = flow(xl, cl)
        lp_l = sum_over_ranks(flow.base.log_prob(z_l), part.spatial) + ld_l
        loss_l = (-lp_l.sum() + (block_of(w_z, part, bsl) * z_l).sum()) / local_batch
        params_l = list(flow.network.parameters())
        inputs_l = [xl] + ([cl] if cl is not None else []) + params_l
        g_l = grads_of(loss_l, inputs_l)
    for p, g in zip(params_l, g_l[len(inputs_l) - len(params_l):]):
        p.grad = None if g is None else g.clone()
    flow.reduce_gradients()

    v.close(f"{label}: latent", rel(z_l, block_of(z_s, part, bsl)), TOL)
    v.close(f"{label}: logdet", rel(ld_l, ld_s[bsl]), TOL)
    v.close(f"{label}: log_prob", rel(lp_l, lp_s[bsl]), TOL)
    cl0 = None if cl is None else cl.detach()
    with torch.no_grad():
        v.close(f"{label}: log_prob method", rel(flow.log_prob(xl.detach(), cl0), lp_s[bsl]), TOL)
        x_rec, ld_inv = flow.inverse(z_l.detach(), cl0)
    v.close(f"{label}: inverse", rel(x_rec, xl), TOL)
    v.close(f"{label}: inverse logdet", rel(ld_inv, -ld_l.detach()), TOL)
    # input gradients: a local batch mean vs the global mean differ by the number of batch groups
    v.close(f"{label}: dx", rel(g_l[0] / grid[0], part.local_view(g_s[0])), TOL)
    if cl is not None:
        v.close(f"{label}: dc", rel(g_l[1] / grid[0], part.local_view(g_s[1])), TOL)
    k = len(inputs_s) - len(params_l)
    checked = 0
    for i, (p, gs) in enumerate(zip(params_l, g_s[k:])):
        if gs is not None:
            v.close(f"{label}: parameter {i} gradient", rel(p.grad, gs), TOL)
            checked += 1
    v.check(f"{label}: parameter gradients were compared", checked > 0)

    # the inverse direction through its own backward
    with invnet.memory_saving(memory_saving):
        # near the data's latent: a random N(0, I) latent through a randomised net blows up (|x| ~ 1e5)
        # and its inverse gradient is then ill-conditioned in any implementation
        z_g = z_s.detach() + 0.1 * torch.randn(z_s.shape, generator=gen)
        w_x = torch.randn(x.shape, generator=gen)
        zs = z_g.clone().requires_grad_(True)
        xs_inv, ldi_s = serial.inverse(zs, None if c is None else c)
        (gz_s,) = grads_of((w_x * xs_inv).sum() + ldi_s.sum(), [zs])
        zl = block_of(z_g, part, bsl).requires_grad_(True)
        xl_inv, ldi_l = flow.inverse(zl, cl0)
        (gz_l,) = grads_of((part.local_view(w_x) * xl_inv).sum() + ldi_l.sum(), [zl])
    v.close(f"{label}: inverse map", rel(xl_inv, part.local_view(xs_inv.detach())), TOL)
    v.close(f"{label}: inverse gradient dz", rel(gz_l, block_of(gz_s, part, bsl)), TOL)


only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
for ndim in (2, 3):
    for name, build, conditional in networks(ndim):
        if only and name != only:
            continue
        # the core chain on every grid; the assembled networks on one grid per dimension to keep
        # the suite short: 2 ranks: (1, 2, 1) in 2D, (1, 1, 1, 2) in 3D; 4 ranks: a 2x2 grid in 2D,
        # batch x space (2, 1, 1, 2) in 3D
        if name == "core-chain" or only:
            chosen = grids(ndim)
        else:
            chosen = [grids(ndim)[min(0 if ndim == 2 else 1 + (n == 4), len(grids(ndim)) - 1)]]
        for grid in chosen:
            for ms in (True, False):
                if not ms and (ndim == 3 or grid != grids(ndim)[0] or (name != "core-chain" and not only)):
                    continue  # plain autograd (the halo adjoint under autograd): core chain, 2D, first grid
                run_case(name, build, conditional, ndim, grid, ms)

v.finish()
