"""Networks described by a small JSON-able spec, so checkpoints can rebuild them without pickles."""
from __future__ import annotations

import math
from typing import Callable, Sequence

from torch import nn

from .. import networks
from ..networks.base import FlowNetwork
from .schema import accepted_keywords, check_keywords

__all__ = ["build_network", "resolve_network_spec", "available_networks", "available_summaries", "check_summary",
           "network_class"]


#: constructor arguments a spec need not give: they are taken from the data
INFERRED = ("channels", "in_channels", "cond_channels", "ndim", "vector_condition")


def _configurable(cls: type) -> bool:
    """Buildable from a spec: every required argument is a plain value or taken from the data (the
    builder :class:`~invnet.networks.MultiscaleFlow`, which needs a step factory object, is not)."""
    from .schema import constructor_parameters

    return all(p.default is not p.empty or p.name in INFERRED for p in constructor_parameters(cls))


def available_networks() -> list[str]:
    """Names of the :class:`FlowNetwork` classes in :mod:`invnet.networks` a spec may name.

    >>> "ConditionalGlow" in available_networks(), "MultiscaleFlow" in available_networks()
    (True, False)
    """
    return sorted(n for n in dir(networks) if isinstance(getattr(networks, n), type)
                  and issubclass(getattr(networks, n), FlowNetwork) and getattr(networks, n) is not FlowNetwork
                  and _configurable(getattr(networks, n)))


def network_class(name: str) -> type | Callable[..., nn.Module]:
    """What ``[model] type = name`` builds: a network of :mod:`invnet.networks` by its name, or an
    application's own model by entry point, ``"package.module:Name"`` (a class or a function whose
    keyword arguments are the other keys of the spec, returning an ``nn.Module``; checkpoints store
    the name, so the package must be importable wherever the run is resumed or sampled).

    >>> network_class("ConditionalGlow").__name__, network_class("torch.nn:Identity").__name__
    ('ConditionalGlow', 'Identity')
    """
    if isinstance(name, str) and ":" in name:
        from ..data.simulated import load_entry_point

        found = load_entry_point(name, "[model] type")
        if not callable(found):
            raise ValueError(f"[model] type {name!r} is not a class or function")
        return found
    if name not in available_networks():
        raise ValueError(f"unknown network type {name!r}; available: {available_networks()}, or an entry point "
                         '"package.module:Name" of your own model')
    return getattr(networks, name)


def available_summaries() -> list[str]:
    """Names of the (non-invertible) summary networks in :mod:`invnet.networks`."""
    return sorted(n for n in dir(networks) if n.endswith("Summary") and isinstance(getattr(networks, n), type)
                  and issubclass(getattr(networks, n), nn.Module))


def check_summary(summary: object, require: bool = True) -> type:
    """Check a summary-network table ``{"type": "ImageSummary", **kwargs}``; returns its class."""
    if not isinstance(summary, dict) or summary.get("type") not in available_summaries():
        raise ValueError(f"[model] summary must be a table with type one of {available_summaries()}, got {summary!r}")
    cls = getattr(networks, summary["type"])
    check_keywords("[model] summary", cls, {k: v for k, v in summary.items() if k != "type"}, require=require)
    return cls


def resolve_network_spec(spec: dict, x_shape: Sequence[int], y_shape: Sequence[int]) -> dict:
    """Complete ``spec = {"type": name, **kwargs}`` with what the data tell: ``channels``,
    ``cond_channels``, ``ndim`` and ``vector_condition`` (when the class takes them and the spec
    does not set them). An optional ``summary = {"type": "ImageSummary", ...}`` table describes a
    summary network (its ``in_channels``/``in_features``, ``out_size`` are filled in; its
    ``out_channels`` defaults to 8 and sets the flow's ``cond_channels``). Unknown keys, values of
    the wrong type and missing arguments raise ``ValueError``
    (:func:`~invnet.training.schema.check_keywords`).

    >>> resolve_network_spec({"type": "ConditionalCouplingFlow", "depth": 2}, (1, 8, 8), (2, 8, 8))["cond_channels"]
    2
    """
    if "type" not in spec:
        raise ValueError(f"the network spec needs a 'type', one of {available_networks()}")
    name = spec["type"]
    cls = network_class(name)
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    accepted = accepted_keywords(cls)
    inferred = {"channels": int(x_shape[0]), "in_channels": int(x_shape[0]), "cond_channels": int(y_shape[0]),
                "ndim": len(x_shape) - 1, "vector_condition": len(y_shape) == 1 and len(x_shape) > 1}
    summary = kwargs.get("summary")
    if summary is not None:
        s_cls = check_summary(summary, require=False)
        s = {k: v for k, v in summary.items() if k != "type"}
        s_accepted = accepted_keywords(s_cls)
        s.setdefault("out_channels", kwargs.get("cond_channels", 8))
        s_inferred = {"in_channels": int(y_shape[0]), "in_features": int(math.prod(y_shape)),
                      "out_size": [int(v) for v in x_shape[1:]]}
        for key, value in s_inferred.items():
            if key in s_accepted and key not in s:
                s[key] = value
        check_keywords("[model] summary", s_cls, s)
        kwargs["summary"] = {"type": summary["type"], **s}
        inferred["cond_channels"] = int(s["out_channels"])
        inferred["vector_condition"] = "out_size" not in s_accepted and len(x_shape) > 1
    for key, value in inferred.items():
        if key in accepted and key not in kwargs:
            kwargs[key] = value
    check_keywords("[model]", cls, kwargs)
    return {"type": name, **kwargs}


def build_network(spec: dict) -> FlowNetwork:
    """Instantiate a resolved spec (see :func:`resolve_network_spec`).

    >>> spec = resolve_network_spec({"type": "ConditionalCouplingFlow", "depth": 1, "hidden": 4}, (1, 4), (1, 4))
    >>> net = build_network(spec)
    >>> type(net).__name__, net.cond_channels
    ('ConditionalCouplingFlow', 1)
    """
    name = spec.get("type")
    cls = network_class(name)
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    if isinstance(kwargs.get("summary"), dict):
        s = dict(kwargs["summary"])
        kwargs["summary"] = getattr(networks, s.pop("type"))(**s)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"cannot build {name} from {kwargs}: {err}") from None
