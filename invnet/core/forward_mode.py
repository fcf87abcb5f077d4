r"""Forward-mode products through invertible blocks: ``torch.func.jvp``, ``jacfwd``, ``vmap`` and
dual tensors (``torch.autograd.forward_ad``), with memory saving on.

The memory-free bridge is a reverse-mode device: it saves a block's output instead of its
activations and rebuilds them in the backward. Forward mode keeps no activations at all (each
tangent travels with its primal and is dropped with it), so it has nothing to save memory on. When
a block is called with a tangent in play (a dual input, condition or parameter, or inside a
``torch.func`` transform), the block therefore runs its plain forward and every PyTorch operation
in it contributes its own forward-mode rule: the Jacobian-vector product of the output *and of the
log-determinant*,

.. math:: \dot y = J_f(x)\,\dot x + \partial_\theta f\,\dot\theta, \qquad
    \dot{\ell} = \nabla_x \log|\det J_f(x)| \cdot \dot x + \partial_\theta \log|\det J_f|\,\dot\theta,

exactly as with ``memory_saving(False)``. (This is the documented equivalent of a ``jvp`` rule on
the bridge's autograd Function: the rule would re-run the same forward under forward-mode autograd,
and save the input for it.) If reverse mode is recording at the same time (grad enabled, e.g.
``torch.func.jvp`` called outside ``torch.no_grad()``), that call keeps its activations like plain
autograd; wrap pure forward-mode work in ``torch.no_grad()`` to keep nothing. Value checks
(:func:`~invnet.value_checks`) cannot read batched tensors and are skipped inside ``torch.func``
transforms.

A block whose arithmetic has no forward-mode rule (e.g. a custom ``autograd.Function`` without a
``jvp``) raises :class:`ForwardModeError` naming the block.

>>> import torch, invnet
>>> from torch.func import jvp
>>> flow = invnet.networks.Glow(2, hidden=8, levels=2, depth=1, ndim=1).double()
>>> x, v = torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(3, 2, 8, dtype=torch.float64)
>>> _ = flow(x)  # ActNorm's data-dependent initialisation, outside the transform
>>> (z, logdet), (dz, dlogdet) = jvp(flow, (x,), (v,))
>>> dz.shape, dlogdet.shape
(torch.Size([3, 2, 8]), torch.Size([3]))
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

__all__ = ["ForwardModeError", "transforms_active", "forward_mode_active", "naming_block", "plain_forward_mode"]

_state = threading.local()


class ForwardModeError(RuntimeError):
    """A block cannot be differentiated in forward mode (or vmapped); the message names it."""


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform (``jvp``, ``jacfwd``, ``vmap``, ``grad``, ...) is
    running around this call."""
    probe = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(probe()) if probe is not None else False


def _dual_level_open() -> bool:
    return getattr(fwAD, "_current_level", 0) >= 0


def forward_mode_active(tensors: Iterable[Optional[Tensor]]) -> bool:
    """Whether a block called on ``tensors`` (input, condition, parameters) must run its plain
    forward: inside a ``torch.func`` transform, or with a dual tensor among them.

    >>> import torch, torch.autograd.forward_ad as fwAD
    >>> x = torch.randn(2)
    >>> with fwAD.dual_level():
    ...     forward_mode_active([fwAD.make_dual(x, torch.ones(2))]), forward_mode_active([x])
    (True, False)
    """
    if transforms_active():
        return True
    if not _dual_level_open():
        return False
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


@contextlib.contextmanager
def naming_block(name: str) -> Iterator[None]:
    """Re-raise a failure of forward-mode or vmap machinery inside the ``with`` block as a
    :class:`ForwardModeError` that names the block (the innermost one: an error already named
    passes through)."""
    try:
        yield
    except ForwardModeError:
        raise
    except (RuntimeError, NotImplementedError) as err:
        raise ForwardModeError(
            f"{name} cannot be differentiated in forward mode or vmapped (torch.func.jvp / jacfwd / vmap, "
            f"or torch.autograd.forward_ad): {err}"
        ) from err


def in_plain_forward_mode() -> bool:
    """Whether a block call up the stack runs its plain forward for forward mode (then the
    chains inside name the unit that fails)."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def plain_forward_mode(name: str) -> Iterator[None]:
    """The block ``name`` runs its plain forward for forward mode: failures inside are named."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        with naming_block(name):
            yield
    finally:
        _state.depth -= 1
