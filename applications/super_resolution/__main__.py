"""Train the super-resolution flow (SRFlow-style, README.md) through invnet's trainer.

    python -m applications.super_resolution                       # config.toml: photos, 4x
    python -m applications.super_resolution --config applications/super_resolution/config_fashion.toml
    python -m applications.super_resolution --steps 20 --out /tmp/sr --set model.steps=2   # smoke test
    python -m applications.super_resolution.evaluate RUN --out applications/super_resolution/results/NAME

Every step draws fresh training pairs (``[data] source = "applications.super_resolution.data:simulate"``:
augmented high-resolution images, their box-downsampled inputs, dequantisation noise) and
minimises the negative log-likelihood in bits per detail coefficient (``SRFlow.bits_per_dim``, the
trainer's default loss) with the config's optimizer, schedule and clipping. The validation loss is
measured on the fixed held-out images (``data.held_out_images``, never drawn in training). A
stopped run resumes when the same command is rerun; the run folder holds the checkpoints,
``metrics.jsonl`` and ``metrics.png``.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterator, Optional

import torch

from invnet.training.config import torch_dtype

from ..common import app_parser, load_app_config, run_main, train
from .checkpoints import SRFLOW_TYPE
from .data import check_arguments, held_out_images
from .degradation import downsample

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = "applications.super_resolution.data:simulate"


def check_config(cfg: dict) -> dict:
    """The simulator's arguments of a validated config, after checking that it trains this
    application's model on its simulator with one scale factor (``ValueError`` otherwise)."""
    if cfg["data"]["source"] != SOURCE:
        raise ValueError(f"this application draws its pairs from [data] source = {SOURCE!r}, got "
                         f"{cfg['data']['source'] or cfg['data']['path']!r}")
    if cfg["model"]["type"] != SRFLOW_TYPE:
        raise ValueError(f"this application trains [model] type = {SRFLOW_TYPE!r}, got {cfg['model']['type']!r} "
                         "(for invnet's networks on image pairs see invnet_train.toml)")
    arguments = dict(cfg["data"]["arguments"] or {})
    check_arguments(**arguments)
    data_factor, model_factor = arguments.get("factor", 4), cfg["model"].get("factor", 4)
    if data_factor != model_factor:
        raise ValueError(f"[data] arguments factor ({data_factor}) and [model] factor ({model_factor}) must agree")
    return arguments


def held_out_batches(arguments: dict, images: int, batch_size: int, dtype: torch.dtype) -> Any:
    """The validation batches ``(x, D x)`` of the first ``images`` held-out images (no
    dequantisation noise), as a callable for the trainer."""
    x = held_out_images(**arguments)[:images]
    y = downsample(x, arguments.get("factor", 4))
    pairs = [(x[i:i + batch_size].to(dtype), y[i:i + batch_size].to(dtype)) for i in range(0, len(x), batch_size)]

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(pairs)

    return batches


def main(argv: Optional[list[str]] = None) -> int:
    parser = app_parser("super_resolution", __doc__, os.path.join(HERE, "config.toml"))
    parser.add_argument("--validation-images", type=int, default=256,
                        help="held-out images in the validation loss (default 256; 0: no validation)")
    args = parser.parse_args(argv)
    if args.validation_images < 0:
        parser.error("--validation-images must be 0 or positive")
    cfg = load_app_config(args)
    arguments = check_config(cfg)
    validation = None
    if args.validation_images:
        validation = held_out_batches(arguments, args.validation_images, cfg["training"]["batch_size"],
                                      torch_dtype(cfg["training"]["precision"]))
    result = train(cfg, args, validation=validation)
    print(f"evaluate with: python -m applications.super_resolution.evaluate {cfg['training']['out_dir']} --out DIR")
    return 0 if result.status == "finished" else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
