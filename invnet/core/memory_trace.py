"""Peak of live tensor memory while a function runs, counted exactly (not sampled from the OS).

Peak RSS says how much memory a step took, but mixes in the allocator, thread pools and whatever
else the process does, so it is good for benchmarks and poor for tests. This module watches every
tensor that PyTorch operators create while ``fn`` runs (a ``TorchDispatchMode``, so it also sees
the tensors autograd makes during ``backward``) and counts each storage's bytes from the moment it
appears until the last tensor using it is gone. The result is deterministic: a test can assert
that a backward pass holds no more than a given number of image-sized tensors.

>>> import torch, invnet
>>> flow = invnet.networks.Glow(2, hidden=8, levels=2, depth=2, ndim=1)
>>> x = torch.randn(4, 2, 16)
>>> _ = flow(x)  # initialise ActNorm outside the measurement
>>> def step():
...     z, logdet = flow(x)
...     (0.5 * z.pow(2).sum() - logdet.sum()).backward()
>>> trace = trace_live_bytes(step)
>>> trace.peak_bytes > 0, trace.peak_bytes >= trace.end_bytes
(True, True)
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveBytesTrace", "trace_live_bytes"]


@dataclass(frozen=True)
class LiveBytesTrace:
    """What :func:`trace_live_bytes` measured: the largest total size of storages alive at once
    (``peak_bytes``), what was still alive when ``fn`` returned (``end_bytes``, e.g. ``.grad``
    buffers), and how many storages were created."""

    peak_bytes: int
    end_bytes: int
    storages: int


class _LiveBytesMode(TorchDispatchMode):
    def __init__(self, preexisting: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self._tracked: dict[int, list[int]] = {}  # storage id -> [bytes, live tensors using it]
        # storages alive before the call: an in-place op returns them, but they are not new
        self._old = {t.untyped_storage()._cdata for t in preexisting if t is not None}
        self.current = 0
        self.peak = 0
        self.created = 0

    def __torch_dispatch__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: Optional[dict[str, Any]] = None,
    ) -> Any:  # an operator's arguments and results are whatever that operator takes and gives
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                self._track(t)
        return out

    def _track(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata  # identity of the storage, stable while it lives
        if key in self._old:
            return
        entry = self._tracked.get(key)
        if entry is None:
            entry = self._tracked[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.created += 1
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        # PyTorch keeps a tensor's Python object alive as long as the tensor itself lives, so
        # the finaliser runs when the tensor is really freed
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._tracked.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._tracked[key]


def trace_live_bytes(fn: Callable[[], object], preexisting: Iterable[Tensor] = ()) -> LiveBytesTrace:
    """Run ``fn()`` and return the peak of tensor memory created during it and still alive.

    Tensors that existed before the call (inputs, parameters) are not counted; tensors created
    inside it are, from creation to release, whoever holds them (your frames, autograd's saved
    tensors, the engine's gradient buffers). Storages shared by views count once. An in-place
    operation returns the storage it wrote to, which would be counted from then on: list the
    tensors that existed before and may be written in place (e.g. the ``.grad`` buffers that
    gradient accumulation adds to) in ``preexisting``.
    """
    mode = _LiveBytesMode(preexisting)
    with mode:
        fn()
    return LiveBytesTrace(peak_bytes=mode.peak, end_bytes=mode.current, storages=mode.created)
