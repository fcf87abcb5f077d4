"""Networks described by a small JSON-able spec, so checkpoints can rebuild them without pickles."""
from __future__ import annotations

import inspect
from typing import Sequence

from .. import networks
from ..networks.base import FlowNetwork

__all__ = ["build_network", "resolve_network_spec", "available_networks"]


def available_networks() -> list[str]:
    """Names of the :class:`FlowNetwork` classes in :mod:`invnet.networks` a spec may name."""
    return sorted(n for n in dir(networks) if isinstance(getattr(networks, n), type)
                  and issubclass(getattr(networks, n), FlowNetwork) and getattr(networks, n) is not FlowNetwork)


def resolve_network_spec(spec: dict, x_shape: Sequence[int], y_shape: Sequence[int]) -> dict:
    """Complete ``spec = {"type": name, **kwargs}`` with what the data tell: ``channels``,
    ``cond_channels``, ``ndim`` and ``vector_condition`` (when the class takes them and the spec
    does not set them). Unknown keys raise ``ValueError`` naming the accepted ones.

    >>> resolve_network_spec({"type": "ConditionalCouplingFlow", "depth": 2}, (1, 8, 8), (2, 8, 8))["cond_channels"]
    2
    """
    if "type" not in spec:
        raise ValueError(f"the network spec needs a 'type', one of {available_networks()}")
    name = spec["type"]
    if name not in available_networks():
        raise ValueError(f"unknown network type {name!r}; available: {available_networks()}")
    cls = getattr(networks, name)
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self" and params[p].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown and not takes_any:
        raise ValueError(f"unknown key(s) {unknown} for network {name!r}; it accepts {accepted}")
    inferred = {"channels": int(x_shape[0]), "in_channels": int(x_shape[0]), "cond_channels": int(y_shape[0]),
                "ndim": len(x_shape) - 1, "vector_condition": len(y_shape) == 1 and len(x_shape) > 1}
    for key, value in inferred.items():
        if key in accepted and key not in kwargs:
            kwargs[key] = value
    return {"type": name, **kwargs}


def build_network(spec: dict) -> FlowNetwork:
    """Instantiate a resolved spec (see :func:`resolve_network_spec`).

    >>> net = build_network(resolve_network_spec({"type": "ConditionalCouplingFlow", "depth": 1, "hidden": 4}, (1, 4), (1, 4)))
    >>> type(net).__name__, net.cond_channels
    ('ConditionalCouplingFlow', 1)
    """
    name = spec.get("type")
    if name not in available_networks():
        raise ValueError(f"unknown network type {name!r}; available: {available_networks()}")
    return getattr(networks, name)(**{k: v for k, v in spec.items() if k != "type"})
