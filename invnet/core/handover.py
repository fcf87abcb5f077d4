"""Handing tensors on to a call without keeping them alive in the calling frame.

Why it matters: a memory-free backward frees each rebuilt activation as soon as the next block
has used it, but only if no frame up the call stack still refers to it. A local variable of the
caller (``y`` in ``return self.body._vjp(y, ...)``) keeps its tensor alive until the caller
returns, that is, through the whole rest of the backward. CPython, however, *moves* call
arguments into the callee's frame: a value produced inside the call expression (here
``box.take()``) is referenced by the callee only, which can drop it once it has rebuilt its
input. So the caller puts its tensors in a :class:`HandOver`, deletes its own names, and takes
them out inside the call.

>>> import torch, weakref
>>> def consume(t):
...     ref = weakref.ref(t)
...     del t                  # the callee lets go ...
...     return ref() is None   # ... and nobody else held the tensor
>>> y = torch.zeros(3)
>>> box = HandOver(y)
>>> del y
>>> consume(box.take())
True
"""
from __future__ import annotations

from torch import Tensor

__all__ = ["HandOver"]


class HandOver:
    """A box holding the only references to some tensors until they are taken, in order.

    Usage, in a block's backward that passes its (squeezed) tensors on::

        box = HandOver(h, dh)
        del h, dh                                   # the box holds the only references
        x, dx, dc = self.steps._vjp(box.take(), box.take(), dlogdet, c, grads)

    ``take`` raises once the box is empty (a second take of one tensor is a bug).
    """

    __slots__ = ("_items",)

    def __init__(self, *tensors: Tensor) -> None:
        self._items = list(tensors)

    def __len__(self) -> int:
        return len(self._items)

    def peek(self) -> Tensor:
        """The next tensor, left in the box."""
        if not self._items:
            raise RuntimeError("HandOver is empty: every tensor was taken already")
        return self._items[0]

    def take(self) -> Tensor:
        """Remove and return the next tensor; the box keeps no reference to it."""
        if not self._items:
            raise RuntimeError("HandOver is empty: every tensor was taken already")
        return self._items.pop(0)
