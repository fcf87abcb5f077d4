"""Assembled flows (Glow, HINT, conditional forms, loops, summary networks)."""
from .base import FlowNetwork

__all__ = ["FlowNetwork"]
from .loop import LearnedLoop  # noqa: E402

__all__ += ["LearnedLoop"]
from .hyperbolic import Hyperbolic  # noqa: E402

__all__ += ["Hyperbolic"]
from .iunet import InvertibleUNet  # noqa: E402

__all__ += ["InvertibleUNet"]
