r"""Reconstruction drift: how far the inputs the memory-free backward rebuilds are from the true ones.

The memory-free backward trusts that every block's inverse rebuilds its input. In low precision,
or when a trained flow's inverse explodes ("Understanding and Mitigating Exploding Inverses in
Invertible Neural Networks", Behrmann, Vicol, Wang, Grosse and Jacobsen, AISTATS 2021,
arXiv:2006.09347), the rebuilt inputs drift from the true ones and the gradients become silently
wrong. :func:`reconstruction_drift` measures it on a batch, with the relative error

.. math:: e(\hat x, x) = \|\hat x - x\|_2 / \|x\|_2 \quad (\text{over the whole batch}),

at three levels:

* the whole network: :math:`\hat x` is the input the memory-free backward rebuilds from the output
  (the network's own ``_vjp``, run with zero cotangents, so exactly the rebuild training uses);
* per scale: the input of the first block that runs at each space shape, as the backward
  rebuilds it, against the true one;
* per block: each block's own round trip :math:`f_k^{-1}(f_k(x_{k-1}))` on its actual input, which
  is about the block's inverse condition number times the unit roundoff, so the block with the
  largest error is the one to fix (:attr:`DriftReport.worst`, named by its module path).

It runs in the caller's autocast state, so wrap the call in the ``torch.autocast`` block the
training step uses. Cost: one forward with an extra inverse per block, then one backward with zero
cotangents (about four forwards), nothing recorded for autograd and no ``.grad`` touched; memory:
what a training step needs, plus one block input per scale kept for the comparison. A trainer
calls it every N steps and acts on :meth:`DriftReport.check`.

>>> import torch
>>> from invnet.networks import Glow
>>> net = Glow(2, hidden=8, levels=2, depth=2, ndim=2).double()
>>> report = reconstruction_drift(net, torch.randn(4, 2, 8, 8, dtype=torch.float64))
>>> report.error < 1e-13, report.worst.path.startswith("body.")
(True, True)
>>> report.check(warn_above=1e-6, fail_above=1e-3)
'ok'
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .module import InvertibleModule, VJPResult, _state_for
from .precision import full_precision
from .vjp import GradStore

__all__ = [
    "BlockDrift", "ScaleDrift", "DriftReport", "reconstruction_drift", "ReconstructionDriftError",
    "ReconstructionDriftWarning",
]


class ReconstructionDriftWarning(UserWarning):
    """The rebuilt inputs drift more than the warning threshold allows."""


class ReconstructionDriftError(RuntimeError):
    """The rebuilt inputs drift so far that the memory-free gradients cannot be trusted."""


@dataclass(frozen=True)
class BlockDrift:
    """One block's own round-trip error on the input the network gave it.

    ``path`` is its module path in the measured network (``""`` for the network itself),
    ``direction`` how the network uses it (``"forward"``, or ``"inverse"`` inside an
    :class:`~invnet.layers.Inverted`), ``space_shape`` the space shape of its input, ``clamp``
    its log-scale bound if it has one (couplings)."""

    path: str
    kind: str
    direction: str
    space_shape: tuple[int, ...]
    error: float
    clamp: Optional[float] = None


@dataclass(frozen=True)
class ScaleDrift:
    """The rebuilt input at the entry of one scale (the first block that runs at a space shape)
    against the true one, after the backward's rebuild from the network's output down to there
    (NaN if the backward does not rebuild that block through its own ``_vjp``), and the worst
    block of that scale."""

    space_shape: tuple[int, ...]
    error: float
    worst: BlockDrift


def _exceeds(value: float, threshold: float) -> bool:
    return not value <= threshold  # NaN exceeds every threshold


@dataclass(frozen=True)
class DriftReport:
    """What :func:`reconstruction_drift` measured: ``error`` for the whole network, ``scales``
    in forward order, ``blocks`` in the order the forward called them, and the autocast dtype
    it ran under."""

    error: float
    scales: tuple[ScaleDrift, ...]
    blocks: tuple[BlockDrift, ...]
    #: the autocast dtype the measurement ran under (``None``: autocast was off)
    autocast: Optional[torch.dtype] = None

    @property
    def worst(self) -> BlockDrift:
        """The block with the largest round-trip error (NaN counts as largest)."""
        return _worst(self.blocks)

    def as_metrics(self) -> dict[str, float]:
        """Flat numbers for a metrics log: ``reconstruction_error``, one
        ``reconstruction_error/scale_<i>`` per scale, and ``reconstruction_error/worst_block``."""
        metrics = {"reconstruction_error": self.error}
        for i, s in enumerate(self.scales):
            metrics[f"reconstruction_error/scale_{i}"] = s.error
        metrics["reconstruction_error/worst_block"] = self.worst.error
        return metrics

    def describe(self) -> str:
        """Several lines: the network, each scale, and the worst block."""
        precision = f"{self.autocast} autocast" if self.autocast is not None else "no autocast"
        lines = [f"reconstruction error {self.error:.2e} (whole network, {precision})"]
        for i, s in enumerate(self.scales):
            lines.append(
                f"  scale {i} {s.space_shape}: {s.error:.2e}; worst block {s.worst.path!r} "
                f"({s.worst.kind}) {s.worst.error:.2e}"
            )
        w = self.worst
        lines.append(f"  worst block: {w.path!r} ({w.kind}, {w.direction}) {w.error:.2e}")
        return "\n".join(lines)

    @property
    def single_block(self) -> bool:
        """Whether the worst block's own round trip explains the drift (at least a tenth of the
        whole network's error). If not, no block stands out: the error builds up over the rebuild
        (typically low-precision conditioners re-rounding slightly different rebuilt inputs)."""
        w = self.worst
        return not w.error < 0.1 * self.error

    def remedy(self) -> str:
        """What to do, in words and code a user can act on. When one block explains the drift:
        under autocast, run it in float32; if it has a clamp, lower it (an exploding inverse
        comes from large scales). When none does: run the network's conditioners in float32.
        Always: turning memory saving off stops relying on the rebuild."""
        w = self.worst
        if self.single_block and w.path:
            name, getter = repr(w.path), f"model.get_submodule({w.path!r})"
        else:
            name, getter = "the network's conditioners", "model"
        parts = []
        if self.autocast is not None:
            parts.append(
                f"run {name} in float32 (invnet.core.precision.pin_full_precision({getter})) "
                "or train without autocast"
            )
        if self.single_block and w.clamp is not None:
            parts.append(f"lower the clamp of {name} (now {w.clamp:g}) to bound its scales")
        parts.append("or turn memory saving off (invnet.memory_saving(False)) to stop relying on the rebuild")
        return "; ".join(parts)

    def check(self, warn_above: float, fail_above: float) -> str:
        """Compare the whole network's error with two thresholds: return ``"ok"``; or warn
        (:class:`ReconstructionDriftWarning`) and return ``"warn"`` above ``warn_above``; or raise
        :class:`ReconstructionDriftError` above ``fail_above``, naming the worst block and a
        remedy. NaN or infinite errors fail."""
        if not 0 < warn_above <= fail_above:
            raise ValueError(f"need 0 < warn_above <= fail_above, got {warn_above} and {fail_above}")
        if not _exceeds(self.error, warn_above):
            return "ok"
        w = self.worst
        where = (
            f"worst block {w.path!r} ({w.kind}) with a round-trip error of {w.error:.2e} at space shape "
            f"{w.space_shape}"
        )
        if not self.single_block:
            where += "; no block stands out: the error builds up over the rebuild"
        if _exceeds(self.error, fail_above):
            raise ReconstructionDriftError(
                f"reconstruction error {self.error:.2e} (the rebuilt input against the true one) is above "
                f"{fail_above:.1e}: the memory-free backward's gradients cannot be trusted. {where}. "
                f"Remedy: {self.remedy()}."
            )
        warnings.warn(
            f"reconstruction error {self.error:.2e} is above {warn_above:.1e}; {where}. If it keeps "
            f"growing: {self.remedy()}.",
            ReconstructionDriftWarning,
            stacklevel=2,
        )
        return "warn"


def _leaf_blocks(network: nn.Module) -> list[tuple[str, InvertibleModule]]:
    """Invertible blocks with no invertible block inside them, with their module paths."""
    found = []
    for path, m in network.named_modules():
        if isinstance(m, InvertibleModule) and not any(
            isinstance(sub, InvertibleModule) for sub in m.modules() if sub is not m
        ):
            found.append((path, m))
    return found


class _Probe:
    """Wraps the leaves' ``_forward``/``_inverse`` (measuring phase) and ``_vjp``/``_vjp_inverse``
    (rebuild phase) while the measurement runs: instance attributes, removed afterwards."""

    def __init__(self, leaves: list[tuple[str, InvertibleModule]]) -> None:
        self.leaves = leaves
        self.rebuilding = False
        self.blocks: list[BlockDrift] = []  # errors filled in at the end
        self.block_sq: list[Tensor] = []  # per block call: [|x_hat - x|^2, |x|^2]
        self.entries: list[int] = []  # indices of the blocks that open a scale
        self.truth: dict[int, Tensor] = {}  # scale entry -> its true input, until rebuilt
        self.scale_sq: dict[int, Tensor] = {}
        self.pending: dict[tuple[int, str], list[int]] = {}

    @staticmethod
    def squares(approx: Tensor, exact: Tensor) -> Tensor:
        d, e = approx.detach().double(), exact.detach().double()
        return torch.stack([(d - e).pow(2).sum(), e.pow(2).sum()])

    def _measure(
        self, path: str, block: InvertibleModule, direction: str
    ) -> Callable[[Tensor, Optional[Tensor]], tuple[Tensor, Tensor]]:
        cls = type(block)
        run = (cls._forward if direction == "forward" else cls._inverse).__get__(block)
        undo = (cls._inverse if direction == "forward" else cls._forward).__get__(block)
        clamp = getattr(block, "clamp", None)

        def call(inp: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
            out, logdet = run(inp, c)
            if self.rebuilding:  # e.g. a y-lane run forward inside a backward: not a rebuild
                return out, logdet
            index = len(self.blocks)
            space = tuple(inp.shape[2:])
            self.blocks.append(BlockDrift(
                path, cls.__name__, direction, space, float("nan"),
                float(clamp) if isinstance(clamp, (int, float)) else None,
            ))
            self.block_sq.append(self.squares(undo(out, c)[0], inp))
            if not self.entries or self.blocks[self.entries[-1]].space_shape != space:
                self.entries.append(index)  # the first block at a new space shape
                self.truth[index] = inp.detach().clone()
            self.pending.setdefault((id(block), direction), []).append(index)
            return out, logdet

        return call

    def _rebuild(
        self, block: InvertibleModule, direction: str
    ) -> Callable[[Tensor, Tensor, Tensor, Optional[Tensor], GradStore], VJPResult]:
        cls = type(block)
        vjp = (cls._vjp if direction == "forward" else cls._vjp_inverse).__get__(block)

        def call(out: Tensor, dout: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
            inp, dinp, dc = vjp(out, dout, dlogdet, c, grads)
            calls = self.pending.get((id(block), direction))
            if self.rebuilding and calls:  # this call rebuilds the input of the latest such call
                index = calls.pop()
                if index in self.truth:
                    self.scale_sq[index] = self.squares(inp, self.truth.pop(index))
            return inp, dinp, dc

        return call

    def __enter__(self) -> _Probe:
        for path, block in self.leaves:
            block.__dict__["_forward"] = self._measure(path, block, "forward")
            block.__dict__["_inverse"] = self._measure(path, block, "inverse")
            block.__dict__["_vjp"] = self._rebuild(block, "forward")
            block.__dict__["_vjp_inverse"] = self._rebuild(block, "inverse")
        return self

    def __exit__(self, *exc: object) -> None:
        for _, block in self.leaves:
            for name in ("_forward", "_inverse", "_vjp", "_vjp_inverse"):
                block.__dict__.pop(name, None)


def _worst(blocks: tuple[BlockDrift, ...]) -> BlockDrift:
    return max(blocks, key=lambda b: float("inf") if b.error != b.error else b.error)


def _ratio(sq: Tensor) -> float:
    num, den = float(sq[0]), float(sq[1])
    if num != num:
        return float("nan")
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return (num / den) ** 0.5


@torch.no_grad()
def reconstruction_drift(
    network: InvertibleModule,
    x: Tensor,
    c: Optional[Tensor] = None,
    sum_reduce: Optional[Callable[[Tensor], Tensor]] = None,
) -> DriftReport:
    """Measure how far the rebuilt inputs drift from the true ones on the batch ``x`` (with
    condition ``c``), for the whole network, per scale and per block (see the module docstring).

    Args:
        network: any invertible block or network (a :class:`~invnet.Chain`, a multiscale flow).
        x: a batch of inputs, as the training step feeds it.
        c: the condition, if the network takes one (for a network with a summary network, the
            summary's output: ``net.condition(y)``).
        sum_reduce: for distributed runs, a function summing a float64 tensor over the ranks
            that share the data (data parallel or domain decomposition), so that the errors are
            global; called once.

    Runs a forward (ActNorm layers not yet initialised initialise on it, as on any first call)
    and an inverse, without a graph, under the caller's autocast state. Returns a
    :class:`DriftReport`.
    """
    if not isinstance(network, InvertibleModule):
        raise ValueError(f"reconstruction_drift needs an InvertibleModule, got {type(network).__name__}")
    leaves = _leaf_blocks(network)
    with _Probe(leaves) as probe:
        z, _ = network(x, c)
        if not probe.blocks:
            raise ValueError(f"{type(network).__name__} ran no invertible block through _forward: nothing to measure")
        # the rebuild exactly as the memory-free backward does it (zero cotangents; the
        # parameter gradients go to a store that is thrown away)
        probe.rebuilding = True
        with full_precision(_state_for(z).without_cache()):
            x_rec, _, _ = network._vjp(z, torch.zeros_like(z), z.new_zeros(z.shape[0]), c, GradStore())
    sums = torch.stack(
        [probe.squares(x_rec, x)]
        + probe.block_sq
        + [probe.scale_sq.get(i, torch.full((2,), float("nan"), dtype=torch.float64)) for i in probe.entries]
    )
    if sum_reduce is not None:
        sums = sum_reduce(sums)
    n = len(probe.blocks)
    blocks = tuple(replace(b, error=_ratio(sq)) for b, sq in zip(probe.blocks, sums[1 : 1 + n]))
    scales = []
    bounds = probe.entries + [n]
    for k, sq in enumerate(sums[1 + n :]):
        members = blocks[bounds[k] : bounds[k + 1]]
        scales.append(ScaleDrift(members[0].space_shape, _ratio(sq), _worst(members)))
    autocast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    return DriftReport(_ratio(sums[0]), tuple(scales), blocks, autocast)
