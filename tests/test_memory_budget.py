"""The memory budget (invnet.core.budget): gradients the same whatever the blocks keep, the kept
bytes within the budget, the plan cached and stable."""
import math

import pytest
import torch

import invnet
from invnet.core.budget import greedy_keep, parse_bytes
from invnet.core.checks import randomize_parameters_, relative_error
from invnet.networks import HINT, ConditionalGlow, ConditionalHINT, Glow, MultiscaleConditionalHINT

D = torch.float64


def networks():
    return {
        "glow": (lambda: Glow(2, hidden=8, levels=3, depth=2, ndim=2), (3, 2, 8, 8), None),
        "hint": (lambda: HINT(3, hidden=8, depth=3, ndim=1), (3, 3, 8), None),
        "cond_glow": (lambda: ConditionalGlow(2, 2, hidden=8, levels=2, depth=2, ndim=1), (3, 2, 8), (3, 2, 8)),
        "cond_hint": (lambda: ConditionalHINT(3, cond_channels=2, hidden=8, depth=3, ndim=0), (3, 3), (3, 2)),
        "ms_cond_hint": (lambda: MultiscaleConditionalHINT(1, 1, hidden=8, levels=2, depth=1, ndim=2),
                         (2, 1, 8, 8), (2, 1, 8, 8)),
    }


def build(name):
    make, xs, cs = networks()[name]
    torch.manual_seed(0)
    net = randomize_parameters_(make().to(D), 0.2)
    x = torch.randn(xs, dtype=D)
    c = None if cs is None else torch.randn(cs, dtype=D)
    with torch.no_grad():
        net(x, c)  # data-dependent initialisation before any comparison
    return net, x, c


def grads(net, x, c, inverse=False):
    """Input, condition and parameter gradients of a loss weighting output and logdet."""
    params = [p for p in net.parameters() if p.requires_grad]
    x = x.detach().clone().requires_grad_(True)
    c = None if c is None else c.detach().clone().requires_grad_(True)
    out, ld = (net.inverse if inverse else net)(x, c)
    w = torch.linspace(-1, 1, out.numel(), dtype=D).reshape(out.shape)
    loss = (w * out).sum() + 0.5 * (out**2).sum() + (torch.arange(ld.numel(), dtype=D) * ld).sum()
    inputs = [x] + ([c] if c is not None else []) + params
    return [torch.zeros_like(t) if g is None else g
            for g, t in zip(torch.autograd.grad(loss, inputs, allow_unused=True), inputs)]


def max_error(a, b):
    """Largest error of each gradient relative to its own size (not below 1e-6 of the largest
    gradient: one exactly zero holds only round-off), as invnet.core.checks.gradient_error."""
    floor = 1e-6 * max(float(v.abs().max()) for v in b)
    return max(relative_error(u, v, floor) for u, v in zip(a, b))


@pytest.mark.parametrize("name", list(networks()))
def test_gradients_equal_for_every_budget(name):
    net, x, c = build(name)
    with invnet.memory_saving(False):
        reference = grads(net, x, c)
    with invnet.memory_budget(math.inf):
        full = grads(net, x, c)
    assert all(invnet.memory_plans(net)[0].keep)
    with invnet.memory_budget("1MB"):
        grads(net, x, c)  # first step: measures
    total = sum(invnet.memory_plans(net)[-1].nbytes)
    with invnet.memory_budget(total):  # room for every unit: all kept, in segments
        grads(net, x, c)  # plans
        kept = grads(net, x, c)
    assert all(invnet.memory_plans(net)[-1].keep)
    middle_budget = total // 2
    with invnet.memory_budget(middle_budget):
        grads(net, x, c)  # measuring step for this budget's key: plans from the cached figures
        middle = grads(net, x, c)
    plan = invnet.memory_plans(net)[-1]
    assert plan.budget == middle_budget and any(plan.keep) and not all(plan.keep)
    assert 0 < plan.kept_bytes <= middle_budget
    with invnet.memory_budget(0):
        none = grads(net, x, c)
    for got in (full, kept, middle, none):
        assert max_error(got, reference) <= 1e-10


def test_inverse_direction_with_a_budget():
    net, x, c = build("cond_glow")
    with torch.no_grad():
        z, _ = net(x, c)
    with invnet.memory_saving(False):
        reference = grads(net, z, c, inverse=True)
    for budget in ("unlimited", "1GB", 2000):  # plain autograd; every unit kept; some kept
        with invnet.memory_budget(budget):
            grads(net, z, c, inverse=True)  # measures (finite budgets)
            got = grads(net, z, c, inverse=True)
        assert max_error(got, reference) <= 1e-10
    assert invnet.memory_plans(net)[0].key[0] == "inverse"


def test_kept_bytes_respect_the_budget():
    """Count what autograd saves during a step with saved-tensor hooks (each storage once, leaving
    out parameters and the input, alive anyway): within the budget, and more than with none."""
    net, x, c = build("glow")
    alive = {p.untyped_storage().data_ptr() for p in net.parameters()} | {x.untyped_storage().data_ptr()}

    def saved_during_step(budget):
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in alive:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with invnet.memory_budget(budget), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            z, ld = net(x.requires_grad_(True))
        (z.sum() + ld.sum()).backward()
        return sum(seen.values())

    saved_during_step(1)  # measure once
    total = sum(invnet.memory_plans(net)[0].nbytes)
    assert saved_during_step(0) == 0
    for budget in (total // 4, total // 2):
        saved_during_step(budget)  # plans
        kept = saved_during_step(budget)
        assert 0 < kept <= budget
    assert saved_during_step(math.inf) <= total


def test_plan_is_cached_per_shape_and_stable():
    net, x, _ = build("glow")

    def step(inp):
        z, ld = net(inp)
        (z.sum() + ld.sum()).backward()

    with invnet.memory_budget("10kB"):
        step(x)
        (plan,) = invnet.memory_plans(net)
        step(x)
        step(x)
        assert invnet.memory_plans(net) == [plan]
        step(torch.randn(5, 2, 8, 8, dtype=D))
    plans = invnet.memory_plans(net)
    assert len(plans) == 2 and plans[1].key[1] == (5, 2, 8, 8)
    invnet.core.clear_memory_plans(net)
    assert invnet.memory_plans(net) == []


@pytest.mark.parametrize("budget", ["unlimited", "1GB"])  # plain autograd; every unit kept in segments
def test_backward_twice_with_retain_graph(budget):
    net, x, _ = build("hint")
    with invnet.memory_saving(False):
        reference = grads(net, x, None)[0]
    with invnet.memory_budget(budget):
        grads(net, x, None)  # measures (the finite budget)
        xg = x.clone().requires_grad_(True)
        z, ld = net(xg)
        w = torch.linspace(-1, 1, z.numel(), dtype=D).reshape(z.shape)
        loss = (w * z).sum() + 0.5 * (z**2).sum() + (torch.arange(ld.numel(), dtype=D) * ld).sum()
        (g1,) = torch.autograd.grad(loss, xg, retain_graph=True)
        (g2,) = torch.autograd.grad(loss, xg)
    assert max_error([g1, g2], [reference, reference]) <= 1e-10


@pytest.mark.parametrize("budget", ["unlimited", "1GB"])  # plain autograd; every unit kept in segments
def test_hooks_fire_once_with_kept_blocks(budget):
    net, x, _ = build("glow")
    with invnet.memory_budget(budget):
        z, ld = net(x)  # measures (the finite budget)
    (z.sum() + ld.sum()).backward()
    counts = {}
    for i, p in enumerate(net.parameters()):
        p.register_hook(lambda g, i=i: counts.__setitem__(i, counts.get(i, 0) + 1))
    with invnet.memory_budget(budget):
        z, ld = net(x)
    (z.sum() + ld.sum()).backward()
    assert set(counts.values()) == {1} and len(counts) == len(list(net.parameters()))
    assert all(invnet.memory_plans(net)[-1].keep)


def test_greedy_prefers_time_per_byte_and_fills_gaps():
    # 0: cheap per byte, 1 and 2: dear per byte; 3 does not fit after 1 and 2 but 2 more bytes do
    keep = greedy_keep((100, 10, 10, 95, 2), (1.0, 1.0, 1.0, 0.5, 0.001), budget=25)
    assert keep == (False, True, True, False, True)


@pytest.mark.parametrize("text,expected", [("2GB", 2e9), ("512 MiB", 512 * 2**20), ("1.5e3", 1500.0),
                                           ("0", 0.0), (7, 7.0), ("Unlimited", math.inf), (None, None)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["-1GB", "two GB", "5 parsecs", -3, True, [1]])
def test_parse_bytes_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="memory budget"):
        invnet.memory_budget(bad).__enter__()


def count_segments(monkeypatch):
    """Record the number of units of every kept segment as it closes."""
    from invnet.core import budget

    sizes = []
    close = budget._Segment.close

    def counting_close(self):
        sizes.append(self.units)
        close(self)

    monkeypatch.setattr(budget._Segment, "close", counting_close)
    return sizes


def test_consecutive_kept_units_form_one_graph(monkeypatch):
    """Kept neighbours in a chain are one autograd graph (one gradient call, plain autograd's
    speed); a unit that is recomputed, or a chain entered from a network's own code, cuts it."""
    from invnet.layers import ActNorm, AffineCoupling, Conv1x1

    torch.manual_seed(0)
    shared = Conv1x1(2)  # used twice: both uses must get their gradient
    inner = invnet.Chain(ActNorm(2), AffineCoupling(2, hidden=8, ndim=1))
    net = randomize_parameters_(invnet.Chain(
        ActNorm(2), shared, inner, AffineCoupling(2, hidden=8, ndim=1), shared,
    ).to(D), 0.2)
    x = torch.randn(3, 2, 8, dtype=D)
    with torch.no_grad():
        net(x)
    with invnet.memory_saving(False):
        reference = grads(net, x, None)
    sizes = count_segments(monkeypatch)
    with invnet.memory_budget("1MB"):
        grads(net, x, None)  # measures every unit
    nbytes = invnet.memory_plans(net)[-1].nbytes
    with invnet.memory_budget(sum(nbytes)):  # room for every unit
        grads(net, x, None)  # plans
        sizes.clear()
        got = grads(net, x, None)
    assert all(invnet.memory_plans(net)[-1].keep)
    assert sizes == [6]  # the nested chain joins its neighbours
    assert max_error(got, reference) <= 1e-10

    budget = sum(nbytes) - nbytes[3] // 2  # everything but (at least) one unit fits
    with invnet.memory_budget(budget):
        grads(net, x, None)  # plans
        sizes.clear()
        got = grads(net, x, None)
    plan = invnet.memory_plans(net)[-1]
    kept_runs = [len(run) for run in "".join("k" if k else " " for k in plan.keep).split()]
    assert sizes == kept_runs and sum(sizes) < 6
    assert max_error(got, reference) <= 1e-10


def test_a_network_s_own_code_cuts_the_segments(monkeypatch):
    """A multiscale network hands its levels' chains pieces of tensors from its own code; each
    level's chain then starts a graph of its own, and gradients stay exact."""
    net, x, c = build("cond_glow")
    with invnet.memory_saving(False):
        reference = grads(net, x, c)
    sizes = count_segments(monkeypatch)
    with invnet.memory_budget("1GB"):
        grads(net, x, c)  # measures
        grads(net, x, c)  # plans: every unit fits
        sizes.clear()
        got = grads(net, x, c)
    assert all(invnet.memory_plans(net)[0].keep)
    assert len(sizes) > 1 and sum(sizes) == len(invnet.memory_plans(net)[0].units)
    assert max_error(got, reference) <= 1e-10


def test_an_unlimited_budget_is_plain_autograd(monkeypatch):
    """Every unit keeps, so the step is plain autograd itself: no memory-saving node in the graph,
    no kept segment, what autograd saves is what it saves with memory saving off, and the plan
    still lists every unit as kept."""
    net, x, c = build("cond_glow")
    sizes = count_segments(monkeypatch)

    def saved_bytes():
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            z, ld = net(x, c)
        return z, ld, sum(seen.values())

    def node_names(*outputs):
        names, todo, seen = set(), [t.grad_fn for t in outputs], set()
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            names.add(type(node).__name__)
            todo += [n for n, _ in node.next_functions]
        return names

    with invnet.memory_saving(False):
        *_, plain = saved_bytes()
    for step in range(3):  # every step, not only the first (which stores the all-kept plan)
        with invnet.memory_budget("unlimited"):
            z, ld, unlimited = saved_bytes()
        assert not any("MemorySavingCall" in n for n in node_names(z, ld)), step
        assert sizes == [] and unlimited == plain
    (plan,) = invnet.memory_plans(net)
    assert all(plan.keep) and plan.nbytes is None and len(plan.units) > 4
