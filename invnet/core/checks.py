"""Check helpers users can run on their own blocks: invertibility, log-determinant against a
brute-force Jacobian, hand-written backward against plain autograd, and the bytes autograd keeps.

>>> import torch, invnet
>>> from invnet.core.checks import invertibility_error, logdet_error
>>> block = invnet.layers.AffineCoupling(4, hidden=8, ndim=1).double()
>>> x = torch.randn(2, 4, 6, dtype=torch.float64)
>>> invertibility_error(block, x) < 1e-12, logdet_error(block, x) < 1e-10
(True, True)
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .module import InvertibleModule, memory_saving

__all__ = [
    "invertibility_error", "logdet_error", "gradient_error", "saved_bytes", "randomize_parameters_",
    "relative_error",
]


def relative_error(a: Tensor, b: Tensor, floor: float = 0.0) -> float:
    """``max|a - b| / max(max|b|, floor, tiny)``."""
    scale = b.abs().max().clamp_min(max(floor, torch.finfo(b.dtype).tiny))
    return float((a - b).abs().max() / scale)


@torch.no_grad()
def invertibility_error(block: InvertibleModule, x: Tensor, c: Optional[Tensor] = None) -> float:
    """Relative error of ``inverse(forward(x))`` against ``x``, and of the inverse's logdet against
    minus the forward's (the larger of the two)."""
    y, ld = block(x, c)
    x_rec, ld_inv = block.inverse(y, c)
    err = relative_error(x_rec, x)
    scale = ld.abs().max().clamp_min(1.0)
    return max(err, float((ld + ld_inv).abs().max() / scale))


def _brute_logdet(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        jac = torch.autograd.functional.jacobian(lambda v: fn(v).reshape(-1), xi)
        jac = jac.reshape(jac.shape[0], -1)
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def logdet_error(block: InvertibleModule, x: Tensor, c: Optional[Tensor] = None) -> float:
    """Largest absolute error of the forward and inverse logdets against
    ``slogdet`` of the brute-force Jacobian (per sample; use small inputs)."""
    with torch.no_grad():
        y, ld = block(x, c)
        _, ld_inv = block.inverse(y, c)

    def per_sample(fn: Callable[[Tensor, Optional[Tensor]], tuple[Tensor, Tensor]], v: Tensor, i: int) -> Tensor:
        ci = None if c is None else c[i : i + 1]
        return fn(v, ci)[0]

    with memory_saving(False):
        brute_fwd = torch.cat(
            [_brute_logdet(lambda v, i=i: per_sample(block, v, i), x[i : i + 1]) for i in range(x.shape[0])]
        )
        brute_inv = torch.cat(
            [_brute_logdet(lambda v, i=i: per_sample(block.inverse, v, i), y[i : i + 1]) for i in range(y.shape[0])]
        )
    return max(float((ld - brute_fwd).abs().max()), float((ld_inv - brute_inv).abs().max()))


def randomize_parameters_(module: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Add seeded noise to every parameter (zero-initialised last layers would otherwise make
    gradient checks trivial). Returns the module."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p))
    return module


def _loss_grads(
    block: InvertibleModule, inp: Tensor, c: Optional[Tensor], weight_y: Tensor, weight_ld: Tensor, inverse: bool
) -> list[Tensor]:
    params = [p for p in block.parameters() if p.requires_grad]
    inp = inp.detach().clone().requires_grad_(True)
    c_in = None if c is None else c.detach().clone().requires_grad_(True)
    out, ld = (block.inverse if inverse else block)(inp, c_in)
    loss = (weight_y * out).sum() + (weight_ld * ld).sum() + 0.5 * (out**2).sum()
    inputs = [inp] + ([c_in] if c_in is not None else []) + params
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


def gradient_error(
    block: InvertibleModule, x: Tensor, c: Optional[Tensor] = None, inverse: bool = False, seed: int = 0
) -> float:
    """Largest relative error between gradients (input, condition, every parameter) computed with
    the memory-free backward and with plain autograd, for a loss that weights the output and the
    logdet arbitrarily; each gradient is measured against its own size, or against 1e-6 of the
    largest gradient when it is smaller (an exactly-zero gradient holds only round-off). Run in
    float64. ``inverse=True`` checks the inverse map's backward at
    ``y = f(x)``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if inverse:  # differentiate the inverse at y = f(x)
            x = block(x, c)[0]
        probe, _ = (block.inverse if inverse else block)(x, c)
    w_y = torch.randn(probe.shape, generator=gen, dtype=torch.float64).to(probe)
    w_ld = torch.randn(x.shape[0], generator=gen, dtype=torch.float64).to(probe)
    with memory_saving(True):
        g_saving = _loss_grads(block, x, c, w_y, w_ld, inverse)
    with memory_saving(False):
        g_plain = _loss_grads(block, x, c, w_y, w_ld, inverse)
    # each gradient relative to its own size, but not below 1e-6 of the largest one: a gradient
    # that is zero in exact arithmetic holds only round-off in both modes (1e-17 against 1e-17)
    floor = 1e-6 * max(float(g.abs().max()) for g in g_plain)
    return max(relative_error(a, b, floor) for a, b in zip(g_saving, g_plain))


def saved_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while running ``fn()`` (counted with
    saved-tensor hooks, each storage once). Returns that count; ``fn``'s result is discarded."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
