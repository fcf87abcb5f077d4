"""invnet.distributed in one process: a grid of one runs the same code as serial, and bad
configurations are refused with clear errors (multi-rank runs: tests/test_mpi.py)."""
import copy

import pytest
import torch

import invnet
from invnet.core.checks import randomize_parameters_
from invnet.distributed import HaloPad, Partition, SerialComm, decompose, default_comm, halo_exchange, validate_grid
from invnet.layers import ActNorm, AffineCoupling, HaarSqueeze, Squeeze, ZeroPad


def _net():
    return invnet.Chain(ActNorm(2, 2), AffineCoupling(2, hidden=4, ndim=2, cond_channels=1), Squeeze(ndim=2),
                        AffineCoupling(8, hidden=4, ndim=2, swap=True), HaarSqueeze(ndim=2)).double()


def test_grid_of_one_equals_serial_and_swaps_every_pad():
    net = randomize_parameters_(_net(), 0.1, seed=0)
    serial = copy.deepcopy(net)
    flow = decompose(net, Partition((8, 8), (1, 1, 1), SerialComm()))
    assert not any(isinstance(m, ZeroPad) for m in flow.modules())
    assert sum(isinstance(m, HaloPad) for m in flow.modules()) == 4
    x, c = torch.randn(3, 2, 8, 8, dtype=torch.float64), torch.randn(3, 1, 8, 8, dtype=torch.float64)
    z, ld = flow(x, c)
    z_s, ld_s = serial(x, c)
    assert torch.allclose(z, z_s, rtol=0, atol=1e-13) and torch.allclose(ld, ld_s, rtol=0, atol=1e-12)
    assert torch.allclose(flow.log_prob(x, c), serial.base.log_prob(z_s) + ld_s if hasattr(serial, "base")
                          else invnet.networks.density.StandardNormal().log_prob(z_s) + ld_s, atol=1e-12)


def test_subdomain_shape_is_checked():
    flow = decompose(_net(), Partition((8, 8), (1, 1, 1), SerialComm()))
    with pytest.raises(ValueError, match=r"subdomain with space shape \(8, 8\)"):
        flow(torch.randn(1, 2, 4, 8, dtype=torch.float64), torch.randn(1, 1, 4, 8, dtype=torch.float64))


@pytest.mark.parametrize("space, grid, world, levels, words", [
    ((16, 16), (1, 2, 1), 1, 0, "needs 2 ranks but the job has only 1"),
    ((16, 16), (1, 1, 1), 2, 0, "uses 1 ranks but the job has 2"),
    ((16, 16), (1, 3, 1), 3, 0, "not divisible by its 3 ranks"),
    ((12, 16), (1, 2, 1), 2, 2, "odd at squeeze level 2"),
    ((16,), (1, 1, 1), 1, 0, "grid must be"),
])
def test_validate_grid_errors(space, grid, world, levels, words):
    with pytest.raises(ValueError, match=words):
        validate_grid(space, grid, world, levels)


def test_decompose_counts_squeeze_levels():
    with pytest.raises(ValueError, match="squeeze level 2"):
        decompose(_net(), Partition((6, 8), (1, 1, 1), SerialComm()))


def test_halo_width_larger_than_subdomain_is_refused():
    with pytest.raises(ValueError, match="halo width 3 exceeds the local size 2"):
        halo_exchange(torch.zeros(1, 1, 2), 3, ((0, None),), SerialComm())


def test_default_comm_is_serial_outside_mpiexec():
    assert default_comm().size == 1


def test_decomposed_glow_samples_its_block():
    from invnet.networks import ConditionalGlow

    net = ConditionalGlow(1, 1, hidden=4, levels=1, depth=1, ndim=2).double()
    flow = decompose(net, Partition((8, 8), (1, 1, 1), SerialComm()))
    c = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    assert flow.sample(3, c).shape == (3, 1, 8, 8)


def test_a_memory_budget_is_refused_for_a_decomposed_network():
    """Ranks that kept different blocks would exchange different halos in the backward."""
    flow = decompose(_net(), Partition((8, 8), (1, 1, 1), SerialComm()))
    x, c = torch.randn(3, 2, 8, 8, dtype=torch.float64), torch.randn(3, 1, 8, 8, dtype=torch.float64)
    with invnet.memory_budget("1GB"), pytest.raises(ValueError, match="DecomposedFlow does not take a memory budget"):
        flow(x, c)
    with invnet.memory_budget(0):
        z, _ = flow(x, c)  # budget 0 is the memory-free default
    assert z.shape == (3, 32, 2, 2)


@pytest.mark.parametrize("ndim", [2, 3])
def test_halo_exchange_keeps_the_layout_of_its_input(ndim):
    """A channels-last activation comes out channels-last (as F.pad keeps it; a channels-first
    padded copy made every decomposed conditioner reorder its volume twice more than serially),
    with the same values and the same gradient as the channels-first input. A rank that is its
    own neighbour along the first axis (periodic) exercises the exchange in one process."""
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}[ndim]
    neighbors = ((0, 0),) + ((None, None),) * (ndim - 1)
    x = torch.randn((2, 3) + (5, 4, 6)[:ndim], dtype=torch.float64)
    # the periodic copy along axis 0, zero padded along the others
    wrapped = torch.cat([x.narrow(2, x.shape[2] - 2, 2), x, x.narrow(2, 0, 2)], dim=2)
    expected = torch.nn.functional.pad(wrapped, [2, 2] * (ndim - 1) + [0, 0])
    for layout in (torch.contiguous_format, fmt):
        xl = x.contiguous(memory_format=layout).requires_grad_(True)
        out = halo_exchange(xl, 2, neighbors, SerialComm())
        assert out.is_contiguous(memory_format=layout)
        assert torch.equal(out, expected)
        y = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        (g,) = torch.autograd.grad(out, xl, y)
        # adjoint: <H x, y> = <x, H^T y>
        assert abs(float((out * y).sum()) - float((x * g).sum())) < 1e-12 * float(out.norm() * y.norm())
        if layout is torch.contiguous_format:
            g_first = g
        else:
            assert torch.equal(g, g_first)
