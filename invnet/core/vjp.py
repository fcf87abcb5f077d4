"""The tools a hand-written backward uses: a store for parameter gradients, and one helper for
the *local* vector-Jacobian products inside a block (a conditioner, a residual, a small matrix
function) that are differentiated by autograd rather than written out.

>>> import torch
>>> from torch import nn
>>> from invnet.core.vjp import GradStore, local_vjp
>>> net = nn.Linear(3, 2)
>>> grads = GradStore()
>>> u = torch.randn(4, 3)
>>> with local_vjp(net, u, grads=grads) as vjp:
...     (u_in,) = vjp.inputs
...     out = net(u_in)
...     (du,) = vjp.grad(out, torch.ones_like(out))
>>> du.shape, grads.get(net.weight).shape
(torch.Size([4, 3]), torch.Size([2, 3]))
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Iterator, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["GradStore", "add_optional", "parameter_aliases", "LocalVJP", "local_vjp"]


class GradStore:
    """Accumulates parameter gradients during a hand-written backward, keyed by identity so that
    shared parameters add up.

    Parameters listed in ``into_grad`` (whose ``.grad`` already exists: gradient accumulation
    over micro-batches) get each contribution added straight into ``.grad``, in place, as soon as
    a block produces it: no second gradient-sized copy is held until the end of the backward.
    :meth:`get` returns ``None`` for them and :meth:`went_into_grad` says that something arrived.

    >>> import torch
    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> store = GradStore()
    >>> store.add(p, torch.ones(2)); store.add(p, torch.ones(2))
    >>> store.get(p).tolist()
    [2.0, 2.0]
    >>> p.grad = torch.ones(2)
    >>> store = GradStore(into_grad=[p])
    >>> store.add(p, torch.ones(2))
    >>> p.grad.tolist(), store.get(p), store.went_into_grad(p)
    ([2.0, 2.0], None, True)
    """

    def __init__(self, into_grad: Sequence[Tensor] = ()) -> None:
        self._grads: dict[int, Tensor] = {}
        self._into: dict[int, Tensor] = {id(p): p for p in into_grad}
        self._arrived: set[int] = set()

    def add(self, param: Tensor, grad: Optional[Tensor]) -> None:
        """Add ``grad`` to the gradient of ``param`` (``None`` means zero)."""
        if grad is None:
            return
        key = id(param)
        target = self._into.get(key)
        if target is not None:
            target.grad.add_(grad)
            self._arrived.add(key)
            return
        if key in self._grads:
            self._grads[key] = self._grads[key] + grad
        else:
            self._grads[key] = grad

    def add_many(self, params: Sequence[Tensor], grads: Sequence[Optional[Tensor]]) -> None:
        """:meth:`add` for pairs of parameters and gradients."""
        for p, g in zip(params, grads):
            self.add(p, g)

    def get(self, param: Tensor) -> Optional[Tensor]:
        """The accumulated gradient of ``param``, or ``None`` if nothing was added (or it went
        straight into ``.grad``)."""
        return self._grads.get(id(param))

    def went_into_grad(self, param: Tensor) -> bool:
        """Whether gradients of ``param`` were added straight into its ``.grad``."""
        return id(param) in self._arrived


def add_optional(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """``a + b`` where either may be ``None`` (meaning zero).

    >>> import torch
    >>> add_optional(None, torch.ones(1)).tolist(), add_optional(None, None)
    ([1.0], None)
    """
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
    :func:`local_vjp` uses it; blocks rarely need it directly.

    >>> import torch
    >>> lin = torch.nn.Linear(2, 2)
    >>> with parameter_aliases(lin) as (params, aliases):
    ...     swapped = lin.weight is aliases[0]
    >>> swapped, lin.weight is params[0]
    (True, True)
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


def _differentiable(t: Optional[Tensor]) -> bool:
    return t is not None and t.is_floating_point()


class LocalVJP:
    r"""One local vector-Jacobian product inside a hand-written backward; made by
    :func:`local_vjp`, which explains the use.

    ``inputs`` are the leaves to compute with (detached aliases of the tensors handed to
    :func:`local_vjp`, ``None`` and non-floating inputs passed through as they are).
    :meth:`grad` runs the one local autograd pass.
    """

    __slots__ = ("inputs", "_originals", "_aliases", "_grads", "_done")

    def __init__(
        self,
        inputs: tuple[Optional[Tensor], ...],
        originals: list[nn.Parameter],
        aliases: list[Tensor],
        grads: GradStore,
    ) -> None:
        self.inputs = inputs
        self._originals = originals
        self._aliases = aliases
        self._grads = grads
        self._done = False

    def add_input(self, t: Tensor) -> Tensor:
        """Make ``t``, computed inside the ``with`` block without grad (e.g. a block's input
        rebuilt from its output with parameters the pass also differentiates), one more input:
        returns its leaf, whose cotangent :meth:`grad` returns after those of the inputs given
        to :func:`local_vjp`."""
        leaf = t.detach().requires_grad_(t.is_floating_point())
        self.inputs = self.inputs + (leaf,)
        return leaf

    def grad(
        self,
        outputs: Union[Tensor, Sequence[Tensor]],
        cotangents: Union[Tensor, Sequence[Tensor]],
    ) -> tuple[Optional[Tensor], ...]:
        r"""Return :math:`(J^T v)` for every input, given the outputs computed from
        :attr:`inputs` and their cotangents :math:`v`, and add the parameter gradients to the
        :class:`GradStore`. Entry ``i`` is ``None`` when input ``i`` was ``None`` or not floating
        point, and zeros when the outputs do not depend on it. Cotangents are cast to the dtype of
        their output (a conditioner run in low precision gets low-precision cotangents, as plain
        autograd would give it). Call it once; the local graph is freed."""
        if self._done:
            raise RuntimeError("LocalVJP.grad was already called; open a new local_vjp for a second pass")
        self._done = True
        if isinstance(outputs, Tensor):
            outputs, cotangents = (outputs,), (cotangents,)
        if len(outputs) != len(cotangents):
            raise ValueError(f"got {len(outputs)} outputs but {len(cotangents)} cotangents")
        pairs = [(o, v.to(o.dtype)) for o, v in zip(outputs, cotangents) if o.requires_grad]
        wrt = [t for t in self.inputs if _differentiable(t)] + self._aliases
        if pairs and wrt:
            g = torch.autograd.grad(
                [o for o, _ in pairs], wrt, [v for _, v in pairs], allow_unused=True
            )
        else:
            g = (None,) * len(wrt)
        k = len(wrt) - len(self._aliases)
        self._grads.add_many(self._originals, g[k:])
        result: list[Optional[Tensor]] = []
        it = iter(g[:k])
        for t in self.inputs:
            if not _differentiable(t):
                result.append(None)
                continue
            gi = next(it)
            result.append(torch.zeros_like(t) if gi is None else gi)
        return tuple(result)


@contextlib.contextmanager
def local_vjp(
    module: Optional[nn.Module], *inputs: Optional[Tensor], grads: GradStore
) -> Iterator[LocalVJP]:
    r"""Differentiate a non-invertible piece of a block locally, inside its hand-written backward.

    A coupling's backward runs its conditioner once on the rebuilt passive part: the result
    serves to rebuild the active part *and*, through one local autograd pass, gives the
    cotangent of the passive part (and of the condition) and the conditioner's parameter
    gradients. This helper is that pattern, once: inside the ``with`` block grad is enabled, the
    trainable parameters of ``module`` are swapped for detached aliases (see
    :func:`parameter_aliases`: the user's hooks then fire exactly once, when autograd hands the
    gradients over), and ``vjp.inputs`` holds detached leaves of ``inputs`` to compute with.
    ``vjp.grad(outputs, cotangents)`` runs ``torch.autograd.grad`` once, adds the parameter
    gradients to ``grads`` and returns the input cotangents in the order of ``inputs``:

    .. math:: (\bar u_1, \dots, \bar u_n) = J_{f}(u)^T \bar o, \qquad
        \bar\theta \mathrel{+}= J_{f,\theta}^T \bar o.

    Args:
        module: whose trainable parameters get gradients (``None``: no parameters).
        *inputs: the tensors the piece reads (``None`` allowed: e.g. an absent condition).
        grads: where the parameter gradients go.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(2, 2).double()
    >>> grads = GradStore()
    >>> u, v = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    >>> with local_vjp(net, u, None, grads=grads) as vjp:
    ...     u_in, nothing = vjp.inputs
    ...     du, dnothing = vjp.grad(net(u_in), v)
    >>> bool(torch.allclose(du, v @ net.weight.detach())), dnothing is None
    (True, True)
    """
    leaves = tuple(
        t.detach().requires_grad_(True) if _differentiable(t) else t for t in inputs
    )
    with torch.enable_grad(), (
        parameter_aliases(module) if module is not None else contextlib.nullcontext(([], []))
    ) as (originals, aliases):
        yield LocalVJP(leaves, originals, aliases, grads)
