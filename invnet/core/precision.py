r"""Mixed precision: conditioners in low precision, the invertible arithmetic in full precision.

Under ``torch.autocast`` a flow has two kinds of arithmetic. The *conditioners* (the small CNNs
and MLPs inside couplings) are ordinary networks: they may run in bfloat16 or float16 like any
other. The *invertible arithmetic* (affine maps and their inverses, log-determinant sums, ActNorm,
1x1 convolutions and their inverses, squeezes) must not: the memory-free backward rebuilds every
input from the output through it, and an inverse computed in 8 bits of mantissa drifts. So invnet
draws one line, in the engine rather than in every block:

* a top-level call of a block records the autocast state it was called in
  (:class:`AutocastState`: device type, enabled, dtype, cache) and runs the block's own code with
  autocast *disabled* (:func:`full_precision`); tensors keep the dtype they come in with;
* a block runs each conditioner through :meth:`InvertibleModule.run_conditioner
  <invnet.core.module.InvertibleModule.run_conditioner>`, which re-enters the recorded autocast
  state for that call only and casts the result back to the dtype of its input;
* the memory-free backward stores the recorded state with the saved output and rebuilds and
  differentiates under it, whatever the context of ``loss.backward()`` (inside or outside the
  ``autocast`` block, or on autograd's device thread for CUDA).

So the rebuild recomputes every conditioner output exactly as the forward did (same input, same
precision), and the only rounding the rebuild adds is that of the full-precision arithmetic.
A block whose conditioner must run in full precision anyway (one named by the drift check,
:mod:`invnet.core.drift`) is pinned with :func:`pin_full_precision`.

>>> import torch
>>> from invnet.layers import AffineCoupling
>>> block = AffineCoupling(4, hidden=8, ndim=1)
>>> x = torch.randn(2, 4, 6)
>>> with torch.autocast("cpu", dtype=torch.bfloat16):
...     y, logdet = block(x)
>>> y.dtype, logdet.dtype            # the invertible arithmetic stayed in float32
(torch.float32, torch.float32)
"""
from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

__all__ = ["AutocastState", "full_precision", "recorded_autocast", "conditioner_call", "pin_full_precision"]

_local = threading.local()


@dataclass(frozen=True)
class AutocastState:
    """The autocast state of one device type, as ``torch.autocast`` takes it.

    >>> import torch
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     state = AutocastState.capture("cpu")
    >>> state.enabled, state.dtype
    (True, torch.bfloat16)
    >>> AutocastState.capture("cpu").enabled
    False
    """

    device_type: str
    enabled: bool
    dtype: torch.dtype
    cache_enabled: bool

    @classmethod
    def capture(cls, device_type: str) -> AutocastState:
        """The state autocast is in now for ``device_type`` (``"cpu"``, ``"cuda"``, ...); off for
        device types autocast does not know (``"meta"``)."""
        if not _autocast_knows(device_type):
            return cls(device_type, False, torch.float32, False)
        return cls(
            device_type=device_type,
            enabled=torch.is_autocast_enabled(device_type),
            dtype=torch.get_autocast_dtype(device_type),
            cache_enabled=torch.is_autocast_cache_enabled(),
        )

    def autocast(self) -> torch.autocast:
        """A ``torch.autocast`` context that re-enters this state."""
        return torch.autocast(
            self.device_type, dtype=self.dtype, enabled=self.enabled, cache_enabled=self.cache_enabled
        )

    def without_cache(self) -> AutocastState:
        """The same state with the cast cache off. The backward uses it: its local passes run on
        fresh parameter aliases, so a cached cast would never be reused, only kept alive until
        the outermost autocast region ends (a low-precision copy of every conditioner's weights
        held through the whole backward). Values are the same with or without the cache."""
        return replace(self, cache_enabled=False)


@functools.cache
def _autocast_knows(device_type: str) -> bool:
    try:
        torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False
    return True


def recorded_autocast() -> Optional[AutocastState]:
    """The autocast state recorded by the innermost :func:`full_precision` region of this
    thread, or ``None`` outside any."""
    return getattr(_local, "state", None)


@contextlib.contextmanager
def full_precision(state: AutocastState) -> Iterator[AutocastState]:
    """Run the enclosed code with autocast disabled for ``state.device_type``, recording
    ``state`` for :func:`conditioner_call` (thread-local, nestable). The engine opens this region
    around every top-level block call and around the memory-free backward; blocks do not."""
    previous = recorded_autocast()
    _local.state = state
    off = torch.autocast(state.device_type, enabled=False) if _autocast_knows(state.device_type) else None
    try:
        with off if off is not None else contextlib.nullcontext():
            yield state
    finally:
        _local.state = previous


def conditioner_call(net: Callable[[Tensor], Tensor], inp: Tensor, autocast: bool = True) -> Tensor:
    """``net(inp)`` under the recorded autocast state, cast back to ``inp.dtype``.

    Inside a block call this is where low precision happens: the conditioner's convolutions and
    matrix products run in the autocast dtype of the forward (or of the rebuild, which is the
    same), and the result comes back in the dtype the invertible arithmetic works in. With
    ``autocast=False`` (a pinned block), or outside any block call, ``net`` runs as is.

    >>> import torch
    >>> net = torch.nn.Linear(3, 3)
    >>> with full_precision(AutocastState("cpu", True, torch.bfloat16, True)):
    ...     out = conditioner_call(net, torch.randn(2, 3))
    >>> out.dtype
    torch.float32
    """
    state = recorded_autocast()
    if not autocast or state is None or not state.enabled:
        return net(inp)
    with state.autocast():
        out = net(inp)
    return out.to(inp.dtype)


def pin_full_precision(module: nn.Module, pinned: bool = True) -> nn.Module:
    """Make every invertible block in ``module`` (itself included) run its conditioners in full
    precision under autocast (``pinned=False`` undoes it). The remedy for a block whose rebuild
    drifts in low precision; the rest of the network keeps its autocast speed. Returns
    ``module``.

    >>> import torch
    >>> from invnet.layers import AffineCoupling
    >>> block = pin_full_precision(AffineCoupling(2, hidden=4, ndim=0))
    >>> block.autocast_conditioners
    False
    """
    from .module import InvertibleModule  # the contract sits above this module

    for sub in module.modules():
        if isinstance(sub, InvertibleModule):
            sub.autocast_conditioners = not pinned
    return module
