"""The seismic forward operator (pylops post-stack modelling) and synthetic data."""
from __future__ import annotations

import h5py
import numpy as np
from earth_models import earth_models

__all__ = ["poststack_operator", "simulate", "write_pairs"]


def poststack_operator(shape: tuple[int, ...], f0: float = 30.0, dt: float = 0.004):
    """pylops ``PoststackLinearModelling``: d = W D m / 2 for log-impedance m on ``shape``
    (time first), Ricker wavelet of peak frequency ``f0`` Hz sampled every ``dt`` s (at most
    60 ms long, and shorter than half the trace)."""
    import warnings

    from pylops.avo.poststack import PoststackLinearModelling
    from pylops.utils.wavelets import ricker

    half = min(int(0.06 / dt), shape[0] // 2 - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pylops notes that it drops one sample of the time axis
        wav, _, _ = ricker(np.arange(half + 1) * dt, f0=f0)
    spat = shape[1:] if len(shape) > 1 else None
    return PoststackLinearModelling(wav, nt0=shape[0], spatdims=spat)


def simulate(models: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """Noisy post-stack data for models ``(n, 1, *shape)``: d = F m + noise * e, e ~ N(0, I)."""
    shape = models.shape[2:]
    op = poststack_operator(shape)
    clean = np.stack([(op @ m[0].ravel()).reshape(shape)[None] for m in models])
    rng = np.random.default_rng(seed)
    return clean + noise * rng.normal(size=clean.shape)


def write_pairs(path: str, n: int, shape: tuple[int, ...], noise: float, seed: int, chunk: int = 64) -> None:
    """Write ``n`` (model, data) pairs to HDF5 as ``x`` (log-impedance) and ``y`` (seismic),
    generated chunk by chunk so memory stays small."""
    with h5py.File(path + ".tmp", "w") as f:
        dx = f.create_dataset("x", (n, 1) + shape, "f4", chunks=(min(chunk, n), 1) + shape)
        dy = f.create_dataset("y", (n, 1) + shape, "f4", chunks=(min(chunk, n), 1) + shape)
        for k, a in enumerate(range(0, n, chunk)):
            b = min(a + chunk, n)
            m = earth_models(b - a, shape, seed=seed * 100003 + k)
            dx[a:b] = m
            dy[a:b] = simulate(m, noise, seed=seed * 100019 + k)
        f.attrs["forward"] = "pylops PoststackLinearModelling, Ricker 30 Hz, dt 4 ms"
        f.attrs["noise"] = noise
    import os

    os.replace(path + ".tmp", path)
