"""The block contract (:class:`InvertibleModule`) and the autograd bridge.

Every invertible block maps ``x -> (y, logdet)`` with ``logdet = log|det dy/dx|`` per sample, and
can rebuild ``x`` from ``y``. Training therefore need not keep activations: the bridge below runs a
block (or a whole :class:`~invnet.Chain`) without recording a graph, saves only its output, and in
the backward pass calls the block's hand-written vector-Jacobian product, which rebuilds the input
on the way. Parameter gradients are handed back to autograd (parameters are inputs of the bridge's
``Function``), so hooks, clipping, gradient scalers and data-parallel reducers all see them.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor, nn

from .value_checks import check_finite

__all__ = [
    "InvertibleModule", "Backward", "memory_saving", "memory_saving_enabled", "GradStore", "parameter_aliases",
]

_state = threading.local()


def memory_saving_enabled() -> bool:
    """Whether invertible blocks called with grad enabled use the memory-free backward."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def memory_saving(enabled: bool = True) -> Iterator[None]:
    """Turn the memory-free backward on or off inside a ``with`` block (thread-local).

    ``memory_saving(False)`` runs plain autograd through the very same blocks, for checks and
    comparisons; results are identical up to round-off.

    >>> import torch, invnet
    >>> block = invnet.layers.ActNorm(3)
    >>> x = torch.randn(4, 3, 5, requires_grad=True)
    >>> with invnet.memory_saving(False):
    ...     y, logdet = block(x)
    >>> y.shape, logdet.shape
    (torch.Size([4, 3, 5]), torch.Size([4]))
    """
    previous = memory_saving_enabled()
    _state.enabled = bool(enabled)
    try:
        yield
    finally:
        _state.enabled = previous


class Backward(NamedTuple):
    """Result of a hand-written backward: the rebuilt input and the cotangents of input and
    condition (``dc`` is ``None`` when the block had no condition)."""

    x: Tensor
    dx: Tensor
    dc: Optional[Tensor]


class GradStore:
    """Accumulates parameter gradients during a hand-written backward, keyed by identity so that
    shared parameters add up."""

    def __init__(self) -> None:
        self._grads: dict[int, Tensor] = {}

    def add(self, param: Tensor, grad: Optional[Tensor]) -> None:
        if grad is None:
            return
        key = id(param)
        if key in self._grads:
            self._grads[key] = self._grads[key] + grad
        else:
            self._grads[key] = grad

    def add_many(self, params: "list[Tensor] | tuple[Tensor, ...]", grads) -> None:
        for p, g in zip(params, grads):
            self.add(p, g)

    def get(self, param: Tensor) -> Optional[Tensor]:
        return self._grads.get(id(param))


def add_optional(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """a + b where either may be None (meaning zero)."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


@contextlib.contextmanager
def parameter_aliases(module: nn.Module) -> Iterator[tuple[list[nn.Parameter], list[Tensor]]]:
    """Temporarily replace the trainable parameters of ``module`` by detached aliases (same
    storage, fresh autograd leaves), yielding ``(params, aliases)``.

    A block's hand-written backward differentiates its conditioner with a *local* autograd pass.
    Run on the real parameters, that pass would fire the user's tensor hooks a second time (once
    locally, once when autograd hands the gradient to the parameter). On aliases it fires none,
    and the gradients are returned to autograd, which then calls each hook exactly once.
    """
    slots = []
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.requires_grad:
                slots.append((sub, name, p))
    aliases = [p.detach().requires_grad_(True) for _, _, p in slots]
    try:
        for (sub, name, _), a in zip(slots, aliases):
            sub._parameters[name] = a
        yield [p for _, _, p in slots], aliases
    finally:
        for sub, name, p in slots:
            sub._parameters[name] = p


def _nesting_depth() -> int:
    return getattr(_state, "depth", 0)


@contextlib.contextmanager
def _nested() -> Iterator[None]:
    _state.depth = _nesting_depth() + 1
    try:
        yield
    finally:
        _state.depth -= 1


class InvertibleModule(nn.Module):
    """Base class of every invertible block.

    Subclasses implement

    * ``_forward(x, c) -> (y, logdet)``: differentiable by plain autograd;
    * ``_inverse(y, c) -> (x, logdet_inv)`` with ``logdet_inv = -logdet``;
    * ``_vjp(y, dy, dlogdet, c, grads) -> (x, dx, dc)``: the hand-written backward. From the output
      ``y`` it rebuilds ``x`` and returns the vector-Jacobian product
      ``dx = (dy/dx)^T dy + (d logdet/dx)^T dlogdet`` (likewise ``dc``), adding the parameter
      gradients to ``grads``;
    * ``_check_shape(shape, c_shape, inverse) -> out_shape``: validates input shapes without
      touching data or state, and returns the shape the call will produce.

    The default ``_vjp`` (rebuild, then re-run the forward under autograd) serves user blocks that
    do not write their own; every block shipped with invnet writes its own.

    Public face: ``y, logdet = block(x, c)``; ``x, logdet_inv = block.inverse(y, c)``; and the
    explicit backward ``block.backward(y, dy, dlogdet, c)`` that accumulates ``.grad`` the way
    InvertibleNetworks.jl users know.
    """

    #: Number of space dimensions the block expects (0 for vectors); ``None`` means any.
    ndim: Optional[int] = None
    #: Channel count the block expects on input (``None``: any).
    channels: Optional[int] = None
    #: Channel count of the condition (0: the block takes no condition and ignores ``c``).
    cond_channels: int = 0

    # ----------------------------------------------------------------------------------------
    # public face
    def forward(self, x: Tensor, c: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:  # noqa: D102
        return self._call(x, c, inverse=False)

    def inverse(self, y: Tensor, c: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Rebuild the input from the output; returns ``(x, logdet of the inverse map)``."""
        return self._call(y, c, inverse=True)

    def backward(
        self, y: Tensor, dy: Tensor, dlogdet: Optional[Tensor] = None, c: Optional[Tensor] = None
    ) -> Backward:
        """Explicit hand-written backward: rebuild the input from ``y`` and propagate ``dy`` and
        ``dlogdet`` (cotangent of the per-sample logdet, default zero). Parameter gradients are
        accumulated into ``.grad``. Returns :class:`Backward` ``(x, dx, dc)``."""
        if dlogdet is None:
            dlogdet = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
        self.check_shape(tuple(y.shape), None if c is None else tuple(c.shape), inverse=True)
        if tuple(dy.shape) != tuple(y.shape):
            raise ValueError(f"dy must have the shape of y {tuple(y.shape)}, got {tuple(dy.shape)}")
        if tuple(dlogdet.shape) != (y.shape[0],):
            raise ValueError(f"dlogdet must have shape ({y.shape[0]},), got {tuple(dlogdet.shape)}")
        grads = GradStore()
        with torch.no_grad():
            x, dx, dc = self._vjp(y, dy, dlogdet, c, grads)
        for p in self.parameters():
            g = grads.get(p)
            if g is not None and p.requires_grad:
                p.grad = g.detach().clone() if p.grad is None else p.grad + g
        return Backward(x, dx, dc)

    def check_shape(
        self, shape: tuple[int, ...], c_shape: Optional[tuple[int, ...]] = None, inverse: bool = False
    ) -> tuple[int, ...]:
        """Validate an input shape (of ``x``, or of ``y`` when ``inverse``) and return the output
        shape, raising ``ValueError`` naming what was expected. Touches no data and no state."""
        if len(shape) < 2:
            raise ValueError(
                f"{type(self).__name__} expects (batch, channels, *space), got shape {shape}"
            )
        if self.ndim is not None and len(shape) - 2 != self.ndim:
            raise ValueError(
                f"{type(self).__name__} was built for {self.ndim} space dimension(s), i.e. tensors "
                f"of {self.ndim + 2} dimensions (batch, channels, *space); got shape {shape}"
            )
        return self._check_shape(tuple(shape), c_shape, inverse)

    # ----------------------------------------------------------------------------------------
    # to implement
    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _check_shape(
        self, shape: tuple[int, ...], c_shape: Optional[tuple[int, ...]], inverse: bool
    ) -> tuple[int, ...]:
        if self.channels is not None and shape[1] != self.channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.channels} channels, got {shape[1]} "
                f"(shape {shape})"
            )
        return shape

    def _vjp(
        self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        # Generic fallback: rebuild the input, then differentiate a re-run of the forward.
        x, _ = self._inverse(y, c)
        return _vjp_by_rerun(self, self._forward, x, dy, dlogdet, c, grads)

    def _vjp_inverse(
        self, x: Tensor, dx: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Backward of the inverse map: from its output ``x`` rebuild ``y`` and propagate."""
        y, _ = self._forward(x, c)
        return _vjp_by_rerun(self, self._inverse, y, dx, dlogdet, c, grads)

    # ----------------------------------------------------------------------------------------
    # machinery
    def _grad_params(self) -> tuple[nn.Parameter, ...]:
        return tuple(p for p in self.parameters() if p.requires_grad)

    def _call(self, inp: Tensor, c: Optional[Tensor], inverse: bool) -> tuple[Tensor, Tensor]:
        if not isinstance(inp, Tensor):
            raise ValueError(f"expected a torch.Tensor, got {type(inp).__name__}")
        if c is not None and not isinstance(c, Tensor):
            raise ValueError(f"the condition c must be a torch.Tensor or None, got {type(c).__name__}")
        top_level = _nesting_depth() == 0
        if top_level:
            self.check_shape(tuple(inp.shape), None if c is None else tuple(c.shape), inverse)
            if not inp.is_floating_point():
                raise ValueError(f"expected a floating-point tensor, got dtype {inp.dtype}")
            # one host read-back for both (a GPU stalls on each), none under value_checks(False)
            check_finite({"y" if inverse else "x": inp, "the condition c": c})
        with _nested():
            if torch.is_grad_enabled() and memory_saving_enabled():
                params = self._grad_params()
                fn = _MemorySavingInverse if inverse else _MemorySavingForward
                out, logdet = fn.apply(self, inp, c, *params)
                return out, logdet
            return self._inverse(inp, c) if inverse else self._forward(inp, c)


def _vjp_by_rerun(module: nn.Module, fn, inp, dout, dlogdet, c, grads: GradStore):
    """VJP of ``fn(inp, c) -> (out, logdet)`` (a method of ``module``) by re-running it under
    autograd on parameter aliases."""
    inp = inp.detach().requires_grad_(True)
    c_req = None if c is None else c.detach().requires_grad_(c.is_floating_point())
    with torch.enable_grad(), parameter_aliases(module) as (originals, params):
        out, logdet = fn(inp, c_req)
        inputs = [inp] + ([c_req] if c_req is not None and c_req.requires_grad else []) + params
        pairs = [(o, d) for o, d in ((out, dout), (logdet, dlogdet)) if o.requires_grad]
        if pairs:
            g = torch.autograd.grad([o for o, _ in pairs], inputs, [d for _, d in pairs], allow_unused=True)
        else:
            g = [None] * len(inputs)
    dinp = g[0] if g[0] is not None else torch.zeros_like(inp)
    k = 1
    dc = None
    if c_req is not None and c_req.requires_grad:
        dc = g[1]
        k = 2
    grads.add_many(originals, g[k:])
    return inp.detach(), dinp, dc


def _graph_kept() -> bool:
    """Whether the running backward pass keeps the graph (``retain_graph=True``). When PyTorch
    cannot say, assume it does: keeping a saved tensor is always safe, freeing it is not."""
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if getter is None:
        return True
    try:
        return bool(getter())
    except RuntimeError:
        return True


class _SavedOutput:
    """The one tensor a memory-saving node keeps: its output, held as a detached alias.

    Unlike ``save_for_backward`` it can be let go *during* the backward: the block's ``_vjp``
    receives the only reference and drops it once it has rebuilt the input, so the output does
    not stay alive while the rest of the network's backward runs. The alias shares the output's
    version counter, so an in-place change of the output after the forward is still caught."""

    __slots__ = ("_box", "_version", "_owner")

    def __init__(self, out: Tensor, owner: str) -> None:
        self._box = [out.detach()]
        self._version = out._version
        self._owner = owner

    def take(self) -> Tensor:
        if not self._box:
            raise RuntimeError(
                f"Trying to backward through the memory-saving node of {self._owner} a second time; "
                "its saved output was released after the first backward. Pass retain_graph=True to "
                "the first backward call to backward twice."
            )
        out = self._box[0]
        if out._version != self._version:
            raise RuntimeError(
                f"the output of {self._owner}, needed by its memory-saving backward, was modified by "
                f"an in-place operation (version {out._version}, expected {self._version}); clone it "
                "before changing it in place"
            )
        if not _graph_kept():
            self._box.clear()
        return out


class _MemorySavingForward(torch.autograd.Function):
    """Runs ``module._forward`` without a graph; backward is ``module._vjp`` from the output."""

    @staticmethod
    def forward(ctx, module: InvertibleModule, x: Tensor, c: Optional[Tensor], *params: Tensor):
        y, logdet = module._forward(x, c)
        ctx.module = module
        ctx.params = params
        ctx.output = _SavedOutput(y, type(module).__name__)
        ctx.save_for_backward(c)
        return y, logdet

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor, dlogdet: Tensor):
        (c,) = ctx.saved_tensors
        grads = GradStore()
        # the output goes straight into the call so that no frame here keeps it alive
        _, dx, dc = ctx.module._vjp(ctx.output.take(), dy, dlogdet, c, grads)
        if c is None or not ctx.needs_input_grad[2]:
            dc = None
        return (None, dx, dc, *[grads.get(p) for p in ctx.params])


class _MemorySavingInverse(torch.autograd.Function):
    """Runs ``module._inverse`` without a graph; backward is ``module._vjp_inverse``."""

    @staticmethod
    def forward(ctx, module: InvertibleModule, y: Tensor, c: Optional[Tensor], *params: Tensor):
        x, logdet = module._inverse(y, c)
        ctx.module = module
        ctx.params = params
        ctx.output = _SavedOutput(x, f"{type(module).__name__}.inverse")
        ctx.save_for_backward(c)
        return x, logdet

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dx: Tensor, dlogdet: Tensor):
        (c,) = ctx.saved_tensors
        grads = GradStore()
        _, dy, dc = ctx.module._vjp_inverse(ctx.output.take(), dx, dlogdet, c, grads)
        if c is None or not ctx.needs_input_grad[2]:
            dc = None
        return (None, dy, dc, *[grads.get(p) for p in ctx.params])
