"""Train the super-resolution flow by maximum likelihood with a plain loop over invnet's API.

    PYTHONPATH=$PWD python -m applications.super_resolution.train \
        applications/super_resolution/config.toml [--device cuda] [--minutes 15]

Each step draws a batch of high-resolution patches, makes their low-resolution inputs with the
degradation operator, adds uniform dequantisation noise (the images are 8-bit) to the
high-resolution side and minimises the negative log-likelihood in bits per dimension with Adam
(cosine learning-rate decay over the step budget or the time budget, whichever runs out first;
gradient clipping). The flow runs with invnet's memory-free backward.
The checkpoint (weights, model sizes and the config) is written atomically.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import load_config, merge_config
from .data import TEST_IMAGES, TRAIN_IMAGES, PatchSampler, fixed_patches, load_fashion_mnist, load_skimage
from .degradation import downsample
from .model import SRFlow

__all__ = ["build_data", "build_model", "train", "save_checkpoint", "load_checkpoint", "main"]


def _pad_to_multiple(x: Tensor, m: int) -> Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]) if (ph or pw) else x


def build_data(cfg: dict) -> tuple[Callable[[int], Tensor], Tensor]:
    """``(draw, test)``: ``draw(batch)`` gives a training batch of high-resolution images, ``test``
    the fixed held-out images (never drawn in training)."""
    data, factor, seed = cfg["data"], cfg["model"]["factor"], cfg["train"]["seed"]
    if data["source"] == "skimage":
        sampler = PatchSampler(load_skimage(TRAIN_IMAGES), data["patch"], seed=seed)
        test = fixed_patches(load_skimage(TEST_IMAGES), data["patch"], data["test_per_image"], seed=seed + 1)
        return sampler.sample, test
    limit = data["limit"] or None
    train_x = _pad_to_multiple(load_fashion_mnist("train", limit=limit), factor)
    test = _pad_to_multiple(load_fashion_mnist("test", limit=limit or 1024), factor)
    g = torch.Generator().manual_seed(seed)

    def draw(batch: int) -> Tensor:
        idx = torch.randint(train_x.shape[0], (batch,), generator=g)
        x = train_x[idx]
        flip = torch.rand(batch, generator=g) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    return draw, test


def build_model(cfg: dict) -> SRFlow:
    """The flow described by ``cfg["model"]`` (grey-level images)."""
    return SRFlow(channels=1, **cfg["model"])


def save_checkpoint(path: str | Path, model: SRFlow, cfg: dict, extra: Optional[dict] = None) -> None:
    """Write weights, model sizes and config to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"hparams": model.hparams, "state_dict": model.state_dict(), "config": cfg, "extra": extra or {}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[SRFlow, dict]:
    """Rebuild the model from a checkpoint written by :func:`save_checkpoint` (``weights_only``)."""
    state = torch.load(path, map_location=device, weights_only=True)
    hparams = {"injector": False, **state["hparams"]}  # checkpoints from before the injector
    model = SRFlow(**hparams).to(device)
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model, state["config"]


def train(cfg: dict, log: Callable[[str], None] = print) -> tuple[SRFlow, list[dict]]:
    """Train a model as ``cfg`` says; returns it and the logged history (step, loss, seconds).
    Stops after ``iterations`` steps or ``minutes`` of wall time, whichever comes first."""
    tc = cfg["train"]
    device = torch.device(tc["device"])
    torch.manual_seed(tc["seed"])
    draw, test = build_data(cfg)
    model = build_model(cfg).to(device)
    factor = model.factor
    opt = torch.optim.Adam(model.parameters(), lr=tc["lr"])
    total = tc["iterations"]
    budget_s = 60.0 * tc["minutes"]
    noise = torch.Generator().manual_seed(tc["seed"] + 7)
    test_x = test[: min(len(test), 256)].to(device)
    test_y = downsample(test_x, factor)
    history: list[dict] = []
    start = time.perf_counter()
    running = 0.0
    for step in range(1, total + 1):
        x = draw(tc["batch"])
        y = downsample(x, factor)
        x_deq = x + (torch.rand(x.shape, generator=noise) - 0.5) / 256.0
        loss = model.bits_per_dim(x_deq.to(device), y.to(device)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        opt.step()
        running += float(loss.detach())
        elapsed = time.perf_counter() - start
        out_of_time = elapsed > budget_s
        # cosine decay over whichever budget runs out first (steps or wall time), so a run cut
        # short by its time limit still ends at a small learning rate
        progress = min(1.0, max(step / total, elapsed / budget_s))
        for group in opt.param_groups:
            group["lr"] = tc["lr"] * 0.5 * (1 + math.cos(math.pi * progress))
        if step % tc["log_every"] == 0 or step == total or out_of_time:
            with torch.no_grad():
                test_bpd = float(model.bits_per_dim(test_x, test_y).mean())
            k = step % tc["log_every"] or tc["log_every"]
            entry = {"step": step, "train_bpd": running / k, "test_bpd": test_bpd, "seconds": elapsed}
            history.append(entry)
            running = 0.0
            log(f"step {step:5d}  train {entry['train_bpd']:.4f}  test {test_bpd:.4f} bits/dim  {elapsed:6.0f} s")
        if out_of_time:
            log(f"time limit of {tc['minutes']} minutes reached after {step} steps")
            break
    model.eval()
    return model, history


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", help="TOML config (defaults when omitted)")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (overrides [train] device)")
    parser.add_argument("--minutes", type=float, help="wall-time limit (overrides [train] minutes)")
    parser.add_argument("--iterations", type=int, help="number of steps (overrides [train] iterations)")
    parser.add_argument("--checkpoint", help="where to write the model (overrides [train] checkpoint)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config) if args.config else merge_config()
    overrides = {"device": args.device, "minutes": args.minutes, "iterations": args.iterations,
                 "checkpoint": args.checkpoint}
    cfg = merge_config({**cfg, "train": {**cfg["train"], **{k: v for k, v in overrides.items() if v is not None}}})
    model, history = train(cfg, log=lambda s: print(s, flush=True))
    save_checkpoint(cfg["train"]["checkpoint"], model, cfg, {"history": history})
    print(f"saved {cfg['train']['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
