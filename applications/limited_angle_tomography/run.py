"""Limited-angle tomography with an invertible learned iterative reconstruction (i-RIM).

Trains :class:`invnet.networks.LearnedLoop` on random-ellipse phantoms seen through a
120-degree arc of a parallel-beam Radon transform (a sparse matrix, see tomography.py), and
compares it on held-out phantoms and on the Shepp-Logan phantom with Tikhonov-regularised least
squares solved by conjugate gradients (regularisation weight and iteration count tuned on a
validation set). Writes results.json and PNG figures next to this file (or to --out).

    PYTHONPATH=$PWD python applications/limited_angle_tomography/run.py            # ~5 min, 2 cores
    PYTHONPATH=$PWD python applications/limited_angle_tomography/run.py --steps 50  # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pylops
import scipy.sparse
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tomography import operator_norm, radon_matrix, random_ellipses, tikhonov_cg, tikhonov_cg_iterates  # noqa: E402

import invnet  # noqa: E402
from invnet.core.checks import saved_bytes  # noqa: E402
from invnet.networks import LearnedLoop  # noqa: E402
from invnet.operators import adjoint_test, as_operator  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32, help="image side (pixels)")
    p.add_argument("--angles", type=int, default=30, help="number of projection angles")
    p.add_argument("--arc", type=float, default=120.0, help="angular range in degrees (180 = full)")
    p.add_argument("--noise", type=float, default=0.02, help="noise std relative to the data's RMS")
    p.add_argument("--iterations", type=int, default=5, help="unrolled i-RIM iterations")
    p.add_argument("--channels", type=int, default=6, help="state channels (1 estimate + memory)")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--steps", type=int, default=1200, help="training steps")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--test-images", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    a = p.parse_args()
    if a.size < 8 or a.angles < 1 or not 0 < a.arc <= 180 or a.steps < 1 or a.channels < 2:
        p.error("need size >= 8, angles >= 1, 0 < arc <= 180, steps >= 1, channels >= 2")
    return a


def write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def metrics(est: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    p = [peak_signal_noise_ratio(t, np.clip(e, 0, 1), data_range=1.0) for e, t in zip(est, truth)]
    s = [structural_similarity(t, np.clip(e, 0, 1), data_range=1.0) for e, t in zip(est, truth)]
    return float(np.mean(p)), float(np.mean(s))


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    n = args.size
    angles = np.linspace(0.0, args.arc, args.angles, endpoint=False)

    # --- the operator: a sparse Radon matrix scaled to norm 1, as a pylops operator over scipy ---
    t0 = time.time()
    a_coo = radon_matrix(n, angles)
    a_coo = a_coo * (1.0 / operator_norm(a_coo))
    rows, cols = a_coo.indices().numpy()
    a_csr = scipy.sparse.csr_matrix((a_coo.values().numpy(), (rows, cols)), shape=tuple(a_coo.shape))
    m = a_csr.shape[0]
    radon = pylops.MatrixMult(a_csr.astype(np.float32), dtype=np.float32)
    # the adjoint test runs in float64 through float32 products: tolerance to match
    op = as_operator(radon, domain_shape=(1, n, n), range_shape=(m,), tol=1e-5)
    adj_err = adjoint_test(op)
    fwd, adj = op.forward, op.adjoint
    print(f"Radon matrix {a_csr.shape}, {a_csr.nnz} nonzeros, built in {time.time() - t0:.1f}s; "
          f"adjoint test {adj_err:.1e}", flush=True)

    def observe(x: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        clean = fwd(torch.from_numpy(x).reshape(len(x), 1, n, n))
        rms = clean.pow(2).mean(1, keepdim=True).sqrt()
        return clean + args.noise * rms * torch.randn(clean.shape, generator=gen)

    gen = torch.Generator().manual_seed(args.seed + 1)
    train = random_ellipses(args.train_images, n, rng)
    val = random_ellipses(32, n, rng)
    test = random_ellipses(args.test_images, n, rng)
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    shepp = resize(shepp_logan_phantom(), (n, n), anti_aliasing=True).astype(np.float32)[None]
    y_val, y_test, y_shepp = observe(val, gen), observe(test, gen), observe(shepp, gen)

    # --- classical baseline: Tikhonov-CG, (lambda, iterations) tuned on the validation set ---
    best = None
    for lam in (0.0, 1e-3, 3e-3, 1e-2, 3e-2):
        for k, rec in enumerate(tikhonov_cg_iterates(fwd, adj, y_val, lam, 160), start=1):
            if k in (10, 20, 40, 80, 160):
                psnr, _ = metrics(rec[:, 0].numpy(), val)
                if best is None or psnr > best[0]:
                    best = (psnr, lam, k)
    _, lam, cg_iters = best
    print(f"Tikhonov-CG tuned on validation: lambda={lam}, iterations={cg_iters}", flush=True)

    def baseline(y):
        return tikhonov_cg(fwd, adj, y, lam, cg_iters)[:, 0].numpy()

    # --- the learned loop ---
    loop = LearnedLoop(op, channels=args.channels, iterations=args.iterations, hidden=args.hidden)
    optim = torch.optim.Adam(loop.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, args.steps)
    train_t = torch.from_numpy(train).reshape(-1, 1, n, n)
    losses = []
    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, len(train_t), (args.batch,), generator=gen)
        x = train_t[idx]
        y = observe(train[idx.numpy()], gen)
        loss = torch.mean((loop.reconstruct(y) - x) ** 2)
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(loop.parameters(), 1.0)
        optim.step()
        sched.step()
        losses.append(float(loss))
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  mse {np.mean(losses[-100:]):.5f}  ({time.time() - t0:.0f}s)", flush=True)
    train_seconds = time.time() - t0

    with torch.no_grad():
        learned_test = torch.cat([loop.reconstruct(y) for y in y_test.split(16)])[:, 0].numpy()
        learned_shepp = loop.reconstruct(y_shepp)[:, 0].numpy()
        # invertibility of the trained loop (float32), measured on a test batch
        s0 = loop.initial_state(y_test[:8])
        s_end, _ = loop(s0, y_test[:8])
        rec_err = float((loop.inverse(s_end, y_test[:8])[0] - s0).abs().max() / s_end.abs().max())
    base_test, base_shepp = baseline(y_test), baseline(y_shepp)
    adjoint_only = adj(y_test)[:, 0].numpy()

    # memory: bytes autograd keeps for one training forward, memory saving on vs off
    x_probe = loop.initial_state(y_test[: args.batch]).requires_grad_(True)
    mem = {}
    for saving in (True, False):
        with invnet.memory_saving(saving):
            mem["on" if saving else "off"] = saved_bytes(lambda: loop(x_probe, y_test[: args.batch]))

    results = {
        "setup": {
            "image": f"{n}x{n}", "angles": args.angles, "arc_degrees": args.arc, "noise_relative": args.noise,
            "operator": f"sparse Radon matrix {a_csr.shape} (pylops MatrixMult over scipy CSR), norm scaled to 1",
            "adjoint_test": adj_err,
            "iterations": args.iterations, "channels": args.channels, "hidden": args.hidden,
            "parameters": sum(p.numel() for p in loop.parameters()), "steps": args.steps, "batch": args.batch,
            "train_seconds": round(train_seconds, 1), "torch_threads": torch.get_num_threads(),
        },
        "tikhonov_cg": {"lambda": lam, "iterations": cg_iters},
        "held_out_ellipses": {
            "adjoint_A^T_y": dict(zip(("psnr", "ssim"), metrics(adjoint_only / max(adjoint_only.max(), 1e-12), test))),
            "tikhonov_cg": dict(zip(("psnr", "ssim"), metrics(base_test, test))),
            "learned_loop": dict(zip(("psnr", "ssim"), metrics(learned_test, test))),
            "images": len(test),
        },
        "shepp_logan": {
            "tikhonov_cg": dict(zip(("psnr", "ssim"), metrics(base_shepp, shepp))),
            "learned_loop": dict(zip(("psnr", "ssim"), metrics(learned_shepp, shepp))),
        },
        "trained_loop_reconstruction_error_float32": rec_err,
        "saved_bytes_one_forward": {"memory_saving_on": mem["on"], "memory_saving_off": mem["off"]},
    }
    write_json_atomic(args.out / "results.json", results)
    print(json.dumps(results, indent=2))
    make_figures(args.out, losses, test, base_test, learned_test, shepp, base_shepp, learned_shepp)


def make_figures(out, losses, test, base, learned, shepp, base_shepp, learned_shepp) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(test[i], base[i], learned[i]) for i in range(3)] + [(shepp[0], base_shepp[0], learned_shepp[0])]
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)))
    for r, (truth, tikhonov, irim) in enumerate(rows):
        for c, (img, name) in enumerate(((truth, "truth"), (tikhonov, "Tikhonov-CG"), (irim, "i-RIM LearnedLoop"))):
            ax = axes[r, c]
            ax.imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c:
                from skimage.metrics import peak_signal_noise_ratio

                name += f"\n{peak_signal_noise_ratio(truth, np.clip(img, 0, 1), data_range=1.0):.1f} dB"
            ax.set_title(name, fontsize=8)
    fig.tight_layout()
    _save(fig, out / "reconstructions.png")
    fig, ax = plt.subplots(figsize=(5, 3))
    smooth = np.convolve(losses, np.ones(20) / 20, mode="valid")
    ax.semilogy(smooth)
    ax.set_xlabel("training step")
    ax.set_ylabel("MSE (moving average)")
    fig.tight_layout()
    _save(fig, out / "training_loss.png")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
