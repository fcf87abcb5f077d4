"""Assembled flows (Glow, HINT, conditional forms, loops, summary networks)."""
from .base import FlowNetwork

__all__ = ["FlowNetwork"]
from .conditional_coupling_flow import ConditionalCouplingFlow  # noqa: E402

__all__ += ["ConditionalCouplingFlow"]
