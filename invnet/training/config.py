"""``invnet train`` configuration: TOML, validated key by key (see docs/config.md)."""
from __future__ import annotations

import inspect
import os
import sys
from typing import Any

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["load_config", "validate_config", "DEFAULTS"]

#: every fixed section, its keys and defaults (``None``: optional, no default; ``...``: required)
DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"path": ..., "x": "x", "y": "y", "validation_fraction": 0.1, "patch": None, "seed": 0,
             "max_read_mb": None},
    "training": {"out_dir": ..., "steps": ..., "batch_size": 16, "seed": 0, "clip_grad_norm": None,
                 "validate_every": None, "log_every": 10, "checkpoint_every_steps": None,
                 "checkpoint_every_minutes": None, "keep_last": 3, "progress": True, "dtype": "float32"},
}
#: sections whose extra keys are passed to a class (checked against its signature)
OPEN_SECTIONS = {"model": "type", "optimizer": "name", "scheduler": "name"}
_TYPES = {
    ("data", "path"): str, ("data", "x"): str, ("data", "y"): str, ("data", "validation_fraction"): (int, float),
    ("data", "patch"): list, ("data", "seed"): int, ("data", "max_read_mb"): (int, float),
    ("training", "out_dir"): str, ("training", "steps"): int, ("training", "batch_size"): int,
    ("training", "seed"): int, ("training", "clip_grad_norm"): (int, float), ("training", "validate_every"): int,
    ("training", "log_every"): int, ("training", "checkpoint_every_steps"): int,
    ("training", "checkpoint_every_minutes"): (int, float), ("training", "keep_last"): int,
    ("training", "progress"): bool, ("training", "dtype"): str,
}


def _class_kwargs(section: str, cls: type, kwargs: dict, skip: int) -> None:
    params = list(inspect.signature(cls.__init__).parameters.values())[1 + skip:]
    names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise ValueError(f"[{section}]: unknown key(s) {unknown} for {cls.__name__}; allowed: {names}")


def validate_config(cfg: dict, base_dir: str = ".") -> dict:
    """Check a parsed configuration and fill in defaults; relative paths are taken from
    ``base_dir`` (the config file's folder). Raises ``ValueError`` naming the allowed keys.

    >>> cfg = validate_config({"data": {"path": "d.h5"}, "training": {"out_dir": "run", "steps": 10},
    ...                        "model": {"type": "ConditionalCouplingFlow"}, "optimizer": {"name": "Adam", "lr": 1e-3}})
    >>> cfg["training"]["batch_size"], cfg["scheduler"]
    (16, None)
    >>> validate_config({"data": {"path": "d.h5", "bogus": 1}})
    Traceback (most recent call last):
    ...
    ValueError: [data]: unknown key(s) ['bogus']; allowed: ['path', 'x', 'y', 'validation_fraction', 'patch', 'seed', 'max_read_mb']
    """
    allowed = list(DEFAULTS) + list(OPEN_SECTIONS)
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; allowed sections: {allowed}")
    out: dict[str, Any] = {}
    for section, defaults in DEFAULTS.items():
        given = cfg.get(section, {})
        if not isinstance(given, dict):
            raise ValueError(f"[{section}] must be a table")
        bad = [k for k in given if k not in defaults]
        if bad:
            raise ValueError(f"[{section}]: unknown key(s) {sorted(bad)}; allowed: {list(defaults)}")
        merged = {}
        for key, default in defaults.items():
            if key not in given:
                if default is ...:
                    raise ValueError(f"[{section}] needs the key {key!r}")
                merged[key] = default
                continue
            value, want = given[key], _TYPES[(section, key)]
            if isinstance(value, bool) and want is not bool:
                raise ValueError(f"[{section}] {key} must be {want}, got a boolean")
            if not isinstance(value, want):
                raise ValueError(f"[{section}] {key} has the wrong type {type(value).__name__}; expected {want}")
            merged[key] = value
        out[section] = merged
    d, t = out["data"], out["training"]
    for key in ("path",):
        d[key] = os.path.normpath(os.path.join(base_dir, d[key]))
    t["out_dir"] = os.path.normpath(os.path.join(base_dir, t["out_dir"]))
    if not 0 <= d["validation_fraction"] < 1:
        raise ValueError(f"[data] validation_fraction must lie in [0, 1), got {d['validation_fraction']}")
    if d["patch"] is not None and not all(isinstance(p, int) and p > 0 for p in d["patch"]):
        raise ValueError(f"[data] patch must be a list of positive integers, got {d['patch']}")
    for key in ("steps", "batch_size", "log_every", "keep_last", "validate_every", "checkpoint_every_steps"):
        if t[key] is not None and t[key] < 1:
            raise ValueError(f"[training] {key} must be a positive integer, got {t[key]}")
    if t["dtype"] not in ("float32", "float64"):
        raise ValueError(f"[training] dtype must be 'float32' or 'float64', got {t['dtype']!r}")
    # open sections: a class name and its keyword arguments
    from .network_spec import available_networks

    model = dict(cfg.get("model", {"type": "ConditionalCouplingFlow"}))
    model.setdefault("type", "ConditionalCouplingFlow")
    if model["type"] not in available_networks():
        raise ValueError(f"[model] unknown type {model['type']!r}; available: {available_networks()}")
    out["model"] = model  # its keys are checked against the class once data shapes are known
    opt = dict(cfg.get("optimizer", {"name": "Adam", "lr": 1e-3}))
    opt.setdefault("name", "Adam")
    opt_cls = getattr(torch.optim, opt["name"], None)
    if not (isinstance(opt_cls, type) and issubclass(opt_cls, torch.optim.Optimizer)):
        names = sorted(n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
                       and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != "Optimizer")
        raise ValueError(f"[optimizer] unknown name {opt['name']!r}; any torch.optim optimizer: {names}")
    _class_kwargs("optimizer", opt_cls, {k: v for k, v in opt.items() if k != "name"}, skip=1)
    out["optimizer"] = opt
    sched = cfg.get("scheduler")
    if sched is not None:
        sched = dict(sched)
        if "name" not in sched:
            raise ValueError("[scheduler] needs a 'name' (a class of torch.optim.lr_scheduler)")
        sched_cls = getattr(torch.optim.lr_scheduler, sched["name"], None)
        if not (isinstance(sched_cls, type) and issubclass(sched_cls, torch.optim.lr_scheduler.LRScheduler)):
            raise ValueError(f"[scheduler] unknown name {sched['name']!r}; use a class of torch.optim.lr_scheduler "
                             "(e.g. CosineAnnealingLR, StepLR, ExponentialLR, OneCycleLR)")
        if sched["name"] in ("LambdaLR", "MultiplicativeLR", "SequentialLR", "ChainedScheduler", "ReduceLROnPlateau"):
            raise ValueError(f"[scheduler] {sched['name']} needs Python objects or a metric; not usable from a config")
        _class_kwargs("scheduler", sched_cls, {k: v for k, v in sched.items() if k != "name"}, skip=1)
    out["scheduler"] = sched
    return out


def load_config(path: str) -> dict:
    """Read and validate a TOML config file (paths in it are relative to the file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path, "rb") as f:
        try:
            cfg = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from None
    return validate_config(cfg, os.path.dirname(os.path.abspath(path)))
