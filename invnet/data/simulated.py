"""Pairs simulated on the fly: a batch source that calls a simulator, named by an entry point.

When the forward model is cheap, every training batch can be fresh pairs drawn from the prior and
the simulator instead of a fixed file (no pair is seen twice, so the network cannot memorise
them). A *simulator* is any function

    simulate(n: int, generator: torch.Generator, **arguments) -> (x, y)

returning ``n`` pairs, channel-first (``(n, C, *space)``, or ``(n, D)`` for vectors), as torch
tensors or numpy arrays, drawing all its randomness from ``generator`` (a numpy simulator seeds
``numpy.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))``). A config
names it as ``"package.module:function"`` (:func:`load_entry_point`).

Batch ``k`` of batch group ``g`` is drawn with a generator seeded by ``(seed, k, g)``, so the
stream is a function of the step: :meth:`SimulatedPairs.state_dict` is the step, and a resumed
run draws exactly the batches an uninterrupted one would, on any device. The validation set is
simulated once from its own seeds, the same on every grid.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from .shard import Shard

__all__ = ["load_entry_point", "SimulatedPairs", "simulated_set", "simulation_generator"]

#: stream numbers of the seeds (training batches, validation set, the shape probe): they never share a seed
_TRAIN, _VALIDATION, _PROBE = 0, 1, 2


def load_entry_point(name: str, what: str = "entry point") -> Any:
    """The object ``name = "package.module:attribute"`` names (an attribute path may be dotted:
    ``"module:Class.method"``); raises ``ValueError`` naming ``what`` and the problem.

    >>> load_entry_point("math:sqrt")(4.0)
    2.0
    >>> load_entry_point("math.sqrt")
    Traceback (most recent call last):
    ...
    ValueError: entry point must be "package.module:name", got 'math.sqrt'
    """
    if not isinstance(name, str) or name.count(":") != 1 or not all(name.split(":")):
        raise ValueError(f'{what} must be "package.module:name", got {name!r}')
    module_name, attribute = name.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what} {name!r}: cannot import {module_name!r} ({err})") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {name!r}: {module_name!r} has no {attribute!r}")
        obj = getattr(obj, part)
    return obj


def simulation_generator(seed: int, stream: int, index: int, group: int = 0) -> torch.Generator:
    """A CPU generator seeded from ``(seed, stream, index, group)`` by numpy's ``SeedSequence``
    (well-mixed: neighbouring steps or groups give unrelated streams).

    >>> a = torch.rand(2, generator=simulation_generator(0, 0, 5))
    >>> bool((a == torch.rand(2, generator=simulation_generator(0, 0, 5))).all())
    True
    """
    entropy = [int(seed) & 0xFFFFFFFF, int(stream), int(index), int(group)]
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def _as_tensor(a: Any, dtype: torch.dtype, what: str) -> Tensor:
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(np.ascontiguousarray(a))
    if not isinstance(a, Tensor) or not a.is_floating_point():
        raise ValueError(f"the simulator must return floating-point tensors or arrays; {what} is "
                         f"{getattr(a, 'dtype', type(a).__name__)}")
    return a.detach().to(dtype)


def _simulate(simulate: Callable, n: int, generator: torch.Generator, arguments: dict,
              dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    out = simulate(n, generator, **arguments)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError(f"the simulator must return a pair (x, y), got {type(out).__name__}")
    x, y = _as_tensor(out[0], dtype, "x"), _as_tensor(out[1], dtype, "y")
    if x.dim() < 2 or y.dim() < 2 or x.shape[0] != n or y.shape[0] != n:
        raise ValueError(f"the simulator must return x and y with {n} samples along the first axis and a "
                         f"channel axis, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("the simulator returned NaN or Inf values")
    return x, y


def _cut(x: Tensor, y: Tensor, shard: Shard) -> tuple[Tensor, Tensor]:
    """This subdomain of each sample (``y`` too when it lives on the grid of ``x``)."""
    if not shard.splits_space:
        return x, y
    region = shard.region(tuple(x.shape[2:]))
    x_part = x[(slice(None), slice(None)) + region]
    y_part = y[(slice(None), slice(None)) + region] if y.shape[2:] == x.shape[2:] else y
    return x_part.contiguous(), y_part.contiguous()


class SimulatedPairs:
    r"""Endless batches of fresh pairs from a simulator (a :class:`~invnet.data.source.BatchSource`).

    Step :math:`k` of batch group :math:`g` calls ``simulate(batch_size, G_{k,g}, **arguments)``
    with a generator seeded by ``(seed, k, g)`` (:func:`simulation_generator`); with space split
    over ranks (``shard``), the ranks of a batch group draw the same samples and each keeps its
    subdomain (of ``y`` too when it lives on the grid of ``x``).

    Args:
        simulate: the simulator (module docstring) or its entry-point name.
        batch_size: samples per batch group and step.
        seed: seed of the stream.
        arguments: keyword arguments of the simulator.
        shard: this process's part (serial by default).
        dtype: dtype of the tensors.
        pin_memory: return page-locked tensors (non-blocking copies to a GPU).

    >>> def simulate(n, generator, scale=1.0):
    ...     x = torch.randn(n, 2, generator=generator)
    ...     return x, scale * x[:, :1] + 0.1 * torch.randn(n, 1, generator=generator)
    >>> source = SimulatedPairs(simulate, batch_size=4, seed=0, arguments={"scale": 2.0})
    >>> _ = source.next_batch(); state = source.state_dict(); b = source.next_batch()[0]
    >>> source.load_state_dict(state); bool((source.next_batch()[0] == b).all()), state["step"]
    (True, 1)
    """

    def __init__(self, simulate: Callable | str, batch_size: int, seed: int = 0, arguments: Optional[dict] = None,
                 shard: Optional[Shard] = None, dtype: torch.dtype = torch.float32, pin_memory: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.simulate = load_entry_point(simulate, "the simulator") if isinstance(simulate, str) else simulate
        if not callable(self.simulate):
            raise ValueError(f"the simulator must be callable, got {type(self.simulate).__name__}")
        self.batch_size, self.seed, self.arguments = int(batch_size), int(seed), dict(arguments or {})
        self.shard, self.dtype, self.pin_memory = shard or Shard(), dtype, pin_memory
        self.step = 0

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "groups": self.shard.groups}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"the simulated stream was saved with seed {state['seed']}, this one uses {self.seed}")
        if int(state["groups"]) != self.shard.groups:
            raise ValueError(
                f"the run was trained with {state['groups']} batch group(s) and resumes with {self.shard.groups}: the "
                f"global batch would change; use a grid with {state['groups']} batch ranks ([distributed] grid)")
        self.step = int(state["step"])

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The next ``(x, y)`` batch of this process."""
        generator = simulation_generator(self.seed, _TRAIN, self.step, self.shard.group)
        x, y = _cut(*_simulate(self.simulate, self.batch_size, generator, self.arguments, self.dtype), self.shard)
        self.step += 1
        return (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)

    def probe(self) -> tuple[Tensor, Tensor]:
        """One whole pair, drawn apart from the stream (its shapes tell the network's)."""
        return _simulate(self.simulate, 1, simulation_generator(self.seed, _PROBE, 0), self.arguments,
                         self.dtype)


def simulated_set(simulate: Callable | str, n: int, batch_size: int, seed: int = 0,
                  arguments: Optional[dict] = None, shard: Optional[Shard] = None,
                  dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, Tensor]]:
    """A fixed set of ``n`` simulated pairs (e.g. for validation), in batches of at most
    ``batch_size``: this process's part (its batch group's share of the samples, its subdomain of
    each). Chunk ``k`` of ``batch_size`` samples is drawn from its own seed, so the set is the same
    for any grid and never shares a seed with the training stream.

    >>> def simulate(n, generator):
    ...     return torch.randn(n, 1, generator=generator), torch.randn(n, 1, generator=generator)
    >>> whole = simulated_set(simulate, 5, batch_size=2)
    >>> [len(x) for x, _ in whole], [len(x) for x, _ in simulated_set(simulate, 5, 2, shard=Shard(1, 2))]
    ([2, 2, 1], [2])
    """
    simulate = load_entry_point(simulate, "the simulator") if isinstance(simulate, str) else simulate
    shard = shard or Shard()
    arguments = dict(arguments or {})
    xs, ys = [], []
    for k, start in enumerate(range(0, n, batch_size)):
        x, y = _simulate(simulate, min(batch_size, n - start), simulation_generator(seed, _VALIDATION, k), arguments,
                         dtype)
        xs.append(x)
        ys.append(y)
    if not xs:
        return []
    mine = torch.from_numpy(shard.samples(np.arange(n)))
    x, y = _cut(torch.cat(xs)[mine], torch.cat(ys)[mine], shard)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]

