"""Typed descriptions of configuration sections and the one keyword checker.

A *fixed* section (``[data]``, ``[training]``) is a table of :class:`Key` entries: the value's type
(a Python annotation), its default, an optional check, and whether it may change when a run is
resumed. Adding a key is one line in such a table (:data:`invnet.training.config.SECTIONS`).

An *open* section (``[model]``, ``[optimizer]``, ``[scheduler]``) names a class and passes the
other keys to its constructor; :func:`check_keywords` checks them against the constructor's
signature: unknown names (following ``**kwargs`` up the class hierarchy), value types (from the
annotations, else from the defaults) and missing required arguments. Both kinds of error name
what is accepted, and all of it happens before any file is read or written.
"""
from __future__ import annotations

import collections.abc
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

__all__ = [
    "REQUIRED", "Key", "check_section", "check_keywords", "accepted_keywords", "constructor_parameters", "matches",
    "describe", "positive", "nonnegative", "fraction", "nonempty", "one_of", "positive_integers",
]

#: default of a key that must be given
REQUIRED: Any = ...


@dataclass(frozen=True)
class Key:
    """One configuration key: ``kind`` is a type annotation (``int``, ``float`` (any number),
    ``bool``, ``str``, ``list[int]``, ...), ``default`` its value when absent (:data:`REQUIRED`: it
    must be given; ``None``: optional, unset), ``check`` returns a complaint about a given value
    or ``None``, and ``resume`` says whether the value may differ from the stored run's when
    resuming (settings of how long, how often and how to read, not of what is learned).

    >>> Key(int, 16, positive).validate("[training] batch_size", 0)
    Traceback (most recent call last):
    ...
    ValueError: [training] batch_size must be a positive number, got 0
    """

    kind: Any
    default: Any = None
    check: Optional[Callable[[Any], Optional[str]]] = None
    resume: bool = False

    def validate(self, where: str, value: Any) -> Any:
        if matches(value, self.kind) is False:
            raise ValueError(f"{where} has the wrong type {type(value).__name__} ({value!r}); expected "
                             f"{describe(self.kind)}")
        complaint = self.check(value) if self.check is not None else None
        if complaint:
            raise ValueError(f"{where} must be {complaint}, got {value!r}")
        return value


# ---------------------------------------------------------------- value checks (complaint or None)
def positive(v: Any) -> Optional[str]:
    return None if v > 0 else "a positive number"


def nonnegative(v: Any) -> Optional[str]:
    return None if v >= 0 else "zero or a positive number"


def fraction(v: Any) -> Optional[str]:
    return None if 0 <= v < 1 else "a fraction in [0, 1)"


def nonempty(v: Any) -> Optional[str]:
    return None if str(v).strip() else "a non-empty string"


def one_of(*choices: Any) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        return None if v in choices else f"one of {list(choices)}"

    return check


def positive_integers(v: Any) -> Optional[str]:
    return None if v and all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in v) else \
        "a list of positive integers"


# ---------------------------------------------------------------- types
def _args(annotation: Any) -> tuple:
    return tuple(getattr(annotation, "__args__", ()) or ())


def matches(value: Any, annotation: Any) -> Optional[bool]:
    """Whether a configuration value (from TOML: bool, int, float, str, list, dict) fits a type
    annotation: ``True``, ``False``, or ``None`` when the annotation says nothing checkable (a
    callable; a table given for a class such as ``nn.Module``, which the job may build from it).
    ``float`` accepts integers, ``int`` no floats, and neither accepts a boolean.

    >>> matches(3, float), matches(2.5, int), matches(True, int), matches("a", typing.Optional[int])
    (True, False, False, False)
    >>> import torch
    >>> matches([1, 2], tuple[int, ...]), matches([1, "a"], list[int]), matches(0.1, typing.Union[float, torch.Tensor])
    (True, False, True)
    """
    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, str):
        return None
    if annotation is None or annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        verdicts = [matches(value, a) for a in _args(annotation)]
        return True if True in verdicts else (None if None in verdicts else False)
    if origin is typing.Literal:
        return value in _args(annotation)
    if annotation in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        inner = [a for a in _args(annotation) if a is not Ellipsis]
        if len(set(map(repr, inner))) == 1:  # homogeneous: list[int], tuple[int, ...], tuple[int, int]
            verdicts = [matches(v, inner[0]) for v in value]
            return False if False in verdicts else (None if None in verdicts else True)
        return True
    if annotation is dict or origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    # a class, e.g. Tensor, nn.Module: no number, string or list is one, a table may describe one
    if isinstance(annotation, type):
        return True if isinstance(value, annotation) else (None if isinstance(value, dict) else False)
    return None


def describe(annotation: Any) -> str:
    """Words for a type annotation, for error messages.

    >>> describe(typing.Optional[float]), describe(list[int])
    ('a number', 'a list of an integer')
    """
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
             tuple: "a list", dict: "a table"}
    if annotation in words:
        return words[annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        options = [a for a in _args(annotation) if a is not type(None)]
        plain = [a for a in options if a in words or typing.get_origin(a) in (list, tuple, dict, typing.Literal)]
        return " or ".join(dict.fromkeys(describe(a) for a in (plain or options)))
    if origin in (list, tuple, collections.abc.Sequence):
        inner = [a for a in _args(annotation) if a is not Ellipsis]
        return f"a list of {describe(inner[0])}" if inner else "a list"
    if origin is typing.Literal:
        return f"one of {list(_args(annotation))}"
    return getattr(annotation, "__name__", str(annotation))


def _kind_of_default(default: Any) -> Any:
    """The annotation implied by a default value (numbers are lenient: 0 may stand for 0.0)."""
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)) and not (isinstance(default, float) and not math.isfinite(default)):
        return float
    if isinstance(default, str):
        return str
    if isinstance(default, (list, tuple)):
        return list
    return inspect.Parameter.empty


# ---------------------------------------------------------------- fixed sections
def check_section(section: str, given: Any, keys: dict[str, Key]) -> dict:
    """Check the table ``[section]`` against its keys and fill in defaults.

    >>> check_section("training", {"steps": 5}, {"steps": Key(int, REQUIRED, positive), "seed": Key(int, 0)})
    {'steps': 5, 'seed': 0}
    >>> check_section("training", {"step": 5}, {"steps": Key(int, REQUIRED)})
    Traceback (most recent call last):
    ...
    ValueError: [training]: unknown key(s) ['step']; allowed: ['steps']
    """
    if not isinstance(given, dict):
        raise ValueError(f"[{section}] must be a table (a [{section}] header followed by key = value lines), "
                         f"got {type(given).__name__} {given!r}")
    unknown = sorted(k for k in given if k not in keys)
    if unknown:
        raise ValueError(f"[{section}]: unknown key(s) {unknown}; allowed: {list(keys)}")
    out = {}
    for name, key in keys.items():
        if name in given:
            out[name] = key.validate(f"[{section}] {name}", given[name])
        elif key.default is REQUIRED:
            raise ValueError(f"[{section}] needs the key {name!r}")
        else:
            out[name] = key.default
    return out


# ---------------------------------------------------------------- open sections: class keywords
#: where a constructor's ``**NAME`` goes when not to the parent class: NAME -> (module, class, arguments
#: the network fills in itself). ``**conditioner_kwargs`` of the HINT networks reach every conditioner.
KEYWORD_TARGETS = {
    "conditioner_kwargs": (
        "invnet.layers.conditioners", "ConvConditioner", ("in_channels", "out_channels", "hidden", "ndim")
    ),
}


def _signature(klass: Any) -> list[inspect.Parameter]:
    init = klass.__init__ if isinstance(klass, type) else klass
    try:
        sig = inspect.signature(init, eval_str=True)
    except Exception:  # an annotation that cannot be resolved here: keep them as strings (unchecked)
        sig = inspect.signature(init)
    params = list(sig.parameters.values())
    return params[1:] if isinstance(klass, type) else params  # drop self


def constructor_parameters(cls: type | Callable) -> list[inspect.Parameter]:
    """Constructor parameters of ``cls``, following ``**kwargs`` up the class hierarchy (or to
    where :data:`KEYWORD_TARGETS` says they go); the parameters of a function that builds
    something (a factory named by entry point)."""
    import importlib

    if not isinstance(cls, type):  # a factory function: its own parameters
        return [p for p in _signature(cls) if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    found: dict[str, inspect.Parameter] = {}

    def add(params: list[inspect.Parameter], skip: tuple[str, ...] = ()) -> None:
        for p in params:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in found and p.name not in skip:
                found[p.name] = p

    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object or klass.__module__.startswith("torch.nn.modules"):
            continue
        params = _signature(klass)
        add(params)
        var = next((p for p in params if p.kind == p.VAR_KEYWORD), None)
        if var is None:
            break
        if var.name in KEYWORD_TARGETS:
            module, name, filled = KEYWORD_TARGETS[var.name]
            add(_signature(getattr(importlib.import_module(module), name)), filled)
            break
    return list(found.values())


def accepted_keywords(cls: type, supplied: Iterable[str] = ()) -> list[str]:
    """Keyword arguments a configuration may give ``cls`` (those the caller supplies left out).

    >>> import torch
    >>> accepted_keywords(torch.optim.lr_scheduler.StepLR, supplied=["optimizer"])[:2]
    ['step_size', 'gamma']
    """
    supplied = set(supplied)
    return [p.name for p in constructor_parameters(cls) if p.name not in supplied]


def check_keywords(where: str, cls: type, kwargs: dict, supplied: Iterable[str] = (),
                   require: bool = True) -> list[str]:
    """Check ``kwargs`` for ``cls(**supplied_values, **kwargs)``: unknown names, value types and,
    with ``require``, missing required arguments. Returns the accepted names. ``where`` starts the
    messages (the section, e.g. ``"[scheduler]"``).

    >>> import torch
    >>> check_keywords("[scheduler]", torch.optim.lr_scheduler.StepLR, {"gamma": 0.5}, ["optimizer"])
    Traceback (most recent call last):
    ...
    ValueError: [scheduler] StepLR needs the key(s) ['step_size'] (allowed: ['step_size', 'gamma', 'last_epoch'])
    >>> check_keywords("[optimizer]", torch.optim.Adam, {"lr": "fast"}, ["params"])
    Traceback (most recent call last):
    ...
    ValueError: [optimizer] lr must be a number for Adam, got 'fast'
    """
    supplied = set(supplied)
    params = [p for p in constructor_parameters(cls) if p.name not in supplied]
    accepted = [p.name for p in params]
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; allowed: {accepted}")
    for p in params:
        if p.name not in kwargs:
            continue
        value, kind = kwargs[p.name], p.annotation
        verdict = matches(value, kind)
        if verdict is None and p.default is not p.empty:
            kind = _kind_of_default(p.default)
            verdict = matches(value, kind)
        if verdict is False:
            raise ValueError(f"{where} {p.name} must be {describe(kind)} for {cls.__name__}, got {value!r}")
    if require:
        missing = [p.name for p in params if p.default is p.empty and p.name not in kwargs
                   and p.kind is not p.VAR_KEYWORD]
        if missing:
            raise ValueError(f"{where} {cls.__name__} needs the key(s) {missing} (allowed: {accepted})")
    return accepted
