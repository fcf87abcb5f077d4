"""Draw several high-resolution candidates for a low-resolution image with a trained flow.

    python -m applications.super_resolution.sample applications/super_resolution/runs/skimage_x4 \
        --skimage camera --n 8 --temperature 0.8 --tile 32 --overlap 4 --out out/camera [--device cuda]
    python -m applications.super_resolution.sample applications/super_resolution/runs/skimage_x4 --lr small.png ...

The input is either a low-resolution image file (``--lr``, grey levels are used) or a
high-resolution one (``--hr`` file or ``--skimage`` name) that is first downscaled with the
degradation operator (then the truth is known and PSNR/LR consistency are printed). Images are
cropped to a multiple of the scale factor and processed in overlapping tiles of ``--tile``
low-resolution pixels (the whole image at once when it fits in one tile). Writes
``sample_K.png``, ``mean.png``, ``std.png``, ``bicubic.png`` and ``input.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..common import run_main
from .checkpoints import load_run
from .data import load_skimage
from .degradation import bicubic_upsample, downsample
from .evaluate import write_atomically
from .metrics import lr_consistency, psnr
from .model import SRFlow
from .tiles import sample_tiled

__all__ = ["read_grey", "write_png", "main"]


def read_grey(path: str | Path) -> torch.Tensor:
    """Read an image file as a grey-level tensor ``(1, 1, H, W)`` in ``[0, 1]``."""
    from skimage.color import rgb2gray
    from skimage.io import imread
    from skimage.util import img_as_float

    a = img_as_float(imread(path))
    if a.ndim == 3:
        a = rgb2gray(a[..., :3])
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]


def write_png(path: Path, img: torch.Tensor, normalise: bool = False) -> None:
    """Write a ``(H, W)`` tensor as an 8-bit PNG (clipped to ``[0, 1]``, or scaled to its range)."""
    from PIL import Image

    a = img.detach().cpu().double().numpy()
    if normalise:
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
    u8 = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    write_atomically(path, lambda tmp: Image.fromarray(u8).save(tmp, format="PNG"))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m applications.super_resolution.sample",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run folder (its latest checkpoint) or one checkpoint of SRFlow")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--lr", help="low-resolution image file to upscale")
    src.add_argument("--hr", help="high-resolution image file: downscale it, then upscale (truth known)")
    src.add_argument("--skimage", help="a scikit-image sample image name, used like --hr")
    parser.add_argument("--n", type=int, default=8, help="number of candidates")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--tile", type=int, default=64, help="tile size in low-resolution pixels")
    parser.add_argument("--overlap", type=int, default=8, help="tile overlap in low-resolution pixels")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/sr")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be positive, got {args.n}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be positive, got {args.temperature}")
    model, _ = load_run(args.run, args.device)
    if not isinstance(model, SRFlow):
        raise ValueError(f"{args.run}: tiled sampling needs this application's SRFlow (its spatial latent), not a "
                         f"{type(model).__name__}")
    f = model.factor
    truth = None
    # a multiscale ("glow") flow needs low-resolution sizes divisible by 2**levels
    m = 2 ** model.hparams["levels"] if model.hparams["flow"] == "glow" else 1
    if args.lr:
        y = read_grey(args.lr)
        y = y[..., : y.shape[2] // m * m, : y.shape[3] // m * m]
    else:
        x = read_grey(args.hr) if args.hr else load_skimage([args.skimage])[0][None]
        x = x[..., : x.shape[2] // (f * m) * f * m, : x.shape[3] // (f * m) * f * m]
        truth = x.to(args.device)
        y = downsample(x, f)
    y = y.to(args.device)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    s = sample_tiled(model, y, n=args.n, temperature=args.temperature, tile=args.tile, overlap=args.overlap,
                     generator=g)
    out = Path(args.out)
    for k in range(args.n):
        write_png(out / f"sample_{k}.png", s[k, 0, 0])
    mean = s.mean(0)
    write_png(out / "mean.png", mean[0, 0])
    if args.n > 1:
        write_png(out / "std.png", s.std(0)[0, 0], normalise=True)
    bic = bicubic_upsample(y, f)
    write_png(out / "bicubic.png", bic[0, 0])
    write_png(out / "input.png", y[0, 0])
    print(f"{args.n} candidates of size {tuple(s.shape[-2:])} in {out}")
    print(f"LR consistency of sample 0: {float(lr_consistency(s[0], y, f)[0]):.1f} dB")
    if truth is not None:
        print(f"PSNR: bicubic {float(psnr(bic, truth)[0]):.2f} dB, "
              f"posterior mean {float(psnr(mean, truth)[0]):.2f} dB, "
              f"sample 0 {float(psnr(s[0], truth)[0]):.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
