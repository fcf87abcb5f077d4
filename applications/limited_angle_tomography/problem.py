"""The limited-angle problem as invnet's trainer sees it: the operator, the simulator of training
pairs, the model and the loss, each named by a config's entry points.

* ``[data] source = "applications.limited_angle_tomography.problem:simulate"``: fresh random-ellipse
  phantoms ``x`` and their noisy limited-angle sinograms ``y = A x + e`` every step (the sparse
  Radon matrix of :mod:`.tomography` is cheap enough to apply on the fly);
* ``[model] type = "applications.limited_angle_tomography.problem:learned_loop"``: the i-RIM
  :class:`invnet.networks.LearnedLoop` on that operator;
* ``[training] loss = "applications.limited_angle_tomography.problem:squared_error"``: the mean
  squared error of the reconstruction, per sample.

The geometry (``size``, ``angles``, ``arc``) appears in ``[data] arguments`` and in ``[model]``:
the operator is rebuilt from it wherever a checkpoint is read (:func:`radon_operator`, built once
per process and geometry).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from invnet.networks import LearnedLoop
from invnet.operators import adjoint_test, as_operator

from .tomography import operator_norm, radon_matrix, random_ellipses

__all__ = ["check_geometry", "radon_operator", "observe", "simulate", "learned_loop", "squared_error"]


def check_geometry(size: int, angles: int, arc: float) -> None:
    """Raise ``ValueError`` for a geometry :func:`radon_operator` cannot build."""
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer of at least 8 pixels, got {size!r}")
    if not isinstance(angles, int) or angles < 1:
        raise ValueError(f"angles must be a positive integer, got {angles!r}")
    if not 0 < arc <= 180:
        raise ValueError(f"arc must be in (0, 180] degrees, got {arc!r}")


@functools.lru_cache(maxsize=4)
def radon_operator(size: int = 32, angles: int = 30, arc: float = 120.0) -> Any:
    """The parallel-beam Radon transform of ``size x size`` images over ``angles`` equally spaced
    angles in ``[0, arc)`` degrees (:func:`.tomography.radon_matrix`), scaled to operator norm 1,
    as a pylops ``MatrixMult`` over a scipy CSR matrix wrapped by
    :func:`invnet.operators.as_operator` (float32; its adjoint is checked by a dot-product test).

    >>> op = radon_operator(8, 4, 90.0)
    >>> op.domain_shape, op.range_shape
    ((1, 8, 8), (52,))
    """
    import pylops
    import scipy.sparse

    check_geometry(size, angles, arc)
    a_coo = radon_matrix(size, np.linspace(0.0, arc, angles, endpoint=False))
    a_coo = a_coo * (1.0 / operator_norm(a_coo))
    rows, cols = a_coo.indices().numpy()
    a_csr = scipy.sparse.csr_matrix((a_coo.values().numpy(), (rows, cols)), shape=tuple(a_coo.shape))
    radon = pylops.MatrixMult(a_csr.astype(np.float32), dtype=np.float32)
    # the adjoint test runs in float64 through float32 products: tolerance to match
    op = as_operator(radon, domain_shape=(1, size, size), range_shape=(a_csr.shape[0],), tol=1e-5)
    adjoint_test(op)
    return op


def observe(x: Tensor, generator: torch.Generator, noise: float, size: int, angles: int, arc: float) -> Tensor:
    """Noisy sinograms of images ``x`` ``(n, 1, size, size)``: :math:`y = Ax + \\sigma\\,
    \\mathrm{rms}(Ax)\\,\\varepsilon` per image, with ``noise`` = :math:`\\sigma` relative to the
    data's RMS and :math:`\\varepsilon` drawn from ``generator``."""
    clean = radon_operator(size, angles, arc).forward(x)
    rms = clean.pow(2).mean(1, keepdim=True).sqrt()
    return clean + noise * rms * torch.randn(clean.shape, generator=generator)


def simulate(n: int, generator: torch.Generator, size: int = 32, angles: int = 30, arc: float = 120.0,
             noise: float = 0.02) -> tuple[Tensor, Tensor]:
    """``n`` fresh pairs: random-ellipse phantoms ``x`` ``(n, 1, size, size)`` in ``[0, 1]``
    (:func:`.tomography.random_ellipses`) and their sinograms ``y`` ``(n, angles * bins)``
    (:func:`observe`), float32, every random number from ``generator``.

    >>> x, y = simulate(2, torch.Generator().manual_seed(0), size=8, angles=4, arc=90.0)
    >>> tuple(x.shape), tuple(y.shape)
    ((2, 1, 8, 8), (2, 52))
    """
    check_geometry(size, angles, arc)
    if not noise >= 0:
        raise ValueError(f"noise must be non-negative (relative to the data's RMS), got {noise!r}")
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    x = torch.from_numpy(random_ellipses(n, size, rng))[:, None]
    return x, observe(x, generator, noise, size, angles, arc)


def learned_loop(size: int = 32, angles: int = 30, arc: float = 120.0, state_channels: int = 6,
                 iterations: int = 5, hidden: int = 16) -> LearnedLoop:
    """The i-RIM loop (:class:`invnet.networks.LearnedLoop`) on :func:`radon_operator` of this
    geometry: ``state_channels`` = 1 estimate channel plus memory, ``iterations`` unrolled steps,
    conditioners with ``hidden`` channels.

    >>> learned_loop(8, 4, 90.0, state_channels=4, iterations=2, hidden=4).reconstruct(torch.zeros(3, 52)).shape
    torch.Size([3, 1, 8, 8])
    """
    if state_channels < 2:
        raise ValueError(f"state_channels must be at least 2 (the estimate and memory), got {state_channels}")
    return LearnedLoop(radon_operator(size, angles, arc), channels=state_channels, iterations=iterations, hidden=hidden)


def squared_error(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Per-sample mean squared error of the loop's reconstruction, :math:`\\lVert \\hat x(y) - x
    \\rVert^2 / D` (its batch mean is the MSE the published run minimised)."""
    x, y = batch
    return (model.reconstruct(y) - x).pow(2).flatten(1).mean(1)
