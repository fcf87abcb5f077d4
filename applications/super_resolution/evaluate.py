"""Evaluate a trained super-resolution flow on held-out images against bicubic upsampling.

    python -m applications.super_resolution.evaluate applications/super_resolution/runs/skimage_x4 \
        --out applications/super_resolution/results/skimage [--device cuda]
    python -m applications.super_resolution.evaluate runs/sr/invnet_train \
        --out applications/super_resolution/results/invnet_train   # a run of `invnet train` on pairs

RUN is a run folder (its latest checkpoint) or one checkpoint of it; the held-out images are those
of the run's ``[data] arguments`` (:func:`~.data.held_out_images`).

Writes ``metrics.json`` and ``metrics.md`` (a table), ``patches.png`` (input, bicubic, three
samples, posterior mean, per-pixel std, truth for a few test patches) and ``large.png`` (a
held-out image crop super-resolved in overlapping tiles), all atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from invnet.data.atomic import atomic_path

from ..common import run_main
from .checkpoints import InvnetTrainModel, load_run
from .data import TEST_IMAGES, held_out_images, load_skimage
from .degradation import bicubic_upsample, downsample, project_consistent
from .metrics import diversity, lr_consistency, psnr, ssim
from .model import SRFlow
from .tiles import sample_tiled

__all__ = ["evaluate", "save_figure", "main"]


def _summary(values: Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("inf")


def _batched_samples(model: SRFlow, y: Tensor, n: int, temperature: float, batch: int, generator) -> Tensor:
    parts = [model.sample(y[i:i + batch], n, temperature, generator) for i in range(0, len(y), batch)]
    return torch.cat(parts, dim=1)


def evaluate(
    model: SRFlow, x: Tensor, samples: int = 16, temperature: float = 1.0, batch: int = 128, seed: int = 0
) -> tuple[dict, dict]:
    """Metrics of bicubic, LR-consistent bicubic, the posterior mean (of ``samples`` samples) and
    single samples on the high-resolution test images ``x``; returns ``(metrics, images)``, where
    ``images`` holds the tensors used for the figures."""
    device = next(model.parameters()).device
    f = model.factor
    x = x.to(device)
    y = downsample(x, f)
    g = torch.Generator(device=device).manual_seed(seed)
    bic = bicubic_upsample(y, f)
    bic_c = project_consistent(bic, y, f)
    s = _batched_samples(model, y, samples, temperature, batch, g)
    mean = s.mean(0)
    s_low = _batched_samples(model, y, 2, 0.8, batch, g) if temperature != 0.8 else s[:2]
    bpd = None
    if hasattr(model, "bits_per_dim"):  # models from `invnet train` have a density over whole images
        with torch.no_grad():
            bpd = torch.cat([model.bits_per_dim(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)])

    def row(est: Tensor) -> dict:
        return {
            "psnr": _summary(psnr(est, x)), "ssim": _summary(ssim(est.clamp(0, 1), x)),
            "lr_consistency": _summary(lr_consistency(est, y, f)),
        }

    metrics = {
        "images": int(len(x)), "factor": f, "samples": samples, "temperature": temperature,
        "test_bits_per_dim": None if bpd is None else float(bpd.mean()),
        "bicubic": row(bic),
        "bicubic_consistent": row(bic_c),
        "posterior_mean": row(mean),
        "single_sample": row(s[0]),
        "single_sample_T0.8": row(s_low[0]),
        "diversity": float(diversity(s).mean()),
        # calibration: for a calibrated sampler E|s - x|^2 = 2 E|mean - x|^2 (3 dB)
        "mean_minus_sample_db": _summary(psnr(mean, x)) - _summary(psnr(s[0], x)),
    }
    images = {"lr": y, "bicubic": bic, "samples": s[:3], "mean": mean, "std": s.std(0), "truth": x}
    return metrics, images


def write_atomically(path: str | Path, write: Callable[[str], None]) -> None:
    """Create ``path``'s folder and call ``write(tmp)`` on a temporary name beside it, then rename
    it into place (:func:`invnet.data.atomic.atomic_path`): a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(str(path)) as tmp:
        write(tmp)


def save_figure(path: str | Path, images: dict, rows: int = 4, factor: int = 4) -> None:
    """A grid figure: one row per image, columns input (LR, shown enlarged by pixel replication),
    bicubic, three samples, posterior mean, per-pixel std (own colour scale), truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["input (LR)", "bicubic", "sample 1", "sample 2", "sample 3", "posterior mean", "std", "truth"]
    rows = min(rows, images["truth"].shape[0])
    fig, axes = plt.subplots(rows, len(cols), figsize=(1.6 * len(cols), 1.7 * rows), squeeze=False)
    for r in range(rows):
        panels = [images["lr"][r], images["bicubic"][r]] + [images["samples"][k][r] for k in range(3)]
        panels += [images["mean"][r], images["std"][r], images["truth"][r]]
        for k, (ax, img) in enumerate(zip(axes[r], panels)):
            a = img[0].detach().cpu().numpy()
            if cols[k] == "std":
                ax.imshow(a, cmap="magma", interpolation="nearest")
            else:
                ax.imshow(np.clip(a, 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[k], fontsize=8)
    fig.tight_layout()
    write_atomically(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _markdown(m: dict) -> str:
    lines = [
        f"{m['images']} held-out patches, {m['factor']}x, "
        f"posterior mean of {m['samples']} samples at T={m['temperature']}"
        + ("" if m["test_bits_per_dim"] is None else f"; test NLL {m['test_bits_per_dim']:.3f} bits/dim"),
        "",
        "| estimate | PSNR (dB) | SSIM | LR consistency (dB) |",
        "|---|---|---|---|",
    ]
    for key, label in (("bicubic", "bicubic"), ("bicubic_consistent", "bicubic + LR projection"),
                       ("posterior_mean", "flow: posterior mean"),
                       ("single_sample", f"flow: one sample, T={m['temperature']}"),
                       ("single_sample_T0.8", "flow: one sample, T=0.8")):
        if key == "single_sample_T0.8" and m["temperature"] == 0.8:
            continue  # the row above already is at T=0.8
        r = m[key]
        lines.append(f"| {label} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['lr_consistency']:.1f} |")
    lines += ["", f"sample diversity (mean per-pixel std): {m['diversity']:.4f}; "
              f"posterior mean minus single sample: {m['mean_minus_sample_db']:.2f} dB (3 dB if calibrated)"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m applications.super_resolution.evaluate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run folder (its latest checkpoint) or one checkpoint")
    parser.add_argument("--out", default="applications/super_resolution/results")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=16, help="samples per input for the posterior mean")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--batch", type=int, default=128, help="inputs sampled at once")
    parser.add_argument("--images", type=int, default=0, help="evaluate on the first N held-out images only (0: all)")
    parser.add_argument("--tile", type=int, default=16, help="tile size (LR pixels) for the large image")
    parser.add_argument("--overlap", type=int, default=4, help="tile overlap (LR pixels)")
    args = parser.parse_args(argv)
    if args.samples < 2 or args.batch < 1 or args.images < 0 or not args.temperature > 0:
        parser.error("need --samples >= 2, --batch >= 1, --images >= 0 and a positive --temperature")
    model, data_arguments = load_run(args.run, args.device)
    test = held_out_images(**data_arguments)
    if args.images:
        test = test[: args.images]
    metrics, images = evaluate(model, test, args.samples, args.temperature, args.batch)
    out = Path(args.out)
    large = None
    if isinstance(model, InvnetTrainModel):
        # a whole-image flow: no tiled decoding (that needs the spatial latent of model.py)
        metrics["checkpoint"] = {"path": model.path, "step": model.step, "trained_by": "invnet train"}
    else:
        large = _tiled_example(model, data_arguments["source"], test, args.samples, args.temperature, args)
        metrics["large_tiled"] = large.pop("metrics")
    write_atomically(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    write_atomically(out / "metrics.md", lambda tmp: Path(tmp).write_text(_markdown(metrics)))
    save_figure(out / "patches.png", images, rows=4, factor=model.factor)
    print(_markdown(metrics))
    if large is not None:
        save_figure(out / "large.png", large, rows=1, factor=model.factor)
        print(json.dumps(metrics["large_tiled"]))
    return 0


def _tiled_example(model: SRFlow, source: str, test: Tensor, samples: int, temperature: float, args) -> dict:
    """A held-out image crop (photos) or a 4x4 mosaic of test images, super-resolved in overlapping
    tiles: the figure's panels, plus its metrics under ``"metrics"``."""
    f = model.factor
    if source == "skimage":
        name = TEST_IMAGES[0]
        crop = load_skimage([name])[0][None, :, 96:96 + 32 * f, 160:160 + 32 * f].to(args.device)
    else:
        name = "mosaic of 16 test images"
        tiles16 = test[:16]
        rows = [torch.cat(list(tiles16[4 * r:4 * r + 4]), dim=2) for r in range(4)]
        crop = torch.cat(rows, dim=1)[None].to(args.device)
    y = downsample(crop, f)
    g = torch.Generator(device=args.device).manual_seed(1)
    s = sample_tiled(model, y, n=samples, temperature=temperature, tile=args.tile, overlap=args.overlap, generator=g)
    large = {"lr": y, "bicubic": bicubic_upsample(y, f), "samples": s[:3], "mean": s.mean(0), "std": s.std(0),
             "truth": crop}
    large["metrics"] = {
        "image": name, "size": list(crop.shape[2:]), "tile": args.tile, "overlap": args.overlap,
        "bicubic_psnr": float(psnr(large["bicubic"], crop)[0]), "mean_psnr": float(psnr(large["mean"], crop)[0]),
        "sample_psnr": float(psnr(s[0], crop)[0]), "lr_consistency": float(lr_consistency(s[0], y, f)[0]),
    }
    return large


if __name__ == "__main__":
    sys.exit(run_main(main))
