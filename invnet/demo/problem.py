"""The demo's posterior problem: deblurring layered images.

The problem: recover a blocky layered image :math:`x` (dipping layers, like a simple earth model)
from a blurred, noisy observation :math:`y = k * x + \\sigma\\varepsilon` (Gaussian blur ``k``,
:math:`\\sigma = 0.1`). Deblurring loses the sharp interfaces, so the posterior is broad there and
narrow inside layers: a good first look at uncertainty.
"""
from __future__ import annotations

import math

import h5py
import torch

from ..data.atomic import atomic_path

__all__ = ["layered_images", "blur", "make_demo_data", "demo_data_matches", "NOISE"]

#: standard deviation of the observation noise
NOISE = 0.1


def layered_images(n: int, size: int, gen: torch.Generator, texture: float = 0.05) -> torch.Tensor:
    """``n`` images ``(n, 1, size, size)`` of 3 to 6 dipping layers with values in [-1, 1], plus
    white texture of standard deviation ``texture`` (without it the images would lie on a
    low-dimensional set where a density is degenerate)."""
    rows = torch.arange(size, dtype=torch.float64).reshape(1, size, 1)
    cols = torch.arange(size, dtype=torch.float64).reshape(1, 1, size) - size / 2
    out = torch.empty(n, 1, size, size, dtype=torch.float64)
    for i in range(n):
        k = int(torch.randint(3, 7, (1,), generator=gen))
        depths = torch.sort(torch.rand(k - 1, generator=gen) * size).values
        dips = (torch.rand(k - 1, generator=gen) - 0.5) * 0.6
        values = torch.rand(k, generator=gen) * 2 - 1
        layer = torch.zeros(size, size, dtype=torch.long)
        for d, s in zip(depths, dips):
            layer = layer + (rows[0] >= d + s * cols[0]).long()
        out[i, 0] = values[layer]
    return out + texture * torch.randn(out.shape, generator=gen, dtype=out.dtype)


def blur(x: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Separable Gaussian blur with zero boundary (the forward operator :math:`k *`).

    >>> blur(torch.ones(1, 1, 9, 9))[0, 0, 4, 4].item() > 0.99
    True
    """
    r = int(math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = torch.nn.functional.conv2d(x, k.reshape(1, 1, -1, 1), padding=(r, 0))
    return torch.nn.functional.conv2d(x, k.reshape(1, 1, 1, -1), padding=(0, r))


def make_demo_data(path: str, n: int, size: int, seed: int = 0, chunk: int = 64) -> None:
    """Write ``n`` pairs ``x`` (truth) and ``y`` (observation) to an HDF5 file, chunk by chunk
    (atomically: the file appears complete or not at all). The attributes ``n``, ``size`` and
    ``seed`` let :func:`demo_data_matches` recognise it."""
    gen = torch.Generator().manual_seed(seed)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        dx = f.create_dataset("x", (n, 1, size, size), "f4", chunks=(min(chunk, n), 1, size, size))
        dy = f.create_dataset("y", (n, 1, size, size), "f4", chunks=(min(chunk, n), 1, size, size))
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            x = layered_images(b - a, size, gen)
            dx[a:b] = x.numpy()
            dy[a:b] = (blur(x) + NOISE * torch.randn(x.shape, generator=gen, dtype=x.dtype)).numpy()
        f.attrs["problem"] = f"deblurring: y = gaussian_blur(x, sigma=1.5) + {NOISE} * noise"
        f.attrs.update({"n": n, "size": size, "seed": seed})


def demo_data_matches(path: str, n: int, size: int, seed: int) -> bool:
    """Whether ``path`` holds the pairs :func:`make_demo_data` writes for these arguments.

    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "d.h5"); make_demo_data(p, 4, 8, seed=1)
    >>> demo_data_matches(p, 4, 8, 1), demo_data_matches(p, 4, 8, 2)
    (True, False)
    """
    try:
        with h5py.File(path, "r") as f:
            return all(f.attrs.get(k) == v for k, v in (("n", n), ("size", size), ("seed", seed)))
    except (OSError, ValueError):
        return False
