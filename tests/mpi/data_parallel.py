"""Data parallel over N ranks equals serial on the concatenated batch: the broadcast overwrites
diverged replicas, ActNorm initialises from the global batch, the averaged gradient and one
optimiser step match the serial ones (float64, <= 1e-10 relative).
Run: mpiexec -n N python -m mpi4py tests/mpi/data_parallel.py [gloo]"""
import copy
import sys

import torch
from _common import Verdict, make_comm, rel

import invnet
from invnet.core.checks import randomize_parameters_
from invnet.distributed import DataParallel
from invnet.layers import ActNorm, AffineCoupling, Conv1x1
from invnet.networks.density import StandardNormal

torch.set_default_dtype(torch.float64)
comm = make_comm(sys.argv)
v = Verdict(comm)
r, n = comm.rank, comm.size
TOL = 1e-10

for ndim, space in ((0, ()), (2, (6, 6))):
    label = f"{ndim}D"
    torch.manual_seed(0)
    net = invnet.Chain(ActNorm(5, ndim), AffineCoupling(5, hidden=8, ndim=ndim), Conv1x1(5),
                       AffineCoupling(5, hidden=8, ndim=ndim, swap=True)).double()
    randomize_parameters_(net, 0.1, seed=1)
    serial = copy.deepcopy(net)
    if r != 0:  # replicas that diverged: the broadcast must make them rank 0's
        randomize_parameters_(net, 1.0, seed=100 + r)
    dp = DataParallel(net, comm)
    same = all(torch.equal(a, b) for a, b in zip(net.parameters(), serial.parameters()))
    v.check(f"{label}: parameters broadcast", same)

    gen = torch.Generator().manual_seed(2)
    x = 2 * torch.randn((4 * n, 5) + space, generator=gen) + 1  # the global batch
    base = StandardNormal()
    z_s, logdet_s = serial(x)
    loss_s = -(base.log_prob(z_s) + logdet_s).mean()
    loss_s.backward()
    z, logdet = dp(x[4 * r : 4 * (r + 1)])
    loss = -(base.log_prob(z) + logdet).mean()
    loss.backward()
    dp.reduce_gradients()
    v.close(f"{label}: ActNorm initialised from the global batch", rel(net[0].log_scale, serial[0].log_scale), TOL)
    v.close(f"{label}: mean loss", abs(dp.mean_over_ranks(loss.item()) - loss_s.item()) / abs(loss_s.item()), TOL)
    for i, (p, q) in enumerate(zip(net.parameters(), serial.parameters())):
        v.close(f"{label}: gradient {i}", rel(p.grad, q.grad), TOL)
    for model in (net, serial):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.step()
    v.close(f"{label}: after one step", max(rel(p, q) for p, q in zip(net.parameters(), serial.parameters())), TOL)

v.finish()
