"""Pieces of the limited-angle tomography example: a Radon matrix, random-ellipse phantoms, and
the classical baseline (Tikhonov-regularised least squares by conjugate gradients)."""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
from torch import Tensor


def radon_matrix(size: int, angles_deg: np.ndarray, oversample: int = 2) -> torch.Tensor:
    """Sparse matrix of a parallel-beam Radon transform on a ``size x size`` image over the square
    [-1, 1]^2: each pixel is split into ``oversample^2`` sub-pixels, each projected onto the
    detector line ``t = x cos(theta) + y sin(theta)`` and spread over the two nearest detector
    bins by linear interpolation (a pixel-driven projector). Detector spacing equals the pixel
    size; the rows are ordered (angle, detector). Returns a coalesced float64 sparse COO tensor."""
    h = 2.0 / size
    n_det = int(math.ceil(math.sqrt(2.0) * size)) + 1
    t0 = -(n_det - 1) / 2 * h
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    centers = -1 + h * (np.arange(size) + 0.5)
    # sub-pixel coordinates: (size*size*oversample^2,) with their pixel index
    yy, xx, sy, sx = np.meshgrid(centers[::-1], centers, sub, sub, indexing="ij")
    px = (xx + sx * h).ravel()
    py = (yy - sy * h).ravel()
    pixel = np.repeat(np.arange(size * size), oversample**2)
    weight = h / oversample**2  # line integral of a unit pixel, shared by its sub-pixels
    rows, cols, vals = [], [], []
    for a, theta in enumerate(np.deg2rad(angles_deg)):
        t = px * math.cos(theta) + py * math.sin(theta)
        f = (t - t0) / h
        lo = np.floor(f).astype(np.int64)
        frac = f - lo
        for idx, w in ((lo, 1.0 - frac), (lo + 1, frac)):
            ok = (idx >= 0) & (idx < n_det)
            rows.append(a * n_det + idx[ok])
            cols.append(pixel[ok])
            vals.append(weight * w[ok])
    rows, cols, vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    shape = (len(angles_deg) * n_det, size * size)
    index = torch.from_numpy(np.stack([rows, cols]))
    return torch.sparse_coo_tensor(index, torch.from_numpy(vals), shape, dtype=torch.float64).coalesce()


def operator_norm(matrix: torch.Tensor, iters: int = 50, seed: int = 0) -> float:
    """Largest singular value of a sparse COO matrix by power iteration on A^T A."""
    g = torch.Generator().manual_seed(seed)
    at = matrix.t().coalesce()
    v = torch.randn(matrix.shape[1], 1, generator=g, dtype=torch.float64)
    for _ in range(iters):
        v = at @ (matrix @ v)
        v = v / v.norm()
    return float((matrix @ v).norm())


def random_ellipses(n: int, size: int, generator: np.random.Generator, max_ellipses: int = 8) -> np.ndarray:
    """``n`` phantoms in the style of Shepp-Logan: a large random "body" ellipse of intensity
    0.5-1 holding random smaller ellipses that add or remove intensity, clipped to [0, 1]:
    shape ``(n, size, size)``, float32."""
    c = -1 + 2.0 / size * (np.arange(size) + 0.5)
    yy, xx = np.meshgrid(c[::-1], c, indexing="ij")
    out = np.zeros((n, size, size), dtype=np.float32)
    for i in range(n):
        img = np.zeros((size, size))
        for k in range(generator.integers(3, max_ellipses + 1) + 1):
            if k == 0:  # the body
                cx, cy = generator.uniform(-0.05, 0.05, size=2)
                a, b = generator.uniform(0.6, 0.85, size=2)
                value = generator.uniform(0.5, 1.0)
            else:
                r = generator.uniform(0.0, 0.5)
                phi = generator.uniform(0, 2 * np.pi)
                cx, cy = r * np.cos(phi), r * np.sin(phi)
                a, b = generator.uniform(0.05, 0.35, size=2)
                value = generator.uniform(-0.5, 0.5)
            rot = generator.uniform(0, np.pi)
            u = (xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)
            v = -(xx - cx) * np.sin(rot) + (yy - cy) * np.cos(rot)
            img[(u / a) ** 2 + (v / b) ** 2 <= 1] += value
        out[i] = np.clip(img, 0, 1)
    return out


def tikhonov_cg_iterates(forward, adjoint, y: Tensor, lam: float, iters: int):
    """Conjugate gradients on ``(A^T A + lam I) x = A^T y`` from zero, batched: yields the
    iterate after each of ``iters`` iterations (so one run scores every stopping point)."""
    b = adjoint(y)
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    shape = (-1,) + (1,) * (b.dim() - 1)
    rs = (r * r).flatten(1).sum(1)
    for _ in range(iters):
        ap = adjoint(forward(p)) + lam * p
        alpha = (rs / (p * ap).flatten(1).sum(1).clamp_min(1e-30)).view(shape)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).flatten(1).sum(1)
        p = r + (rs_new / rs.clamp_min(1e-30)).view(shape) * p
        rs = rs_new
        yield x


def tikhonov_cg(forward, adjoint, y: Tensor, lam: float, iters: int) -> Tensor:
    """The last of :func:`tikhonov_cg_iterates`."""
    last = deque(tikhonov_cg_iterates(forward, adjoint, y, lam, iters), maxlen=1)  # run them all, keep the last
    return last[0] if last else None
