r"""Convolutions of the conditioners at full kernel speed, whatever the size, batch and channels.

PyTorch (2.x, CPU) picks the kernel of a convolution by a size heuristic: for a float32 input of
batch 1 it uses oneDNN only when ``channels * size_0 * size_1`` of the input exceeds a threshold,
and otherwise its reference kernel (``aten::slow_conv3d_forward``, ``thnn_conv2d``), which unfolds
the input into ``kernel_volume`` copies and costs 4-7x more per voxel in 3D. Which one a
conditioner got then depended on its channel count and volume, so the time of a 3D step did not
follow the volume. This module decides the path by a rule:

1. **Pointwise** (every kernel size 1): a matrix product over the channel axis
   (:func:`pointwise`), :math:`y_{n,:,s} = W x_{n,:,s} + b`, never a convolution kernel.
2. **Kernel larger than one cell, on the CPU, in a dtype oneDNN computes** (float32, bfloat16,
   float16):

   * the input goes in *channels-last* memory format: oneDNN's direct kernel then works on
     ``N D H W C`` without padding small channel counts to blocks of 16, and hands its output back
     in that format, so a conditioner's layers chain without reorders;
   * PyTorch is asked which kernel it would run (``torch._C._select_conv_backend``, the function
     its own convolution calls). If it names a reference kernel (``Slow2d``, ``Slow3d``), the
     input, necessarily a batch of one, is *folded*: cut along its first space axis (with at
     least two output cells) into two slabs that overlap by the kernel's reach, and stacked as a
     batch of two, which PyTorch sends to oneDNN. Each output cell is computed from exactly the
     same input cells and weights as before, so the map is unchanged; in channels-last layout the
     two output slabs lie back to back in memory and unfold into the volume without a copy.
     (Should a PyTorch version lack the selector, every batch of one is folded.)
3. **Otherwise**: the plain ``torch.nn.functional.conv{1,2,3}d``. That is float64 (oneDNN does
   not compute it; tests use it), CUDA (cuDNN chooses), and 1D: PyTorch runs a 1D convolution as
   a 2D one over a ``1 x L`` image, and its reference kernel there (one im2col of ``k`` shifted
   copies and a matrix product) measured as fast as oneDNN or faster at every size tried, while
   channels-last and folding only added copies (docs/benchmarks.md).

The rule names no sizes: it holds for any volume, batch and channel count, and
``tests/test_kernels.py`` checks through the profiler's op names that the reference kernel is not
called at shapes that used to fall into it.

:func:`reference_kernels` turns the rule off in a ``with`` block (thread-local), for benchmarks
that compare against PyTorch's own choice.

>>> import torch
>>> x, w = torch.randn(1, 4, 10, 10, 10), torch.randn(8, 4, 3, 3, 3)
>>> y = conv(x, w, None)
>>> y.shape, bool(torch.allclose(y, torch.nn.functional.conv3d(x, w), atol=1e-4))
(torch.Size([1, 8, 8, 8, 8]), True)
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from ..core.forward_mode import in_plain_forward_mode

__all__ = ["conv", "pointwise", "reference_kernels", "fast_kernels_enabled", "reference_kernel_chosen"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}
#: dtypes in which oneDNN computes convolutions on the CPU (rule 2)
ONEDNN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_state = threading.local()


def fast_kernels_enabled() -> bool:
    """Whether :func:`conv` and :func:`pointwise` follow the kernel rule (the default)."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def reference_kernels(enabled: bool = True) -> Iterator[None]:
    """Inside the ``with`` block, convolutions go straight to ``torch.nn.functional`` (PyTorch's
    own kernel choice, as before the rule): for benchmarks. Thread-local, like ``torch.no_grad``.

    >>> import torch
    >>> with reference_kernels():
    ...     fast_kernels_enabled()
    False
    """
    previous = fast_kernels_enabled()
    _state.enabled = not enabled
    try:
        yield
    finally:
        _state.enabled = previous


def pointwise(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    r"""A 1x1 (x1) convolution as a matrix product over channels:
    :math:`y_{n,:,s} = W x_{n,:,s} + b` for ``x`` of shape ``(N, C_in, *space)`` and a weight of
    shape ``(C_out, C_in, 1, ...)`` (or ``(C_out, C_in)``); vectors ``(N, C_in)`` are welcome.

    A channels-last input is multiplied in place of its layout (``(N, *space, C) @ W^T``, output
    channels-last too); a channels-first one as a batched ``W @ (C_in, S)`` product.

    >>> import torch
    >>> x, w, b = torch.randn(2, 3, 4, 5), torch.randn(6, 3, 1, 1), torch.randn(6)
    >>> bool(torch.allclose(pointwise(x, w, b), torch.nn.functional.conv2d(x, w, b), atol=1e-5))
    True
    """
    w = weight.reshape(weight.shape[0], weight.shape[1])
    d = x.dim() - 2
    if d == 0:  # plain vectors (N, C)
        return F.linear(x, w, bias)
    if not fast_kernels_enabled() and d in _CONV and weight.dim() == x.dim():
        return _CONV[d](x, weight, bias)
    # (layout queries are not answered inside vmap: forward mode takes the channels-first path)
    if (d >= 2 and not in_plain_forward_mode()
            and x.is_contiguous(memory_format=_CHANNELS_LAST[d]) and not x.is_contiguous()):
        return F.linear(x.movedim(1, -1), w, bias).movedim(-1, 1)
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    if bias is None:
        out = torch.matmul(w, flat)
    else:
        out = torch.baddbmm(bias.reshape(1, -1, 1), w.expand(n, -1, -1), flat)
    return out.reshape((n, w.shape[0]) + tuple(x.shape[2:]))


def _uses_onednn_rule(x: Tensor) -> bool:
    # not in forward mode: layouts cannot be chosen inside vmap, and the fold has no jvp rule
    return (fast_kernels_enabled() and x.device.type == "cpu" and x.dtype in ONEDNN_DTYPES
            and not in_plain_forward_mode())


def conv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Valid (unpadded), stride-1 convolution of an already padded ``x`` of shape
    ``(N, C_in, *space)`` (1 to 3 space dimensions) with ``weight`` ``(C_out, C_in, *kernel)``,
    on the kernel path chosen by the rule of this module. Returns ``(N, C_out, *out_space)``, in
    channels-last layout on rule 2 (values and shape are those of ``F.conv{d}d(x, weight, bias)``).

    >>> import torch
    >>> x, w = torch.randn(1, 2, 7), torch.randn(3, 2, 3)
    >>> bool(torch.allclose(conv(x, w, None), torch.nn.functional.conv1d(x, w), atol=1e-5))
    True
    """
    d = x.dim() - 2
    if d not in _CONV or weight.dim() != x.dim():
        raise ValueError(
            f"conv expects x (N, C, *space) with 1 to 3 space dimensions and a weight of the same rank; "
            f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if all(k == 1 for k in weight.shape[2:]):
        return pointwise(x, weight, bias)
    if d == 1 or not _uses_onednn_rule(x):
        return _CONV[d](x, weight, bias)
    return _conv_onednn(x, weight, bias)


def _conv_onednn(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Rule 2 (2D and 3D): channels-last input, a batch of one folded when PyTorch would run its
    reference kernel."""
    d = x.dim() - 2
    x = x.contiguous(memory_format=_CHANNELS_LAST[d])
    kernel = weight.shape[2:]
    out_space = [s - k + 1 for s, k in zip(x.shape[2:], kernel)]
    axis = next((a for a, s in enumerate(out_space) if s >= 2), None)
    if x.shape[0] >= 2 or axis is None or not reference_kernel_chosen(x, weight, bias):
        return _CONV[d](x, weight, bias)
    reach = kernel[axis] - 1
    slabs = _FoldSlabs.apply(x, 2 + axis, reach)
    return _unfold_slabs(_CONV[d](slabs, weight, bias), 2 + axis, out_space[axis])


def reference_kernel_chosen(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether PyTorch would run its reference kernel (``Slow2d``/``Slow3d``, not oneDNN or a
    vendor library) for the valid, stride-1 convolution of ``x`` with ``weight``. Where PyTorch
    cannot be asked, a batch of one counts as slow (its heuristic only ever rejects those).

    >>> import torch
    >>> reference_kernel_chosen(torch.randn(1, 4, 34, 34, 34), torch.randn(8, 4, 3, 3, 3), None)
    True
    >>> reference_kernel_chosen(torch.randn(2, 4, 34, 34, 34), torch.randn(8, 4, 3, 3, 3), None)
    False
    """
    select = getattr(torch._C, "_select_conv_backend", None)
    if select is None:
        return x.shape[0] < 2
    d = x.dim() - 2
    try:
        backend = select(x, weight, bias, [1] * d, [0] * d, [1] * d, False, [0] * d, 1)
    except (RuntimeError, TypeError):  # a signature this code does not know
        return x.shape[0] < 2
    return getattr(backend, "name", str(backend)).split(".")[-1].startswith("Slow")


class _FoldSlabs(torch.autograd.Function):
    r"""``(1, C, L + r, ...) -> (2, C, h + r, ...)`` with ``h = ceil(L / 2)``: the two slabs of a
    batch-1 input along ``dim`` whose valid convolutions (reach ``r``) give output cells
    ``[0, h)`` and ``[L - h, L)``. Backward: the slabs' gradients added back into one tensor
    (the overlapping cells receive both)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, dim: int, reach: int) -> Tensor:
        length = x.shape[dim] - reach
        half = (length + 1) // 2
        ctx.meta = (x.shape, dim, reach, length, half)
        fmt = _CHANNELS_LAST[x.dim() - 2]
        shape = list(x.shape)
        shape[0], shape[dim] = 2, half + reach
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        out[0].copy_(x[0].narrow(dim - 1, 0, half + reach))
        out[1].copy_(x[0].narrow(dim - 1, length - half, half + reach))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: FunctionCtx, g: Tensor):
        shape, dim, reach, length, half = ctx.meta
        dx = torch.empty(shape, dtype=g.dtype, device=g.device, memory_format=_CHANNELS_LAST[len(shape) - 2])
        first = dx[0].narrow(dim - 1, 0, half + reach)
        first.copy_(g[0])
        # cells only the second slab reaches are copied, the overlap (length - half .. half + reach) added
        overlap = 2 * half + reach - length
        dx[0].narrow(dim - 1, half + reach, length - half).copy_(g[1].narrow(dim - 1, overlap, length - half))
        dx[0].narrow(dim - 1, length - half, overlap).add_(g[1].narrow(dim - 1, 0, overlap))
        return dx, None, None


def _channels_last_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Strides of a contiguous channels-last tensor of ``shape`` ``(N, C, *space)``."""
    strides = [0] * len(shape)
    step = 1
    for d in [1] + list(range(len(shape) - 1, 1, -1)) + [0]:
        strides[d] = step
        step *= shape[d]
    return tuple(strides)


def _unfold_slabs(y: Tensor, dim: int, length: int) -> Tensor:
    """Inverse of the fold on the output: ``(2, C, h, ...) -> (1, C, length, ...)``. For an even
    ``length`` along the first space axis of a channels-last output this is a view (the two slabs
    lie back to back in memory); otherwise the halves are concatenated."""
    half = y.shape[dim]
    if 2 * half == length and dim == 2 and y.is_contiguous(memory_format=_CHANNELS_LAST[y.dim() - 2]):
        # channels-last (2, C, h, *rest) is (2, h, *rest, C) in memory: the same bytes as
        # (1, 2h, *rest, C), i.e. (1, C, 2h, *rest) channels-last
        shape = (1, y.shape[1], length) + tuple(y.shape[3:])
        return y.as_strided(shape, _channels_last_strides(shape))
    return torch.cat([y[:1], y[1:].narrow(dim, 2 * half - length, length - half)], dim=dim)
