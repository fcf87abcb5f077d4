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
import itertools
import threading
from typing import Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from .budget import Tape
from .forward_mode import forward_mode_active, plain_forward_mode, transforms_active
from .handover import HandOver
from .precision import AutocastState, conditioner_call, full_precision, recorded_autocast
from .value_checks import check_finite
from .vjp import GradStore, add_optional, local_vjp, parameter_aliases

__all__ = [
    "InvertibleModule", "Backward", "memory_saving", "memory_saving_enabled", "GradStore", "parameter_aliases",
    "add_optional", "Shape", "VJPResult",
]

#: A tensor shape, ``(batch, channels, *space)``.
Shape = tuple[int, ...]
#: What ``_vjp`` and ``_vjp_inverse`` return: the rebuilt input, its cotangent, and the
#: condition's cotangent (``None`` when the block takes no condition).
VJPResult = tuple[Tensor, Tensor, Optional[Tensor]]

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
    do not write their own; every block shipped with invnet writes its own, differentiating its
    non-invertible parts (conditioners) with :func:`~invnet.core.vjp.local_vjp`.

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
    #: Under autocast, run this block's conditioners in the autocast dtype (``False``: in full
    #: precision, see :func:`~invnet.core.precision.pin_full_precision`).
    autocast_conditioners: bool = True

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
        accumulated into ``.grad``. Runs under the autocast state it is called in: call it in the
        ``torch.autocast`` block the forward ran in. Returns :class:`Backward` ``(x, dx, dc)``."""
        if dlogdet is None:
            dlogdet = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
        self.check_shape(tuple(y.shape), None if c is None else tuple(c.shape), inverse=True)
        if tuple(dy.shape) != tuple(y.shape):
            raise ValueError(f"dy must have the shape of y {tuple(y.shape)}, got {tuple(dy.shape)}")
        if tuple(dlogdet.shape) != (y.shape[0],):
            raise ValueError(f"dlogdet must have shape ({y.shape[0]},), got {tuple(dlogdet.shape)}")
        params = [p for p in self.parameters() if p.requires_grad]
        grads = GradStore(into_grad=[p for p in params if p.grad is not None])  # added in place
        with torch.no_grad(), full_precision(_state_for(y).without_cache()):
            x, dx, dc = self._vjp(y, dy, dlogdet, c, grads)
        for p in params:
            g = grads.get(p)
            if g is not None:
                p.grad = g.detach().clone()
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

    def run_conditioner(self, net: Callable[[Tensor], Tensor], inp: Tensor) -> Tensor:
        """Run a non-invertible sub-network (a coupling's conditioner, a residual) on ``inp``:
        under the autocast state the block was called in (its forward, or the rebuild in the
        memory-free backward), with the result cast back to ``inp.dtype``, so that the
        invertible arithmetic around it stays in full precision (:mod:`invnet.core.precision`).
        Call every conditioner of a block through it, in ``_forward``, ``_inverse`` and ``_vjp``.
        """
        return conditioner_call(net, inp, self.autocast_conditioners)

    # ----------------------------------------------------------------------------------------
    # to implement
    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _check_shape(self, shape: Shape, c_shape: Optional[Shape], inverse: bool) -> Shape:
        if self.channels is not None and shape[1] != self.channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.channels} channels, got {shape[1]} "
                f"(shape {shape})"
            )
        return shape

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        # Generic fallback: rebuild the input, then differentiate a re-run of the forward.
        x, _ = self._inverse(y, c)
        return _vjp_by_rerun(self, self._forward, x, dy, dlogdet, c, grads)

    def _vjp_inverse(
        self, x: Tensor, dx: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore
    ) -> VJPResult:
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
            # one host read-back for both (a GPU stalls on each), none under value_checks(False);
            # none inside torch.func transforms, whose batched tensors cannot be read
            if not transforms_active():
                check_finite({"y" if inverse else "x": inp, "the condition c": c})
        # the block's own arithmetic runs with autocast off; its conditioners under the state
        # recorded here (the caller's, or the enclosing call's when nested)
        with _nested(), full_precision(_state_for(inp)):
            if forward_mode_active(itertools.chain((inp, c), self.parameters())):
                # forward mode keeps no activations: the plain forward, each op's own tangent
                # rule (invnet.core.forward_mode)
                with plain_forward_mode(type(self).__name__):
                    return self._inverse(inp, c) if inverse else self._forward(inp, c)
            if torch.is_grad_enabled() and memory_saving_enabled():
                # under a memory budget (top-level calls only), the chains inside keep or
                # recompute each unit as the cached plan says (invnet.core.budget)
                tape = Tape.for_call(self, inverse, inp, c) if top_level else None
                if tape is not None and tape.listing:
                    # an unlimited budget keeps every activation: that is plain autograd, run as
                    # such (no bridge, no per-unit graphs), so it costs what plain autograd does
                    with tape.record(), memory_saving(False):
                        return self._inverse(inp, c) if inverse else self._forward(inp, c)
                params = self._grad_params()
                return _MemorySavingCall.apply(self, inverse, tape, inp, c, *params)
            return self._inverse(inp, c) if inverse else self._forward(inp, c)


def _state_for(t: Tensor) -> AutocastState:
    """The autocast state a call on ``t`` runs under: the one recorded by an enclosing block
    call, else the caller's for ``t``'s device type."""
    return recorded_autocast() or AutocastState.capture(t.device.type)


def _vjp_by_rerun(
    module: nn.Module,
    fn: Callable[[Tensor, Optional[Tensor]], tuple[Tensor, Tensor]],
    inp: Tensor,
    dout: Tensor,
    dlogdet: Tensor,
    c: Optional[Tensor],
    grads: GradStore,
) -> VJPResult:
    """VJP of ``fn(inp, c) -> (out, logdet)`` (a method of ``module``) by re-running it under
    autograd, as one :func:`~invnet.core.vjp.local_vjp` over the whole block."""
    with local_vjp(module, inp, c, grads=grads) as vjp:
        out, logdet = fn(*vjp.inputs)
        dinp, dc = vjp.grad((out, logdet), (dout, dlogdet))
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

    Unlike ``save_for_backward`` it can be let go *during* the backward: it sits in a
    :class:`~invnet.core.handover.HandOver`, the block's ``_vjp`` receives the only reference and
    drops it once it has rebuilt the input, so the output does not stay alive while the rest of
    the network's backward runs. The alias shares the output's version counter, so an in-place
    change of the output after the forward is still caught."""

    __slots__ = ("_box", "_version", "_owner")

    def __init__(self, out: Tensor, owner: str) -> None:
        self._box = HandOver(out.detach())
        self._version = out._version
        self._owner = owner

    def take(self) -> Tensor:
        """The saved output; handed over (not kept) unless the backward keeps the graph."""
        if not len(self._box):
            raise RuntimeError(
                f"Trying to backward through the memory-saving node of {self._owner} a second time; "
                "its saved output was released after the first backward. Pass retain_graph=True to "
                "the first backward call to backward twice."
            )
        out = self._box.peek()
        if out._version != self._version:
            raise RuntimeError(
                f"the output of {self._owner}, needed by its memory-saving backward, was modified by "
                f"an in-place operation (version {out._version}, expected {self._version}); clone it "
                "before changing it in place"
            )
        del out
        return self._box.peek() if _graph_kept() else self._box.take()


class _MemorySavingCall(torch.autograd.Function):
    """The autograd bridge: runs ``module._forward`` (or ``module._inverse``) without a graph and
    saves only its output (and ``c``) with the autocast state of the call; the backward is
    ``module._vjp`` (or ``_vjp_inverse``) from that output, under that state. The block's
    trainable parameters are inputs, so their gradients go back through autograd (hooks,
    clipping, gradient scalers and reducers see them)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, module: InvertibleModule, inverse: bool, tape: Optional[Tape], inp: Tensor,
        c: Optional[Tensor], *params: Tensor
    ):
        with tape.record() if tape is not None else contextlib.nullcontext():
            out, logdet = module._inverse(inp, c) if inverse else module._forward(inp, c)
        ctx.tape = tape if tape is not None and tape.has_kept else None
        ctx.module = module
        ctx.inverse = inverse
        ctx.params = params
        ctx.output = _SavedOutput(out, type(module).__name__ + (".inverse" if inverse else ""))
        ctx.precision = _state_for(inp)
        ctx.save_for_backward(c)
        return out, logdet

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: FunctionCtx, dout: Tensor, dlogdet: Tensor):
        (c,) = ctx.saved_tensors
        direct = _accumulating_in_place(ctx.params, ctx.needs_input_grad[5:])
        grads = GradStore(into_grad=direct)
        vjp = ctx.module._vjp_inverse if ctx.inverse else ctx.module._vjp
        # rebuild and differentiate under the forward's autocast state, whatever the context of
        # loss.backward(); the output goes straight into the call so that no frame here keeps it
        replay = ctx.tape.replay(_graph_kept()) if ctx.tape is not None else contextlib.nullcontext()
        with full_precision(ctx.precision.without_cache()), replay:
            _, dinp, dc = vjp(ctx.output.take(), dout, dlogdet, c, grads)
        if c is None or not ctx.needs_input_grad[4]:
            dc = None
        return (None, None, None, dinp, dc, *[_already_in_grad(p) if grads.went_into_grad(p) else grads.get(p)
                                         for p in ctx.params])


def _engine_accumulates(p: Tensor) -> bool:
    """Whether the running backward will accumulate into ``p.grad`` (``loss.backward()``, or
    ``backward(inputs=...)`` naming ``p``; never ``torch.autograd.grad``)."""
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    if will_execute is None:
        return False
    try:
        return will_execute(torch.autograd.graph.get_gradient_edge(p).node) is True
    except RuntimeError:  # autograd.grad(): PyTorch refuses to say for a leaf, and never accumulates
        return False


def _accumulating_in_place(params: tuple[Tensor, ...], needed: tuple[bool, ...]) -> list[Tensor]:
    """The parameters whose gradients the bridge may add straight into ``.grad`` as blocks
    finish: those with a ``.grad`` already (accumulation over micro-batches) that this backward
    accumulates into, that carry no tensor hooks (a hook must see the gradient itself, so those
    take the ordinary path), outside a double backward. Without this, the whole set of new
    gradients is alive next to the ``.grad`` buffers until autograd adds them at the end."""
    if torch.is_grad_enabled():
        return []
    return [
        p for p, need in zip(params, needed)
        if need and p.grad is not None and not p.grad.is_sparse and p.grad.shape == p.shape
        and not p._backward_hooks and _engine_accumulates(p)
    ]


def _already_in_grad(p: Tensor) -> Tensor:
    """What the bridge hands autograd for a parameter whose gradient it already added into
    ``.grad``: a zero of ``p``'s shape that holds one element (stride 0). Autograd adds it (a
    no-op) and then fires the post-accumulate-grad hooks, once, with ``.grad`` complete."""
    return torch.zeros((), dtype=p.grad.dtype, device=p.grad.device).expand(p.shape)
