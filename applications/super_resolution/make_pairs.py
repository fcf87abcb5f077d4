"""Write (high-resolution, low-resolution) pairs to HDF5 for ``invnet train``.

    python -m applications.super_resolution.make_pairs runs/sr/pairs.h5 --n 20000
    invnet train applications/super_resolution/invnet_train.toml

``x`` holds ``n`` random augmented patches of the training images (the same patches as the
application's simulator), ``y = downsample(x, factor)`` with the box operator of ``degradation.py``. The
generic trainer then fits ``invnet.networks.ConditionalGlow`` with an ``ImageSummary`` of ``y``
(the SRFlow layout: a flow on the whole high-resolution image; LR consistency is learned, not built
in as in ``model.py``). The file is written to a temporary name and renamed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import h5py
import torch

from invnet.data.atomic import atomic_path

from ..common import run_main
from .data import TRAIN_IMAGES, PatchSampler, load_skimage
from .degradation import check_factor, downsample

__all__ = ["write_pairs", "main"]


def write_pairs(path: str | Path, n: int, patch: int = 32, factor: int = 4, seed: int = 0, chunk: int = 1024) -> None:
    """Write ``n`` pairs ``x`` ``(n, 1, patch, patch)`` and ``y`` ``(n, 1, patch/factor, patch/factor)``
    (float32) to the HDF5 file ``path``, atomically."""
    check_factor(factor)
    if n < 1:
        raise ValueError(f"n must be a positive number of pairs, got {n}")
    if patch % factor:
        raise ValueError(f"the scale factor {factor} must divide the patch size {patch}")
    sampler = PatchSampler(load_skimage(TRAIN_IMAGES), patch, seed=seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(str(path)) as tmp, h5py.File(tmp, "w") as f:
        dx = f.create_dataset("x", (n, 1, patch, patch), dtype="float32", chunks=(min(n, 256), 1, patch, patch))
        dy = f.create_dataset("y", (n, 1, patch // factor, patch // factor), dtype="float32")
        for start in range(0, n, chunk):
            x = sampler.sample(min(chunk, n - start))
            dx[start:start + len(x)] = x.numpy()
            dy[start:start + len(x)] = downsample(x, factor).numpy()
        f.attrs["operator"] = f"box average, factor {factor}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path")
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    write_pairs(args.path, args.n, args.patch, args.factor, args.seed)
    print(f"wrote {args.n} pairs to {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
