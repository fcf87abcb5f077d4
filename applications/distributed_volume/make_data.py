"""Synthetic 3D data for the distributed-volume application: smooth random "earth" volumes x and
blurred, noisy observations y = B x + noise (B: a local 3D box blur), written to HDF5 and Zarr.

    python applications/distributed_volume/make_data.py --out /tmp/dv --size 32 --samples 64

Writes OUT/data.h5 (datasets x_train, y_train, x_test, y_test; shapes (N, 1, S, S, S)) and the same
arrays to OUT/data.zarr. Files are written to a temporary name and renamed.
"""
from __future__ import annotations

import argparse
import os
import shutil

import h5py
import numpy as np
import torch
import torch.nn.functional as F
import zarr


def smooth_volumes(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Layered volumes: a depth trend, a few tilted interfaces, and smooth noise."""
    z = np.linspace(0, 1, size)[None, :, None, None]
    out = np.empty((n, 1, size, size, size), dtype=np.float32)
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, size)] * 3, indexing="ij"))
    for i in range(n):
        vol = 1.5 + 2.0 * z[0] + 0 * grid[0]
        for _ in range(3):
            normal = rng.normal(size=3) * np.array([1.0, 0.2, 0.2])
            depth = rng.uniform(0.2, 0.8)
            vol = vol + rng.uniform(-0.5, 0.5) * (np.tensordot(normal, grid, 1) / np.linalg.norm(normal) > depth)
        noise = torch.from_numpy(rng.normal(size=(1, 1, size, size, size)).astype(np.float32))
        noise = F.avg_pool3d(noise, 5, stride=1, padding=2, count_include_pad=False)
        out[i, 0] = vol + 0.5 * noise[0, 0].numpy()
    return out


def observe(x: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """y = box blur (3 cells, zero padded: a local operator) of x plus Gaussian noise."""
    t = torch.from_numpy(x)
    blurred = F.avg_pool3d(t, 3, stride=1, padding=1, count_include_pad=True).numpy()
    return (blurred + noise * rng.normal(size=x.shape)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.size < 4 or args.samples < 2:
        raise ValueError("need --size >= 4 and --samples >= 2")
    rng = np.random.default_rng(args.seed)
    x = smooth_volumes(args.samples + 2, args.size, rng)
    y = observe(x, args.noise, rng)
    arrays = {"x_train": x[2:], "y_train": y[2:], "x_test": x[:2], "y_test": y[:2]}
    os.makedirs(args.out, exist_ok=True)
    h5 = os.path.join(args.out, "data.h5")
    with h5py.File(h5 + ".tmp", "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v, chunks=(1, 1) + (min(16, args.size),) * 3)
    os.replace(h5 + ".tmp", h5)
    zr = os.path.join(args.out, "data.zarr")
    shutil.rmtree(zr + ".tmp", ignore_errors=True)
    for k, v in arrays.items():
        zarr.create_array(store=zr + ".tmp", name=k, data=v, chunks=(1, 1) + (min(16, args.size),) * 3)
    shutil.rmtree(zr, ignore_errors=True)
    os.replace(zr + ".tmp", zr)
    print(f"wrote {h5} and {zr}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


if __name__ == "__main__":
    main()
