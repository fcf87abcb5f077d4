"""The comparison of a trained learned loop with the classical baseline, and its figure.

On fixed held-out phantoms (never drawn in training: their seeds are not the trainer's) and on
the Shepp-Logan phantom (scikit-image, resized; out of the training distribution), with the same
geometry and noise as training:

* back-projection ``A^T y`` (rescaled to [0, 1]) as the floor;
* Tikhonov-regularised least squares ``(A^T A + lambda I) x = A^T y`` by conjugate gradients from
  zero, with ``lambda`` in {0, 1e-3, 3e-3, 1e-2, 3e-2} and 10-160 iterations chosen on 32
  validation phantoms;
* the learned loop;

scored by PSNR and SSIM (scikit-image, data range 1, estimates clipped to [0, 1]). Also measured:
the trained loop's invertibility in float32 (the state rebuilt from the final state, relative max
error) and the bytes autograd keeps for one training forward with memory saving on and off.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import invnet
from invnet.core.checks import saved_bytes
from invnet.data.atomic import atomic_path
from invnet.networks import LearnedLoop

from .problem import observe, radon_operator
from .tomography import random_ellipses, tikhonov_cg, tikhonov_cg_iterates

__all__ = ["image_metrics", "evaluate", "save_reconstructions"]

LAMBDAS = (0.0, 1e-3, 3e-3, 1e-2, 3e-2)
CG_ITERATIONS = (10, 20, 40, 80, 160)


def image_metrics(est: np.ndarray, truth: np.ndarray) -> dict:
    """Mean PSNR and SSIM over images ``(n, H, W)`` of ``est`` (clipped to [0, 1]) against ``truth``."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    p = [peak_signal_noise_ratio(t, np.clip(e, 0, 1), data_range=1.0) for e, t in zip(est, truth)]
    s = [structural_similarity(t, np.clip(e, 0, 1), data_range=1.0) for e, t in zip(est, truth)]
    return {"psnr": float(np.mean(p)), "ssim": float(np.mean(s))}


def _shepp_logan(size: int) -> np.ndarray:
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    return resize(shepp_logan_phantom(), (size, size), anti_aliasing=True).astype(np.float32)[None]


@torch.no_grad()
def _tune_tikhonov(fwd, adj, y_val: torch.Tensor, val: np.ndarray) -> tuple[float, int]:
    best = None
    for lam in LAMBDAS:
        for k, rec in enumerate(tikhonov_cg_iterates(fwd, adj, y_val, lam, max(CG_ITERATIONS)), start=1):
            if k in CG_ITERATIONS:
                psnr = image_metrics(rec[:, 0].numpy(), val)["psnr"]
                if best is None or psnr > best[0]:
                    best = (psnr, lam, k)
    return best[1], best[2]


def evaluate(loop: LearnedLoop, size: int = 32, angles: int = 30, arc: float = 120.0, noise: float = 0.02,
             images: int = 64, seed: int = 0, probe_batch: int = 8) -> tuple[dict, dict]:
    """Compare ``loop`` with the baselines on ``images`` held-out phantoms and Shepp-Logan (the
    module docstring); returns ``(results, panels)``, the panels for :func:`save_reconstructions`."""
    op = radon_operator(size, angles, arc)
    fwd, adj = op.forward, op.adjoint
    rng = np.random.default_rng([seed, 7])  # not a seed of the trainer's streams
    gen = torch.Generator().manual_seed(seed + 7)
    val, test, shepp = random_ellipses(32, size, rng), random_ellipses(images, size, rng), _shepp_logan(size)

    def sinograms(a: np.ndarray) -> torch.Tensor:
        return observe(torch.from_numpy(a)[:, None], gen, noise, size, angles, arc)

    y_val, y_test, y_shepp = sinograms(val), sinograms(test), sinograms(shepp)
    lam, cg_iters = _tune_tikhonov(fwd, adj, y_val, val)
    loop.eval()
    with torch.no_grad():
        learned_test = torch.cat([loop.reconstruct(y) for y in y_test.split(16)])[:, 0].numpy()
        learned_shepp = loop.reconstruct(y_shepp)[:, 0].numpy()
        s0 = loop.initial_state(y_test[:probe_batch])
        s_end, _ = loop(s0, y_test[:probe_batch])
        rebuild_error = float((loop.inverse(s_end, y_test[:probe_batch])[0] - s0).abs().max() / s_end.abs().max())
        base_test = tikhonov_cg(fwd, adj, y_test, lam, cg_iters)[:, 0].numpy()
        base_shepp = tikhonov_cg(fwd, adj, y_shepp, lam, cg_iters)[:, 0].numpy()
        back_projection = adj(y_test)[:, 0].numpy()
    x_probe = loop.initial_state(y_test[:probe_batch]).requires_grad_(True)
    kept = {}
    for saving in (True, False):
        with invnet.memory_saving(saving):
            kept["memory_saving_on" if saving else "memory_saving_off"] = saved_bytes(
                lambda: loop(x_probe, y_test[:probe_batch]))
    results = {
        "setup": {"image": f"{size}x{size}", "angles": angles, "arc_degrees": arc, "noise_relative": noise,
                  "operator": f"sparse Radon matrix {op.range_shape + (size * size,)} (pylops MatrixMult over scipy "
                              "CSR), norm scaled to 1",
                  "parameters": sum(p.numel() for p in loop.parameters()), "iterations": loop.iterations},
        "tikhonov_cg": {"lambda": lam, "iterations": cg_iters},
        "held_out_ellipses": {
            "adjoint_A^T_y": image_metrics(back_projection / max(float(back_projection.max()), 1e-12), test),
            "tikhonov_cg": image_metrics(base_test, test),
            "learned_loop": image_metrics(learned_test, test),
            "images": len(test),
        },
        "shepp_logan": {"tikhonov_cg": image_metrics(base_shepp, shepp),
                        "learned_loop": image_metrics(learned_shepp, shepp)},
        "trained_loop_reconstruction_error_float32": rebuild_error,
        "saved_bytes_one_forward": kept,
    }
    panels = {"rows": [(test[i], base_test[i], learned_test[i]) for i in range(min(3, len(test)))]
              + [(shepp[0], base_shepp[0], learned_shepp[0])]}
    return results, panels


def save_reconstructions(path: str | Path, panels: dict) -> None:
    """The figure: truth, Tikhonov-CG and the learned loop (with PSNR) for a few held-out phantoms
    and Shepp-Logan; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.metrics import peak_signal_noise_ratio

    rows = panels["rows"]
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for r, (truth, base, learned) in enumerate(rows):
        for c, (img, name) in enumerate(((truth, "truth"), (base, "Tikhonov-CG"), (learned, "i-RIM LearnedLoop"))):
            ax = axes[r, c]
            ax.imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c:
                name += f"\n{peak_signal_noise_ratio(truth, np.clip(img, 0, 1), data_range=1.0):.1f} dB"
            ax.set_title(name, fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(str(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
