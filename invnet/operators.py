"""Linear forward operators for physics-in-the-loop networks, and the data-misfit gradient.

A learned iterative reconstruction (:class:`invnet.networks.LearnedLoop`) needs, at every
iteration, the gradient of the data misfit :math:`\\tfrac12\\|A x - y\\|^2`,

.. math:: g(x, y) = A^T (A x - y),

of a user's linear operator :math:`A`. :class:`ForwardOperator` wraps three kinds of operator
behind one batched face: a torch matrix, a pylops ``LinearOperator`` (numpy, called through its
``matvec``/``rmatvec``) and a pair of torch callables ``(forward, adjoint)``. Wrapping checks the
adjoint with a dot-product test and refuses an operator that fails it.

The misfit gradient is linear in ``(x, y)``, so its vector-Jacobian product is known in closed
form: for a cotangent :math:`\\bar g`,

.. math:: \\bar x = A^T A \\bar g, \\qquad \\bar y = -A \\bar g,

which :func:`misfit_gradient` implements as an autograd ``Function``. Gradients with respect to
the state therefore flow even through operators autograd cannot see (pylops, numpy); the
operator's own parameters, if any, are treated as constants.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

__all__ = ["ForwardOperator", "as_operator", "adjoint_test", "misfit_gradient"]

TorchMap = Callable[[Tensor], Tensor]


def _prod(shape: Sequence[int]) -> int:
    return int(math.prod(shape)) if len(shape) else 1


class ForwardOperator:
    r"""A linear operator :math:`A` acting on batches, with its adjoint :math:`A^T`.

    ``forward`` maps ``(N, *domain_shape) -> (N, *range_shape)``, ``adjoint`` the reverse. Build
    one with :func:`as_operator` (which also runs the adjoint test).

    Args:
        forward: batched map ``(N, *domain_shape) -> (N, *range_shape)``.
        adjoint: batched map ``(N, *range_shape) -> (N, *domain_shape)``.
        domain_shape: shape of one sample of the unknown, e.g. ``(1, H, W)`` for an image.
        range_shape: shape of one observation, e.g. ``(angles, detectors)``.
        kind: a short description shown in ``repr`` (``"matrix"``, ``"pylops"``, ``"callables"``).

    >>> import torch
    >>> A = torch.eye(3, dtype=torch.float64)
    >>> op = ForwardOperator(lambda x: x @ A.T, lambda y: y @ A, (3,), (3,))
    >>> op.forward(torch.ones(2, 3, dtype=torch.float64)).shape
    torch.Size([2, 3])
    """

    def __init__(
        self,
        forward: TorchMap,
        adjoint: TorchMap,
        domain_shape: Sequence[int],
        range_shape: Sequence[int],
        kind: str = "callables",
    ) -> None:
        self._forward = forward
        self._adjoint = adjoint
        self.domain_shape = tuple(int(s) for s in domain_shape)
        self.range_shape = tuple(int(s) for s in range_shape)
        if any(s < 1 for s in self.domain_shape + self.range_shape) or not self.domain_shape:
            raise ValueError(
                f"domain_shape and range_shape must be non-empty positive sizes, got "
                f"{self.domain_shape} and {self.range_shape}"
            )
        self.kind = kind

    def __repr__(self) -> str:
        return f"ForwardOperator({self.kind}, domain={self.domain_shape}, range={self.range_shape})"

    def _checked(self, t: Tensor, shape: tuple[int, ...], what: str) -> Tensor:
        if not isinstance(t, Tensor) or tuple(t.shape[1:]) != shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{what} must have shape (batch, *{shape}), got {got}")
        return t

    def forward(self, x: Tensor) -> Tensor:
        """:math:`A x` for a batch ``x`` of shape ``(N, *domain_shape)``."""
        out = self._forward(self._checked(x, self.domain_shape, "A's input"))
        return self._checked(out, self.range_shape, "A's output")

    def adjoint(self, y: Tensor) -> Tensor:
        """:math:`A^T y` for a batch ``y`` of shape ``(N, *range_shape)``."""
        out = self._adjoint(self._checked(y, self.range_shape, "A^T's input"))
        return self._checked(out, self.domain_shape, "A^T's output")

    def normal(self, x: Tensor) -> Tensor:
        """:math:`A^T A x`."""
        return self.adjoint(self.forward(x))


def adjoint_test(
    op: ForwardOperator, dtype: torch.dtype = torch.float64, batch: int = 2, seed: int = 0
) -> float:
    r"""Dot-product test of an operator's adjoint: the relative mismatch

    .. math:: \frac{|\langle A x, y\rangle - \langle x, A^T y\rangle|}
                   {\|A x\|\,\|y\| + \|x\|\,\|A^T y\|}

    for seeded random ``x`` and ``y`` (about 1e-16 for an exact adjoint in float64).

    >>> import torch
    >>> op = as_operator(torch.randn(5, 4, dtype=torch.float64))
    >>> adjoint_test(op) < 1e-12
    True
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + op.domain_shape, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn((batch,) + op.range_shape, generator=gen, dtype=torch.float64).to(dtype)
    ax, aty = op.forward(x), op.adjoint(y)
    lhs = float((ax * y).sum())
    rhs = float((x * aty).sum())
    scale = float(ax.norm() * y.norm() + x.norm() * aty.norm())
    return abs(lhs - rhs) / max(scale, torch.finfo(torch.float64).tiny)


def _matrix_operator(
    matrix: Tensor, domain_shape: Optional[Sequence[int]], range_shape: Optional[Sequence[int]]
) -> ForwardOperator:
    if matrix.dim() != 2 or not matrix.is_floating_point():
        raise ValueError(f"a matrix operator must be a 2-D floating-point tensor, got shape {tuple(matrix.shape)}")
    m, n = matrix.shape
    domain_shape = (n,) if domain_shape is None else tuple(domain_shape)
    range_shape = (m,) if range_shape is None else tuple(range_shape)
    if _prod(domain_shape) != n or _prod(range_shape) != m:
        raise ValueError(
            f"matrix of shape {(m, n)} does not fit domain_shape {domain_shape} and range_shape {range_shape}"
        )

    # Keep A and A^T (sparse: both in CSR, fast row-wise products) and one copy per dtype/device.
    if matrix.layout == torch.strided:
        pair = (matrix, matrix.T)
    else:
        coo = matrix.to_sparse_coo().coalesce()
        pair = (coo.to_sparse_csr(), coo.t().coalesce().to_sparse_csr())
    cache: dict = {}

    def get(like: Tensor) -> tuple[Tensor, Tensor]:
        key = (like.dtype, like.device)
        if key not in cache:
            cache[key] = tuple(a.to(dtype=like.dtype, device=like.device) for a in pair)
        return cache[key]

    def fwd(x: Tensor) -> Tensor:
        a, _ = get(x)
        return (a @ x.reshape(x.shape[0], n).T).T.reshape((x.shape[0],) + range_shape)

    def adj(y: Tensor) -> Tensor:
        _, at = get(y)
        return (at @ y.reshape(y.shape[0], m).T).T.reshape((y.shape[0],) + domain_shape)

    return ForwardOperator(fwd, adj, domain_shape, range_shape, kind="matrix")


def _pylops_operator(
    op: Any, domain_shape: Optional[Sequence[int]], range_shape: Optional[Sequence[int]]
) -> ForwardOperator:
    m, n = (int(s) for s in op.shape)
    domain_shape = (n,) if domain_shape is None else tuple(domain_shape)
    range_shape = (m,) if range_shape is None else tuple(range_shape)
    if _prod(domain_shape) != n or _prod(range_shape) != m:
        raise ValueError(
            f"pylops operator of shape {(m, n)} does not fit domain_shape {domain_shape} "
            f"and range_shape {range_shape}"
        )

    # pylops works on numpy arrays: the whole batch as columns (matmat/rmatmat) when the operator
    # offers it, else one sample at a time; convert on the way in and out.
    def apply(
        vec: Callable[[np.ndarray], np.ndarray],
        mat: Optional[Callable[[np.ndarray], np.ndarray]],
        t: Tensor,
        size: int,
        out_shape: tuple[int, ...],
    ) -> Tensor:
        arr = t.detach().reshape(t.shape[0], size).cpu().numpy()
        if mat is not None:
            out = np.asarray(mat(np.ascontiguousarray(arr.T))).T
        else:
            out = np.stack([np.asarray(vec(a)) for a in arr])
        out = np.ascontiguousarray(out, dtype=arr.dtype)
        return torch.from_numpy(out).to(device=t.device, dtype=t.dtype).reshape((t.shape[0],) + out_shape)

    matmat, rmatmat = getattr(op, "matmat", None), getattr(op, "rmatmat", None)
    return ForwardOperator(
        lambda x: apply(op.matvec, matmat, x, n, range_shape),
        lambda y: apply(op.rmatvec, rmatmat, y, m, domain_shape),
        domain_shape, range_shape, kind="pylops",
    )


def as_operator(
    op: Any,
    adjoint: Optional[TorchMap] = None,
    domain_shape: Optional[Sequence[int]] = None,
    range_shape: Optional[Sequence[int]] = None,
    check: bool = True,
    tol: float = 1e-6,
) -> ForwardOperator:
    r"""Wrap a linear operator as a batched :class:`ForwardOperator` and check its adjoint.

    Accepted: a torch matrix of shape ``(m, n)`` (dense or sparse); a pylops ``LinearOperator``
    (anything with ``shape``, ``matvec`` and ``rmatvec``); a torch callable ``forward`` together
    with its ``adjoint`` (both batched; then ``domain_shape`` and ``range_shape`` are required);
    or an existing :class:`ForwardOperator` (returned as is). A matrix or pylops operator acts on
    each sample flattened, so ``domain_shape`` may be any shape with ``n`` entries (e.g.
    ``(1, H, W)`` for an image) and ``range_shape`` any with ``m``.

    Args:
        op: the operator (see above).
        adjoint: the adjoint callable, only with a callable ``op``.
        domain_shape, range_shape: shapes of one sample of the unknown and of the observation.
        check: run :func:`adjoint_test` (in float64) and refuse a failing operator.
        tol: largest accepted relative mismatch of the dot-product test.

    Raises:
        ValueError: unsupported operator, shapes that do not fit, or a failed adjoint test.

    >>> import torch
    >>> op = as_operator(torch.randn(6, 4, dtype=torch.float64), domain_shape=(1, 2, 2))
    >>> op.forward(torch.randn(3, 1, 2, 2, dtype=torch.float64)).shape
    torch.Size([3, 6])
    >>> bad = lambda x: 2 * x
    >>> as_operator(bad, adjoint=lambda y: y, domain_shape=(3,), range_shape=(3,))
    Traceback (most recent call last):
    ...
    ValueError: the operator failed the adjoint (dot-product) test: relative mismatch ... > tol 1e-06
    """
    if isinstance(op, ForwardOperator):
        wrapped = op
    elif isinstance(op, Tensor):
        if adjoint is not None:
            raise ValueError("a matrix operator brings its own adjoint (its transpose); do not pass adjoint=")
        wrapped = _matrix_operator(op, domain_shape, range_shape)
    elif hasattr(op, "matvec") and hasattr(op, "rmatvec") and hasattr(op, "shape"):
        wrapped = _pylops_operator(op, domain_shape, range_shape)
    elif callable(op):
        if adjoint is None or not callable(adjoint):
            raise ValueError("a callable operator needs its adjoint: as_operator(forward, adjoint=...)")
        if domain_shape is None or range_shape is None:
            raise ValueError("a callable operator needs domain_shape and range_shape")
        wrapped = ForwardOperator(op, adjoint, domain_shape, range_shape, kind="callables")
    else:
        raise ValueError(
            "operator must be a torch matrix, a pylops LinearOperator, a callable with adjoint=, "
            f"or a ForwardOperator; got {type(op).__name__}"
        )
    if check:
        err = adjoint_test(wrapped)
        if not err <= tol:
            raise ValueError(
                f"the operator failed the adjoint (dot-product) test: relative mismatch {err:.3e} > tol {tol:g}"
            )
    return wrapped


class _MisfitGradient(torch.autograd.Function):
    """g = A^T (A x - y); VJP: dx = A^T A dg, dy = -A dg; JVP: dg = A^T (A dx - dy) (the map is
    affine). Under vmap the operator is applied slice by slice (it need not be a torch function)."""

    @staticmethod
    def forward(op: ForwardOperator, x: Tensor, y: Tensor) -> Tensor:
        return op.adjoint(op.forward(x) - y)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: Tensor) -> None:
        ctx.op = inputs[0]

    @staticmethod
    def backward(ctx: FunctionCtx, dg: Tensor):
        op = ctx.op
        a_dg = op.forward(dg)
        dx = op.adjoint(a_dg) if ctx.needs_input_grad[1] else None
        dy = -a_dg if ctx.needs_input_grad[2] else None
        return None, dx, dy

    @staticmethod
    def jvp(ctx: FunctionCtx, _op_tangent: None, dx: Optional[Tensor], dy: Optional[Tensor]) -> Tensor:
        op = ctx.op
        if dx is None:
            return op.adjoint(-dy)
        a_dx = op.forward(dx)
        return op.adjoint(a_dx if dy is None else a_dx - dy)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Optional[int], ...], op: ForwardOperator, x: Tensor,
             y: Tensor) -> tuple[Tensor, int]:  # info: torch's VmapInfo (batch_size, randomness)
        _, x_dim, y_dim = in_dims
        xs = x.movedim(x_dim, 0) if x_dim is not None else x.expand(info.batch_size, *x.shape)
        ys = y.movedim(y_dim, 0) if y_dim is not None else y.expand(info.batch_size, *y.shape)
        return torch.stack([_MisfitGradient.apply(op, xs[i], ys[i]) for i in range(info.batch_size)]), 0


def misfit_gradient(op: ForwardOperator, x: Tensor, y: Tensor) -> Tensor:
    r"""Gradient of the data misfit :math:`\tfrac12\|A x - y\|^2` with respect to ``x``:
    :math:`g = A^T(Ax - y)`, differentiable in ``x`` and ``y`` whatever the operator (its
    vector-Jacobian product :math:`(\bar x, \bar y) = (A^T A \bar g, -A \bar g)` is written out).

    >>> import torch
    >>> op = as_operator(torch.eye(2, dtype=torch.float64))
    >>> misfit_gradient(op, torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)).tolist()
    [[1.0, 1.0]]
    """
    return _MisfitGradient.apply(op, x, y)
