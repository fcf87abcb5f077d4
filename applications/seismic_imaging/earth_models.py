"""Synthetic earth models: layered, folded and faulted log-impedance sections (2D) and cubes (3D).

Every model is built from a "layer coordinate" u(z, x[, y]) = z - fold(x, y) - throw * [beyond the
fault]: points with equal u belong to the same layer. Layer boundaries are drawn in u, and each
layer gets a log-impedance from a trend that increases with depth plus a random jump, so the
section is blocky (sharp interfaces, the part seismic data see) on a smooth background (the low
frequencies seismic data miss, which the posterior has to fill in). A small fine-scale
heterogeneity (``texture``, as in well logs) is added inside the layers; without it the models
would lie on a low-dimensional set (exactly constant layers) on which a density is degenerate.
"""
from __future__ import annotations

import numpy as np

__all__ = ["earth_model", "earth_models", "reflectivity"]


def earth_model(
    shape: tuple[int, ...], rng: np.random.Generator, kind: str = "random", texture: float = 0.02
) -> np.ndarray:
    """One log-impedance model of ``shape = (nz, nx)`` or ``(nz, nx, ny)`` (depth/time first).

    ``kind``: ``"layered"`` (flat layers), ``"folded"`` (sinusoidal folds), ``"faulted"``
    (folded, then cut by a dipping normal fault with a throw) or ``"random"`` (one of the three).
    ``texture``: standard deviation of the white fine-scale heterogeneity added everywhere.
    """
    if len(shape) not in (2, 3):
        raise ValueError(f"shape must be (nz, nx) or (nz, nx, ny), got {shape}")
    if kind == "random":
        kind = ("layered", "folded", "faulted")[int(rng.integers(0, 3))]
    if kind not in ("layered", "folded", "faulted"):
        raise ValueError(f"kind must be layered, folded, faulted or random, got {kind!r}")
    nz = shape[0]
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    z, lateral = grids[0], grids[1:]
    u = z.copy()
    if kind in ("folded", "faulted"):
        for h, n in zip(lateral, shape[1:]):
            amp = rng.uniform(1.0, 0.15 * nz)
            wavelength = rng.uniform(0.7, 2.0) * n
            u -= amp * np.sin(2 * np.pi * h / wavelength + rng.uniform(0, 2 * np.pi))
    if kind == "faulted":
        dip = np.tan(np.deg2rad(rng.uniform(-30, 30)))
        offset = sum(rng.uniform(0.3, 0.7) * n * w for n, w in zip(shape[1:], _unit(len(lateral), rng)))
        proj = sum(h * w for h, w in zip(lateral, _unit(len(lateral), rng))) if len(lateral) > 1 else lateral[0]
        side = proj - offset - dip * z > 0
        u = u - side * rng.uniform(0.1, 0.3) * nz * rng.choice([-1, 1])
    n_layers = int(rng.integers(4, 9))
    bounds = np.sort(rng.uniform(-0.3 * nz, 1.3 * nz, n_layers - 1))
    layer = np.searchsorted(bounds, u)
    depth_of_layer = np.concatenate([[-0.3 * nz], bounds]) / nz
    values = 0.8 * depth_of_layer + rng.normal(0, 0.25, n_layers)
    return values[layer] + texture * rng.normal(size=shape)


def _unit(d: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=d)
    return v / np.linalg.norm(v)


def earth_models(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """``n`` random models stacked as ``(n, 1, *shape)`` (a channel axis for invnet)."""
    rng = np.random.default_rng(seed)
    return np.stack([earth_model(shape, rng)[None] for _ in range(n)])


def reflectivity(log_impedance: np.ndarray) -> np.ndarray:
    """Normal-incidence reflectivity r = (1/2) d/dz log(AI) (centred differences along axis 0)."""
    return 0.5 * np.gradient(log_impedance, axis=0)
