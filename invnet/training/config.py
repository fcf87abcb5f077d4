"""``invnet train`` configuration: TOML, validated key by key (see docs/config.md).

Every section is described once, typed: the fixed sections in :data:`SECTIONS` (one
:class:`~invnet.training.schema.Key` per line), the sections that name a class in
:data:`OPEN_SECTIONS` (their keys are checked against the class's signature by
:func:`~invnet.training.schema.check_keywords`). The same descriptions decide which keys may
change when a run is resumed (:func:`resume_differences`).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from .precision import PRECISIONS, Precision
from .schema import (
    REQUIRED,
    Key,
    check_keywords,
    check_section,
    constructor_parameters,
    fraction,
    nonempty,
    nonnegative,
    one_of,
    positive,
    positive_integers,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["load_config", "validate_config", "resume_differences", "SECTIONS", "OPEN_SECTIONS", "RENAMED",
           "torch_dtype"]


def _grid(v: Any) -> Optional[str]:
    return None if v and all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in v) else \
        "a list [batch_ranks, p_1, ..., p_d] of positive integers (one rank count per space axis of x)"


def _entry_point(v: Any) -> Optional[str]:
    return None if v.count(":") == 1 and all(v.split(":")) else 'an entry point "package.module:name"'


def _byte_count(v: Any) -> Optional[str]:
    from ..core.budget import parse_bytes

    try:
        parse_bytes(v)
    except ValueError:
        return "a byte count such as \"2GB\", \"512MiB\", 1e9, 0 or \"unlimited\""
    return None


def _device(v: Any) -> Optional[str]:
    from .device import check_device_name

    return check_device_name(v)

#: the fixed sections, one line per key: Key(type, default (REQUIRED / None: unset), check, resume=may change)
SECTIONS: dict[str, dict[str, Key]] = {
    "data": {  # a file of pairs (path) or a simulator drawing fresh pairs every step (source)
        "path": Key(str, None, nonempty, resume=True),  # the file may move; its shapes are checked on resume
        "source": Key(str, None, _entry_point),  # "package.module:function" (invnet.data.simulated)
        "arguments": Key(dict, None),  # keyword arguments of the simulator
        "validation_size": Key(int, 0, nonnegative, resume=True),  # simulated validation pairs (fixed)
        "x": Key(str, "x", nonempty),
        "y": Key(str, "y", nonempty),
        "validation_fraction": Key(float, 0.1, fraction),
        "patch": Key(list[int], None, positive_integers),
        "seed": Key(int, 0),
        "max_read_mb": Key(float, None, positive, resume=True),
    },
    "training": {
        "out_dir": Key(str, REQUIRED, nonempty, resume=True),
        "steps": Key(int, REQUIRED, positive, resume=True),
        "batch_size": Key(int, 16, positive),
        "seed": Key(int, 0),
        "clip_grad_norm": Key(float, None, positive),
        "validate_every": Key(int, None, positive, resume=True),  # unset: once per epoch (docs/config.md)
        "patience": Key(int, 20, nonnegative, resume=True),  # validations without a better loss; 0: never stop
        "min_delta": Key(float, 0.0, nonnegative, resume=True),  # how much lower counts as better
        "log_every": Key(int, 10, positive, resume=True),
        "checkpoint_every_steps": Key(int, None, positive, resume=True),
        "checkpoint_every_minutes": Key(float, None, positive, resume=True),
        "keep_last": Key(int, 3, positive, resume=True),
        "progress": Key(bool, True, resume=True),
        "device": Key(str, "auto", _device, resume=True),  # a run moves between devices freely
        "precision": Key(str, "float32", one_of(*PRECISIONS), resume=True),  # e.g. float32 after drift in bfloat16
        # activations kept instead of recomputed (invnet.memory_budget)
        "memory_budget": Key(Union[str, float], None, _byte_count, resume=True),
        "drift_check_every": Key(int, None, positive, resume=True),
        "drift_warn_above": Key(float, 1e-4, positive, resume=True),
        "drift_fail_above": Key(float, 1e-2, positive, resume=True),
        "loss": Key(str, None, _entry_point),  # loss_fn(model, batch) -> per-sample losses; default: bits/dim
    },
    "distributed": {
        "grid": Key(list[int], None, _grid, resume=True),  # the batch groups are checked on resume (global batch)
        "backend": Key(str, "auto", one_of("auto", "mpi", "nccl", "gloo"), resume=True),
    },
}

#: keys an older invnet wrote under another name: section -> {old: new}; read as the new one
RENAMED = {"training": {"dtype": "precision"}}


def _renamed(section: str, table: Any, strict: bool) -> Any:
    """``table`` with the old key names of :data:`RENAMED` replaced (``strict``: giving both the old
    and the new name is an error; else the new one wins)."""
    if not isinstance(table, dict):
        return table
    table = dict(table)
    for old, new in RENAMED.get(section, {}).items():
        if old in table:
            if new in table and strict:
                raise ValueError(f"[{section}] gives both {old!r} (its older name) and {new!r}; keep only {new!r}")
            value = table.pop(old)
            table.setdefault(new, value)
    return table


def torch_dtype(precision: str) -> torch.dtype:
    """The dtype of the parameters and data of a run in ``precision`` (also an older ``dtype``
    name: ``float32``, ``float64``).

    >>> torch_dtype("float64"), torch_dtype("bfloat16")
    (torch.float64, torch.float32)
    """
    return Precision(precision).parameter_dtype


def _optimizer_class(name: str) -> type:
    cls = getattr(torch.optim, name, None)
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
        return cls
    names = sorted(n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
                   and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != "Optimizer")
    raise ValueError(f"[optimizer] unknown name {name!r}; any torch.optim optimizer: {names}")


def _scheduler_class(name: str) -> type:
    cls = getattr(torch.optim.lr_scheduler, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.lr_scheduler.LRScheduler)):
        raise ValueError(f"[scheduler] unknown name {name!r}; use a class of torch.optim.lr_scheduler "
                         "(e.g. CosineAnnealingLR, StepLR, ExponentialLR, OneCycleLR, ReduceLROnPlateau)")
    if name in ("LambdaLR", "MultiplicativeLR", "SequentialLR", "ChainedScheduler"):
        raise ValueError(f"[scheduler] {name} needs Python objects; not usable from a config")
    return cls


def _network_class(name: str) -> type | Callable:
    from .network_spec import network_class

    try:
        return network_class(name)
    except ValueError as err:
        message = str(err)
        raise ValueError(message if message.startswith("[model]") else f"[model] {message}") from None


@dataclass(frozen=True)
class OpenSection:
    """A section naming a class (key ``field``) whose other keys are its constructor's arguments.
    ``supplied``: arguments the job passes itself; ``require``: check required arguments now (the
    network's are partly inferred from the data later, see :func:`~.network_spec.resolve_network_spec`);
    ``default``: the table used when the section is absent (``None``: the section is optional)."""

    field: str
    resolve: Callable[[str], type]
    supplied: tuple[str, ...] = ()
    require: bool = True
    default: Optional[dict] = None


#: sections that name a class; their keys are checked against its signature
OPEN_SECTIONS: dict[str, OpenSection] = {
    "model": OpenSection("type", _network_class, require=False,
                         default={"type": "ConditionalCouplingFlow"}),
    "optimizer": OpenSection("name", _optimizer_class, ("params",), default={"name": "Adam", "lr": 1e-3}),
    "scheduler": OpenSection("name", _scheduler_class, ("optimizer",)),
}


def _check_open(section: str, spec: OpenSection, given: Any) -> Optional[dict]:
    if given is None:
        if spec.default is None:
            return None
        given = spec.default
    if not isinstance(given, dict):
        raise ValueError(f"[{section}] must be a table (a [{section}] header followed by key = value lines), "
                         f"got {type(given).__name__} {given!r}")
    table = dict(given)
    if spec.default is not None:
        table.setdefault(spec.field, spec.default[spec.field])
    name = table.get(spec.field)
    if not isinstance(name, str):
        raise ValueError(f"[{section}] needs {spec.field} = \"ClassName\" (a string), got {name!r}")
    cls = spec.resolve(name)
    if section == "model" and table.get("summary") is not None:  # the summary network: a table of its own
        from .network_spec import check_summary

        check_summary(table["summary"], require=False)
    check_keywords(f"[{section}]", cls, {k: v for k, v in table.items() if k != spec.field}, spec.supplied,
                   spec.require)
    return table


def _check_data_kind(d: dict) -> None:
    """``[data]`` reads a file (``path``) or calls a simulator (``source``), never both; the
    simulator and a custom loss must import (checked now, before anything is read or written)."""
    from ..data.simulated import load_entry_point

    if (d["path"] is None) == (d["source"] is None):
        raise ValueError('[data] needs either path (a file of pairs) or source (a simulator "package.module:function" '
                         "drawing fresh pairs every step), not " + ("both" if d["path"] else "neither"))
    if d["source"] is None:
        if d["arguments"] is not None or d["validation_size"]:
            raise ValueError("[data] arguments and validation_size belong to a simulator (source); with a file, "
                             "validation_fraction holds out pairs")
        return
    given = [k for k in ("patch", "max_read_mb") if d[k] is not None]
    if given:
        raise ValueError(f"[data] {given} read a file; a simulator (source) draws whole samples")
    simulate = load_entry_point(d["source"], "[data] source")
    if not callable(simulate):
        raise ValueError(f"[data] source {d['source']!r} is not a function")
    params = [p.name for p in constructor_parameters(simulate)]  # simulate(n, generator, **arguments)
    check_keywords("[data] arguments", simulate, d["arguments"] or {}, params[:2])


def _check_plateau(scheduler: Optional[dict], d: dict) -> None:
    """ReduceLROnPlateau is stepped with the validation loss: it needs validation pairs and
    ``mode = "min"``, and its numbers are checked now (torch would complain only when the job builds it)."""
    if scheduler is None or scheduler["name"] != "ReduceLROnPlateau":
        return
    simulated = d["source"] is not None
    if (not simulated and d["validation_fraction"] == 0) or (simulated and not d["validation_size"]):
        raise ValueError("[scheduler] ReduceLROnPlateau is stepped with the validation loss, but the run has no "
                         "validation pairs: set [data] " + ("validation_fraction > 0" if d["source"] is None
                                                            else "validation_size > 0"))
    if scheduler.get("mode", "min") != "min":
        raise ValueError("[scheduler] ReduceLROnPlateau mode must be \"min\": it is stepped with a loss")
    factor = scheduler.get("factor", 0.1)
    if not 0 < factor < 1:
        raise ValueError(f"[scheduler] ReduceLROnPlateau factor must lie in (0, 1) (the new lr is lr x factor), got "
                         f"{factor!r}")
    for key in ("patience", "cooldown"):
        v = scheduler.get(key, 0)
        if v < 0:
            raise ValueError(f"[scheduler] ReduceLROnPlateau {key} must be >= 0 (validations), got {v!r}")


def validate_config(cfg: dict, base_dir: str = ".") -> dict:
    """Check a parsed configuration and fill in defaults; relative paths are taken from
    ``base_dir`` (the config file's folder). Raises ``ValueError`` naming the allowed keys, the
    expected type or the missing argument; nothing is read or written.

    >>> cfg = validate_config({"data": {"path": "d.h5"}, "training": {"out_dir": "run", "steps": 10},
    ...                        "model": {"type": "ConditionalCouplingFlow"}, "optimizer": {"name": "Adam", "lr": 1e-3}})
    >>> cfg["training"]["batch_size"], cfg["scheduler"]
    (16, None)
    >>> validate_config({"data": {"path": "d.h5", "bogus": 1}})
    Traceback (most recent call last):
    ...
    ValueError: [data]: unknown key(s) ['bogus']; allowed: ['path', 'source', 'arguments', 'validation_size', 'x', 'y',
    'validation_fraction', 'patch', 'seed', 'max_read_mb']
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"a configuration is a table of sections, got {type(cfg).__name__}")
    allowed = list(SECTIONS) + list(OPEN_SECTIONS)
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; allowed sections: {allowed}")
    out: dict[str, Any] = {name: check_section(name, _renamed(name, cfg.get(name, {}), strict=True), keys)
                           for name, keys in SECTIONS.items()}
    for name, spec in OPEN_SECTIONS.items():
        out[name] = _check_open(name, spec, cfg.get(name))
    d, t = out["data"], out["training"]
    _check_data_kind(d)
    _check_plateau(out["scheduler"], d)
    if d["path"] is not None:
        d["path"] = os.path.normpath(os.path.join(base_dir, d["path"]))
    t["out_dir"] = os.path.normpath(os.path.join(base_dir, t["out_dir"]))
    if t["loss"] is not None:
        from ..data.simulated import load_entry_point

        if not callable(load_entry_point(t["loss"], "[training] loss")):
            raise ValueError(f"[training] loss {t['loss']!r} is not a function")
    return out


def resume_differences(stored: dict, new: dict) -> list[str]:
    """The settings in which ``new`` differs from the ``stored`` configuration of the run it would
    resume, as ``"[section] key: old -> new"`` lines, ignoring keys marked ``resume=True`` (how
    long, how often, where the files are, how to read). Both are validated configurations; a key the stored one lacks
    (an older invnet) counts as its default.

    >>> a = validate_config({"data": {"path": "d.h5"}, "training": {"out_dir": "r", "steps": 10}})
    >>> b = validate_config({"data": {"path": "d.h5"}, "training": {"out_dir": "r", "steps": 20, "batch_size": 8},
    ...                      "model": {"type": "ConditionalCouplingFlow", "depth": 2}})
    >>> resume_differences(a, b)  # (depth was the default 4)
    ['[training] batch_size: 16 -> 8', '[model] depth: 4 -> 2']
    """
    unset = "(unset)"
    lines = []

    def compare(section: str, old: dict, now: dict, defaults: dict) -> None:
        for key in list(dict.fromkeys(list(old) + list(now))):
            was, becomes = old.get(key, defaults.get(key, unset)), now.get(key, defaults.get(key, unset))
            if was != becomes:
                lines.append(f"[{section}] {key}: {was!r} -> {becomes!r}".replace("'(unset)'", unset))

    for section, keys in SECTIONS.items():
        fixed = [k for k, key in keys.items() if not key.resume]
        compare(section, {k: v for k, v in (_renamed(section, stored.get(section), False) or {}).items() if k in fixed},
                {k: v for k, v in new[section].items() if k in fixed},
                {k: key.default for k, key in keys.items() if key.default is not REQUIRED})
    for section, spec in OPEN_SECTIONS.items():
        old, now = stored.get(section), new.get(section)
        if (old is None) != (now is None):
            before, after = ("(none)" if v is None else "present" for v in (old, now))
            lines.append(f"[{section}]: {before} -> {after}")
        elif old is not None:
            defaults = {}
            # the same class: an argument given as its default is no change
            if old.get(spec.field) == now.get(spec.field):
                try:
                    defaults = {p.name: p.default for p in constructor_parameters(spec.resolve(now[spec.field]))
                                if p.default is not p.empty}
                except ValueError:  # a class this invnet no longer has: compare as written
                    pass
            compare(section, old, now, defaults)
    return lines


def load_config(path: str) -> dict:
    """Read and validate a TOML config file (paths in it are relative to the file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist" if not os.path.exists(path)
                                else f"config {path!r} is not a file")
    with open(path, "rb") as f:
        try:
            cfg = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not a text (UTF-8) file: {err}") from None
    return validate_config(cfg, os.path.dirname(os.path.abspath(path)))
