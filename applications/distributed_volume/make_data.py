"""Synthetic 3D pairs for the distributed-volume application: smooth random "earth" volumes x and
blurred, noisy observations y = B x + noise (B: a 3-cell box blur, a local operator).

    python -m applications.distributed_volume.make_data          # into applications/distributed_volume/data
    python -m applications.distributed_volume.make_data --out /tmp/dv --size 32 --samples 64 --format zarr

Writes OUT/train.h5 and OUT/test.h5 (or OUT/train.zarr and OUT/test.zarr), each with the arrays
``x`` and ``y`` of shape (N, 1, S, S, S), chunked one sample per chunk and at most 16 cells per
axis (a rank then reads only the chunks of its subdomain). Each file is written under a
temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from invnet.data.atomic import atomic_dir, atomic_path

__all__ = ["smooth_volumes", "observe", "write_pairs", "make_data", "DATA"]

#: the default data folder (what config.toml's `[data] path = "data/train.h5"` names)
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def smooth_volumes(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` layered volumes ``(n, 1, size, size, size)`` float32: a depth trend, three tilted
    interfaces with random jumps, and smooth noise (white noise averaged over 5 cells).

    >>> smooth_volumes(2, 8, np.random.default_rng(0)).shape
    (2, 1, 8, 8, 8)
    """
    if n < 1 or size < 4:
        raise ValueError(f"need n >= 1 volumes of size >= 4, got n={n}, size={size}")
    axis = np.linspace(0, 1, size)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"))
    out = np.empty((n, 1, size, size, size), dtype=np.float32)
    for i in range(n):
        vol = 1.5 + 2.0 * grid[0]
        for _ in range(3):
            normal = rng.normal(size=3) * np.array([1.0, 0.2, 0.2])  # mostly horizontal interfaces
            depth = rng.uniform(0.2, 0.8)
            vol = vol + rng.uniform(-0.5, 0.5) * (np.tensordot(normal, grid, 1) / np.linalg.norm(normal) > depth)
        noise = torch.from_numpy(rng.normal(size=(1, 1, size, size, size)).astype(np.float32))
        noise = F.avg_pool3d(noise, 5, stride=1, padding=2, count_include_pad=False)
        out[i, 0] = vol + 0.5 * noise[0, 0].numpy()
    return out


def observe(x: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """``y = B x + noise * e``: a 3-cell box blur (zero padded: a local operator) plus white noise.

    >>> y = observe(np.ones((1, 1, 4, 4, 4), np.float32), 0.0, np.random.default_rng(0))
    >>> float(y[0, 0, 1, 1, 1]), round(float(y[0, 0, 0, 0, 0]), 4)
    (1.0, 0.2963)
    """
    blurred = F.avg_pool3d(torch.from_numpy(x), 3, stride=1, padding=1, count_include_pad=True).numpy()
    return (blurred + noise * rng.normal(size=x.shape)).astype(np.float32)


def write_pairs(path: str, x: np.ndarray, y: np.ndarray) -> None:
    """``x`` and ``y`` to the HDF5 file or Zarr store ``path`` (by its extension), atomically."""
    chunks = (1, 1) + tuple(min(16, s) for s in x.shape[2:])
    if path.endswith(".zarr"):
        import zarr

        with atomic_dir(path, replace=True) as tmp:
            for name, a in (("x", x), ("y", y)):
                zarr.create_array(store=tmp, name=name, data=a, chunks=chunks)
        return
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, a in (("x", x), ("y", y)):
            f.create_dataset(name, data=a, chunks=chunks)


def make_data(out: str = DATA, size: int = 32, samples: int = 64, n_test: int = 2, noise: float = 0.1,
              seed: int = 0, fmt: str = "h5") -> tuple[str, str]:
    """Write ``samples`` training and ``n_test`` test pairs of ``size``^3 volumes to
    ``OUT/train.FMT`` and ``OUT/test.FMT``; returns the two paths. Everything is checked first."""
    if size < 4 or samples < 2 or n_test < 1:
        raise ValueError(f"need size >= 4, samples >= 2 and n_test >= 1, got {size}, {samples}, {n_test}")
    if fmt not in ("h5", "zarr"):
        raise ValueError(f"format must be 'h5' or 'zarr', got {fmt!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be non-negative, got {noise}")
    rng = np.random.default_rng(seed)
    x = smooth_volumes(samples + n_test, size, rng)
    y = observe(x, noise, rng)
    os.makedirs(out, exist_ok=True)
    paths = (os.path.join(out, f"train.{fmt}"), os.path.join(out, f"test.{fmt}"))
    write_pairs(paths[0], x[n_test:], y[n_test:])
    write_pairs(paths[1], x[:n_test], y[:n_test])
    return paths


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m applications.distributed_volume.make_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DATA, help=f"folder for train.* and test.* (default {DATA})")
    ap.add_argument("--size", type=int, default=32, help="volume edge (cells)")
    ap.add_argument("--samples", type=int, default=64, help="training volumes")
    ap.add_argument("--n-test", type=int, default=2, help="test volumes")
    ap.add_argument("--noise", type=float, default=0.1, help="standard deviation of the observation noise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", choices=["h5", "zarr"], default="h5")
    args = ap.parse_args(argv)
    train, test = make_data(args.out, args.size, args.samples, args.n_test, args.noise, args.seed, args.format)
    print(f"wrote {train} ({args.samples} pairs) and {test} ({args.n_test} pairs): x, y of shape (N, 1) + "
          f"{(args.size,) * 3}")
    return 0


if __name__ == "__main__":
    from ..common import run_main

    sys.exit(run_main(main))
