"""Checks that read tensor values back to the host, and the switch that turns them off.

Shape and dtype checks cost nothing: they look at metadata. A check of *values* (no NaN or Inf in
the input, a sigmoid's inverse given values inside (0, 1)) must bring a result back to Python,
and on a GPU every such read-back waits for all queued kernels: the device idles until the host
has decided. invnet therefore keeps value checks off the per-block path:

* a top-level call (``block(x, c)``, ``block.inverse(y, c)``) checks that its input and condition
  are finite with **one** read-back for both (:func:`check_finite`); the blocks inside it check
  nothing;
* ``Sigmoid.inverse`` and ``Logit`` check their (0, 1) domain (one read-back each);
* ``ActNorm`` keeps a host copy of its "initialised" flag, so it reads its buffer back only
  until it has initialised;
* no block makes a tensor from Python data during a call (``torch.tensor([...], device=...)`` is
  a blocking host-to-device copy: the Haar matrix is built by kernels on the device).

``tests/test_kernels.py`` counts the synchronisations of a training step (every
``aten::_local_scalar_dense``, the op behind ``.item()``, ``bool(t)`` and ``float(t)``, and every
``aten::lift_fresh``, a tensor made from Python data): one, the finiteness check.
``with invnet.value_checks(False):`` turns the value checks off (thread-local, like
``torch.no_grad``): a training loop on a GPU whose data are known to be finite then runs without
a single read-back per step; bad values then propagate as NaN instead of raising.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch
from torch import Tensor

__all__ = ["value_checks", "value_checks_enabled", "check_finite"]

_state = threading.local()


def value_checks_enabled() -> bool:
    """Whether checks that read tensor values back to the host run (the default)."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def value_checks(enabled: bool = True) -> Iterator[None]:
    """Turn the value checks (finite inputs, domains) on or off inside a ``with`` block
    (thread-local).

    >>> import torch, invnet
    >>> block = invnet.layers.ActNorm(2)
    >>> with invnet.value_checks(False):
    ...     y, _ = block(torch.tensor([[float("nan"), 1.0]]))
    >>> bool(torch.isnan(y).any())
    True
    """
    previous = value_checks_enabled()
    _state.enabled = bool(enabled)
    try:
        yield
    finally:
        _state.enabled = previous


def check_finite(named: dict[str, Optional[Tensor]]) -> None:
    """Raise ``ValueError`` naming the first floating-point tensor of ``named`` that holds NaN or
    Inf. All tensors on one device are checked with a single host read-back (none when the checks
    are off).

    >>> import torch
    >>> check_finite({"x": torch.ones(2), "the condition c": None})
    >>> check_finite({"x": torch.tensor([1.0, float("inf")])})
    Traceback (most recent call last):
    ...
    ValueError: x must hold only finite values, but it contains NaN or Inf
    """
    if not value_checks_enabled():
        return
    items = [(name, t) for name, t in named.items() if t is not None and t.is_floating_point()]
    if not items:
        return
    by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
    for name, t in items:
        by_device.setdefault(t.device, []).append((name, t))
    for group in by_device.values():
        flags = torch.stack([torch.isfinite(t).all() for _, t in group])
        if bool(flags.all()):  # the one read-back of this device
            continue
        bad = [name for (name, _), ok in zip(group, flags.tolist()) if not ok]  # error path only
        raise ValueError(f"{bad[0]} must hold only finite values, but it contains NaN or Inf")
