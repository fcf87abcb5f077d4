r"""A memory budget: keep the activations of some blocks, recompute the others.

The memory-free bridge (:mod:`invnet.core.module`) keeps nothing: its backward rebuilds every
block's input from its output, which costs about one more forward pass. A model that fits in memory
pays that for nothing, and one that almost fits has no middle ground. Inside
``with memory_budget(nbytes):`` the blocks of a :class:`~invnet.Chain` (its *units*: the children
that are not themselves chains) either

* **keep** their activations: the unit's own ``_forward`` is recorded by ordinary autograd (on
  detached leaves of its input, condition and parameters), and its backward is that graph's
  ``torch.autograd.grad``: no rebuild, no recomputation. Kept units that follow each other in a
  chain are recorded as one graph (a *segment*) and differentiated by one call; a recomputed
  unit, or a chain entered from a network's own code (a multiscale split), starts a new segment;
  or
* **recompute**: the unit runs without a graph, and its hand-written ``_vjp`` rebuilds its input
  from its output as before.

Which units keep is a 0/1 knapsack solved greedily by *time saved per byte*: unit :math:`k` costs
:math:`b_k` bytes kept (what autograd saves for it, counted with saved-tensor hooks, each storage
once, parameters excluded) and saves :math:`t_k` seconds (the time of its forward, which is what
its memory-free backward spends on rebuilding and re-running the conditioner). Units are taken in
order of decreasing :math:`t_k / b_k` while :math:`\sum b_k \le B`; a unit that does not fit is
skipped and smaller ones are still tried. Large early scales (many bytes for their time) are
therefore the first to be recomputed, the small coarse scales the first to be kept.

The figures come from the **first step** of each network and input shape, which measures every
unit once (each unit's graph is recorded, counted, timed and dropped at once: that step keeps
nothing and peaks at one unit's activations). The plan is then cached on the network, keyed by the
direction (``forward`` or ``inverse``), the shapes of input and condition, dtype and device, so the
decision is the same at every later step (a new shape measures once more; see
:func:`memory_plans` and :func:`clear_memory_plans`). An unlimited budget keeps every unit from the
first step and measures nothing: the call then *is* plain autograd, so the bridge runs it as such
(no memory-saving node, no segments; the tape only lists the units for the plan it reports) and it
costs what plain autograd costs. A budget of 0 (or ``None``, the default outside the context)
keeps nothing: today's memory-free backward.

Gradients are the same either way (kept units differentiate the forward, recomputed ones the
rebuilt forward; they agree to round-off). The budget counts *activation* bytes on top of the
memory-free step; parameters, the network's output and the condition are not part of it. While a
step runs, a unit whose planned bytes would overflow the budget is recomputed instead, so the kept
bytes never exceed it.

>>> import torch, invnet
>>> from invnet.networks import Glow
>>> flow = Glow(channels=2, levels=2, depth=2, ndim=1, hidden=8).double()
>>> x = torch.randn(4, 2, 16, dtype=torch.float64)
>>> with invnet.memory_budget("20kB"):
...     for step in range(2):  # the first step measures, the second keeps
...         z, logdet = flow(x)
...         (0.5 * (z**2).sum() - logdet.sum()).backward()
>>> plan = invnet.memory_plans(flow)[0]
>>> 0 < plan.kept_bytes <= 20_000, len(plan.keep) == len(plan.units)
(True, True)
"""
from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .forward_mode import in_plain_forward_mode, naming_block
from .vjp import GradStore, parameter_aliases

if TYPE_CHECKING:  # module.py imports this module
    from .module import VJPResult

__all__ = [
    "memory_budget", "current_memory_budget", "parse_bytes", "BudgetPlan", "memory_plans", "clear_memory_plans",
]

_state = threading.local()

_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_UNLIMITED = ("inf", "unlimited", "all")


def parse_bytes(value: Union[None, int, float, str]) -> Optional[float]:
    """A byte count from ``None``, a number, or a string such as ``"2GB"``, ``"512 MiB"``,
    ``"1.5e9"``, ``"unlimited"`` (decimal units kB/MB/GB/TB are powers of 1000, binary
    KiB/MiB/GiB/TiB powers of 1024). Returns ``None`` for ``None`` and ``math.inf`` for an
    unlimited budget; raises ``ValueError`` naming the accepted forms otherwise.

    >>> parse_bytes("2GB"), parse_bytes("1 KiB"), parse_bytes(0), parse_bytes("unlimited")
    (2000000000.0, 1024.0, 0.0, inf)
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"a memory budget must be a byte count, not a bool ({value!r})")
    if isinstance(value, (int, float)):
        n = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in _UNLIMITED:
            return math.inf
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]i?b|b)?", text)
        if m is None:
            raise ValueError(
                f"cannot read a memory budget from {value!r}: expected bytes as a number or a string like "
                "'2GB', '512MiB', '0' or 'unlimited'"
            )
        n = float(m.group(1)) * _UNITS[m.group(2) or ""]
    else:
        raise ValueError("a memory budget must be None, a number of bytes or a string like '2GB'; "
                         f"got {type(value).__name__}")
    if math.isnan(n) or n < 0:
        raise ValueError(f"a memory budget must be >= 0 bytes, got {value!r}")
    return n


def current_memory_budget() -> Optional[float]:
    """The budget in force on this thread (bytes; ``None`` outside :func:`memory_budget`)."""
    return getattr(_state, "budget", None)


@contextlib.contextmanager
def memory_budget(nbytes: Union[None, int, float, str]) -> Iterator[None]:
    """Let blocks keep activations up to ``nbytes`` inside a ``with`` block (thread-local).

    ``nbytes``: bytes or a string (``"2GB"``, ``"unlimited"``, see :func:`parse_bytes`); ``None``
    restores the default (keep nothing, the memory-free backward), ``0`` recomputes everything,
    ``math.inf`` keeps everything. Has effect only where memory saving is on (the default): see
    the module docstring for the choice of the blocks that keep and the plan cached per network.

    >>> import torch, invnet
    >>> flow = invnet.Chain(invnet.layers.ActNorm(2), invnet.layers.AffineCoupling(2, 8, ndim=0))
    >>> with invnet.memory_budget("unlimited"):
    ...     z, logdet = flow(torch.randn(5, 2))
    ...     (z.sum() + logdet.sum()).backward()
    >>> invnet.memory_plans(flow)[0].keep
    (True, True)
    """
    budget = parse_bytes(nbytes)
    previous = current_memory_budget()
    _state.budget = budget
    try:
        yield
    finally:
        _state.budget = previous


# ----------------------------------------------------------------------------------------------
# plans
@dataclass(frozen=True)
class BudgetPlan:
    """Which units of one network keep their activations, for one input shape and budget.

    ``units``: the unit types in the order of the forward walk; ``nbytes`` and ``seconds``: what
    each kept unit costs and saves (measured at the first step; ``None`` when the budget was
    unlimited and nothing was measured); ``keep``: the decision; ``kept_bytes``: planned bytes of
    the kept units (``None`` if not measured); ``budget``: the budget in bytes; ``key``: the
    direction, shapes, dtype and device the plan is for."""

    key: tuple
    budget: float
    units: tuple[str, ...]
    keep: tuple[bool, ...]
    nbytes: Optional[tuple[int, ...]] = None
    seconds: Optional[tuple[float, ...]] = None

    @property
    def kept_bytes(self) -> Optional[int]:
        if self.nbytes is None:
            return None
        return sum(b for b, k in zip(self.nbytes, self.keep) if k)


def greedy_keep(nbytes: tuple[int, ...], seconds: tuple[float, ...], budget: float) -> tuple[bool, ...]:
    """The units to keep within ``budget`` bytes: by decreasing time saved per byte (ties: the
    later unit first), skipping those that no longer fit.

    >>> greedy_keep((100, 10, 10), (1.0, 1.0, 0.5), budget=25)
    (False, True, True)
    """
    order = sorted(range(len(nbytes)), key=lambda k: (-seconds[k] / max(nbytes[k], 1), -k))
    keep = [False] * len(nbytes)
    used = 0
    for k in order:
        if used + nbytes[k] <= budget:
            keep[k] = True
            used += nbytes[k]
    return tuple(keep)


@dataclass
class _Cache:
    stats: dict = field(default_factory=dict)  # key -> (units, nbytes, seconds)
    plans: dict = field(default_factory=dict)  # (key, budget) -> BudgetPlan


def _cache(module: nn.Module) -> _Cache:
    cache = module.__dict__.get("_invnet_budget_cache")
    if cache is None:
        cache = _Cache()
        module.__dict__["_invnet_budget_cache"] = cache
    return cache


def memory_plans(module: nn.Module) -> list[BudgetPlan]:
    """The plans cached on ``module`` (a network called under :func:`memory_budget`), oldest first."""
    cache = module.__dict__.get("_invnet_budget_cache")
    return [] if cache is None else list(cache.plans.values())


def clear_memory_plans(module: nn.Module) -> None:
    """Forget the measured figures and plans of ``module``: the next step under a budget measures
    again (after a change that alters the cost of its blocks, e.g. another device)."""
    module.__dict__.pop("_invnet_budget_cache", None)


def _plan_key(inverse: bool, inp: Tensor, c: Optional[Tensor]) -> tuple:
    return ("inverse" if inverse else "forward", tuple(inp.shape), None if c is None else tuple(c.shape),
            str(inp.dtype), str(inp.device))


# ----------------------------------------------------------------------------------------------
# the tape: what one step records (forward) and replays (backward)
class _Segment:
    """A run of consecutive kept units recorded as one autograd graph.

    Units that follow each other directly in a chain (the output of one is the input of the next
    and, in the backward, the chain hands the cotangent straight back) need no boundary between
    their graphs: the segment starts from a detached leaf of its first unit's input, chains the
    units' graphs, and is differentiated by one ``torch.autograd.grad`` when the backward reaches
    its last unit. The earlier units of the segment then pass the rebuilt input and its cotangent
    through. One call per segment instead of one per unit keeps the per-unit overhead of a budget
    that keeps most units small (an unlimited budget skips segments altogether: it is plain
    autograd). The graph is held through gradient edges of the outputs (the last
    unit's output and every unit's logdet), so that no output tensor is kept alive by this record.
    """

    __slots__ = ("x", "c_source", "c", "originals", "aliases", "logdets", "output", "last", "units",
                 "visited", "dlogdet", "result")

    def __init__(self, x: Tensor, c_source: Optional[Tensor], c: Optional[Tensor]) -> None:
        self.x, self.c_source, self.c = x, c_source, c
        self.originals: list[nn.Parameter] = []
        self.aliases: list[Tensor] = []
        self.logdets: list[GradientEdge] = []
        self.output: Optional[GradientEdge] = None
        self.last: Optional[tuple[Tensor, Tensor]] = None  # (attached output, what the chain got)
        self.units = 0
        self.visited = 0
        self.dlogdet: Optional[Tensor] = None
        self.result: Optional[Tensor] = None

    def add(self, y: Tensor, logdet: Tensor, originals: list[nn.Parameter], aliases: list[Tensor]) -> Tensor:
        """Append one unit's outputs; returns the detached output the chain passes on."""
        self.originals += originals
        self.aliases += aliases
        if logdet.requires_grad:  # a squeeze's constant logdet has no edge and no cotangent
            self.logdets.append(get_gradient_edge(logdet))
        self.units += 1
        handed = y.detach()
        self.last = (y, handed)
        return handed

    def continues_from(self, x: Tensor, c: Optional[Tensor]) -> Optional[Tensor]:
        """The attached output to feed the next unit, if it takes the last output and condition."""
        if self.last is not None and x is self.last[1] and c is self.c_source and self.last[0].requires_grad:
            return self.last[0]
        return None

    def close(self) -> None:
        if self.last is not None:
            y = self.last[0]
            self.output = get_gradient_edge(y) if y.requires_grad else None
            self.last = None  # the edges hold the graph; the output tensor itself may go

    def vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, grads: GradStore, keep_graph: bool) -> VJPResult:
        """The backward of one unit of the segment: the whole segment's gradient at its last unit
        (visited first), a pass-through at the others."""
        first = self.visited == 0
        self.visited = (self.visited + 1) % self.units
        if not first:
            if dy is not self.result or not (dlogdet is self.dlogdet or torch.equal(dlogdet, self.dlogdet)):
                raise RuntimeError("a kept segment of a memory budget was walked out of order (internal error)")
            if self.visited == 0 and not keep_graph:
                self.result = self.dlogdet = None
            return y, dy, None
        pairs = ([(self.output, dy)] if self.output is not None else []) + [(e, dlogdet) for e in self.logdets]
        wrt = [self.x] + ([self.c] if self.c is not None else []) + list(self.aliases)
        g = torch.autograd.grad([e for e, _ in pairs], wrt, [v for _, v in pairs], allow_unused=True,
                                retain_graph=keep_graph) if pairs else [None] * len(wrt)
        grads.add_many(self.originals, g[1 + (self.c is not None):])
        dx = torch.zeros_like(self.x) if g[0] is None else g[0]
        dc = g[1] if self.c is not None else None  # None: the units ignore c (zero)
        if self.units > 1:  # what the earlier units of the segment will be handed
            self.result, self.dlogdet = dx, dlogdet
        return self.x.detach(), dx, dc


class _ByteCounter:
    """Saved-tensor hooks that add up the bytes autograd saves, each storage once, leaving out
    storages that are alive anyway (parameters, the condition)."""

    def __init__(self, exclude: list[Tensor]) -> None:
        self.seen: dict[int, int] = {}
        self.exclude = {_storage_key(t) for t in exclude if t is not None}

    def see(self, t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in self.exclude:
            try:
                self.seen[key] = t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):
                self.seen[key] = t.numel() * t.element_size()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _storage_key(t: Tensor) -> Any:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(t)


class Tape:
    """What one top-level call does with its units under a budget: ``measure`` (first step:
    count and time every unit, keep none), ``keep`` (follow the plan), or ``list`` (an unlimited
    budget: the call is plain autograd and the tape only names its units for the plan).
    :meth:`InvertibleModule._call <invnet.core.module.InvertibleModule>` makes it
    (:meth:`for_call`); the bridge records into it in the forward and replays it in the backward
    (a listing tape is never replayed)."""

    def __init__(self, module: nn.Module, key: tuple, budget: float, plan: Optional[BudgetPlan]) -> None:
        self.module, self.key, self.budget, self.plan = module, key, budget, plan
        self.measuring = plan is None and math.isfinite(budget)
        # unlimited, at every step (a stored all-kept plan must not send later steps down the
        # per-unit path): the call is plain autograd and the tape only lists its units
        self.listing = math.isinf(budget)
        self.index = 0
        self.units: list[str] = []
        self.nbytes: list[int] = []
        self.seconds: list[float] = []
        self.kept: dict[int, list[Optional[_Segment]]] = {}
        self.segment: Optional[_Segment] = None  # the kept segment still growing in the forward
        self.kept_bytes = 0
        self.replaying = False
        self.keep_graph = False

    @classmethod
    def for_call(cls, module: nn.Module, inverse: bool, inp: Tensor, c: Optional[Tensor]) -> Optional[Tape]:
        """The tape for a top-level call now, or ``None`` when no budget (or budget 0) is in force."""
        budget = current_memory_budget()
        if not budget:
            return None
        if not getattr(module, "memory_budget_supported", True):
            raise ValueError(
                f"{type(module).__name__} does not take a memory budget (its ranks must all walk the same "
                "backward, and each would plan from its own timings); run it without invnet.memory_budget"
            )
        key = _plan_key(inverse, inp, c)
        cache = _cache(module)
        plan = cache.plans.get((key, budget))
        if plan is None and key in cache.stats:
            units, nbytes, seconds = cache.stats[key]
            plan = BudgetPlan(key, budget, units, greedy_keep(nbytes, seconds, budget), nbytes, seconds)
            cache.plans[(key, budget)] = plan
        return cls(module, key, budget, plan)

    # -- forward -------------------------------------------------------------------------------
    def _wants(self, index: int, unit: nn.Module) -> bool:
        if self.plan is None:  # a measuring step keeps nothing
            return False
        return index < len(self.plan.keep) and self.plan.keep[index] and self.plan.units[index] == type(unit).__name__

    def run(
        self, unit: nn.Module, fn: Callable, x: Tensor, c: Optional[Tensor], follows: bool
    ) -> tuple[Tensor, Tensor]:
        index = self.index
        self.index += 1
        self.units.append(type(unit).__name__)
        if self.listing:
            with _paused():
                return fn(x, c)
        keep = self._wants(index, unit)
        if keep and self.plan is not None and self.plan.nbytes is not None:
            if self.kept_bytes + self.plan.nbytes[index] > self.budget:
                keep = False  # the walk differs from the plan's: never overflow the budget
        if self.measuring:
            self._close_segment()
            return self._measure(unit, fn, x, c)
        if not keep:
            self._close_segment()
            self.kept.setdefault(id(unit), []).append(None)
            with _paused():
                return fn(x, c)
        from .module import memory_saving  # local: module imports this file

        segment = self.segment
        attached = segment.continues_from(x, c) if (segment is not None and follows) else None
        if attached is None:
            self._close_segment()
            x_leaf = x.detach().requires_grad_(True)
            c_leaf = c.detach().requires_grad_(True) if (c is not None and c.is_floating_point()) else c
            segment = self.segment = _Segment(x_leaf, c, c_leaf if c_leaf is not c else None)
            attached = x_leaf
        c_in = segment.c if segment.c is not None else c
        with _paused(), memory_saving(False), torch.enable_grad(), parameter_aliases(unit) as (originals, aliases):
            y, logdet = fn(attached, c_in)
        if self.plan is not None and self.plan.nbytes is not None:
            self.kept_bytes += self.plan.nbytes[index]
        self.kept.setdefault(id(unit), []).append(segment)
        return segment.add(y, logdet, originals, aliases), logdet.detach()

    def _measure(self, unit: nn.Module, fn: Callable, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Record one unit's graph to count its saved bytes and time it, then drop it."""
        from .module import memory_saving  # local: module imports this file

        x_leaf = x.detach().requires_grad_(True)
        c_leaf = c.detach().requires_grad_(True) if (c is not None and c.is_floating_point()) else c
        counter = _ByteCounter(list(unit.parameters()) + [c])
        with _paused(), memory_saving(False), torch.enable_grad(), parameter_aliases(unit):
            start = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(counter.see, lambda t: t):
                y, logdet = fn(x_leaf, c_leaf)
            counter.see(x_leaf)
            if y.device.type == "cuda":
                torch.cuda.synchronize(y.device)
            self.nbytes.append(counter.total)
            self.seconds.append(time.perf_counter() - start)
        self.kept.setdefault(id(unit), []).append(None)
        return y.detach(), logdet.detach()

    def _close_segment(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None

    def finish_forward(self) -> None:
        """Store what a measuring step found; the plan follows at the next step."""
        self._close_segment()
        cache = _cache(self.module)
        if self.measuring:
            cache.stats[self.key] = (tuple(self.units), tuple(self.nbytes), tuple(self.seconds))
            keep = greedy_keep(tuple(self.nbytes), tuple(self.seconds), self.budget)
            cache.plans[(self.key, self.budget)] = BudgetPlan(
                self.key, self.budget, tuple(self.units), keep, tuple(self.nbytes), tuple(self.seconds),
            )
        elif self.listing:  # unlimited: every unit kept, nothing measured
            units = tuple(self.units)
            everything = BudgetPlan(self.key, self.budget, units, (True,) * len(units))
            cache.plans.setdefault((self.key, self.budget), everything)

    @property
    def has_kept(self) -> bool:
        return any(r is not None for rs in self.kept.values() for r in rs)

    # -- backward ------------------------------------------------------------------------------
    def vjp(self, unit: nn.Module, vjp: Callable, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor],
            grads: GradStore) -> VJPResult:
        records = self.kept.get(id(unit))
        record = None
        if records:
            record = records[-1] if self.keep_graph else records.pop()
            if self.keep_graph:  # a second backward walks them again: rotate instead of dropping
                records.insert(0, records.pop())
        if record is None:
            with _paused():
                return vjp(y, dy, dlogdet, c, grads)
        return record.vjp(y, dy, dlogdet, grads, self.keep_graph)

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        with _active(self):
            yield
        self.finish_forward()

    @contextlib.contextmanager
    def replay(self, keep_graph: bool) -> Iterator[None]:
        self.replaying, self.keep_graph = True, keep_graph
        try:
            with _active(self):
                yield
        finally:
            self.replaying = False


@contextlib.contextmanager
def _active(tape: Optional[Tape]) -> Iterator[None]:
    previous = getattr(_state, "tape", None)
    _state.tape = tape
    try:
        yield
    finally:
        _state.tape = previous


def _paused() -> contextlib.AbstractContextManager:
    # inside a unit, nested chains run plainly: the unit is the finest grain of the plan
    return _active(None)


def _tape() -> Optional[Tape]:
    return getattr(_state, "tape", None)


# ----------------------------------------------------------------------------------------------
# what Chain calls for each of its units
def unit_forward(unit: nn.Module, x: Tensor, c: Optional[Tensor], inverse: bool,
                 follows: bool = False) -> tuple[Tensor, Tensor]:
    """``unit._forward(x, c)`` (or ``_inverse``), kept or recomputed as the running step's plan
    says; a plain call when no budget is recording. ``follows``: ``x`` is the previous unit's
    output handed on directly, and the backward hands the cotangent straight back (a chain's
    walk), so that consecutive kept units may form one graph."""
    fn = unit._inverse if inverse else unit._forward
    if in_plain_forward_mode():
        with naming_block(type(unit).__name__):  # name the unit that has no forward-mode rule
            return fn(x, c)
    tape = _tape()
    if tape is None or tape.replaying:
        return fn(x, c)
    return tape.run(unit, fn, x, c, follows)


def unit_vjp(unit: nn.Module, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore,
             inverse: bool) -> VJPResult:
    """``unit._vjp`` (or ``_vjp_inverse``), or the kept graph's gradient when the unit kept it."""
    vjp = unit._vjp_inverse if inverse else unit._vjp
    tape = _tape()
    if tape is None or not tape.replaying:
        return vjp(y, dy, dlogdet, c, grads)
    return tape.vjp(unit, vjp, y, dy, dlogdet, c, grads)
