"""Configuration of the super-resolution application: defaults, TOML loading, validation.

A config file has the tables ``[data]``, ``[model]``, ``[train]`` and ``[eval]``; missing keys take
the defaults below, unknown tables or keys are an error (a typo should not pass silently).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import tomllib

__all__ = ["DEFAULTS", "load_config", "merge_config"]

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        "source": "skimage",        # "skimage" (scikit-image sample images) or "fashion-mnist"
        "patch": 32,                # high-resolution patch size (skimage)
        "test_per_image": 64,       # test patches per held-out image (skimage)
        "limit": 0,                 # fashion-mnist: use only this many images per split (0: all)
    },
    "model": {
        "factor": 4, "steps": 8, "hidden": 64, "cond_features": 32,
        "encoder_hidden": 64, "encoder_layers": 3, "clamp": 1.0, "flow": "steps", "levels": 2,
        "injector": True,           # SRFlow's affine injector in every step (flow = "steps")
    },
    "train": {
        "batch": 64, "lr": 1e-3, "iterations": 3000, "minutes": 15.0, "seed": 0,
        "device": "cpu", "log_every": 100, "checkpoint": "runs/sr/model.pt", "grad_clip": 10.0,
    },
    "eval": {"samples": 16, "temperature": 1.0, "batch": 128},
}


def merge_config(overrides: Optional[dict] = None) -> dict:
    """The defaults updated with ``overrides`` (a dict of tables), validated.

    >>> merge_config({"model": {"factor": 8}})["model"]["factor"]
    8
    """
    cfg = copy.deepcopy(DEFAULTS)
    for table, values in (overrides or {}).items():
        if table not in cfg:
            raise ValueError(f"unknown config table [{table}]; expected one of {sorted(cfg)}")
        if not isinstance(values, dict):
            raise ValueError(f"config [{table}] must be a table, got {type(values).__name__}")
        for key, value in values.items():
            if key not in cfg[table]:
                raise ValueError(f"unknown key {key!r} in [{table}]; expected one of {sorted(cfg[table])}")
            cfg[table][key] = value
    if cfg["data"]["source"] not in ("skimage", "fashion-mnist"):
        raise ValueError(f"[data] source must be 'skimage' or 'fashion-mnist', got {cfg['data']['source']!r}")
    for table, key in (("train", "batch"), ("train", "iterations"), ("eval", "samples"), ("data", "patch")):
        if not isinstance(cfg[table][key], int) or cfg[table][key] < 1:
            raise ValueError(f"[{table}] {key} must be a positive integer, got {cfg[table][key]!r}")
    if cfg["data"]["source"] == "skimage" and cfg["data"]["patch"] % cfg["model"]["factor"]:
        raise ValueError(
            f"the scale factor {cfg['model']['factor']} must divide the patch size {cfg['data']['patch']}"
        )
    return cfg


def load_config(path: str | Path) -> dict:
    """Read a TOML config file and merge it with the defaults."""
    with open(path, "rb") as f:
        return merge_config(tomllib.load(f))
