"""Assembled flows (Glow, HINT, conditional forms, loops, summary networks)."""
from .base import FlowNetwork
from .conditional_glow import ConditionalGlow
from .glow import Glow
from .multiscale import MultiscaleLevel
from .summary import ImageSummary, VectorSummary

__all__ = ["FlowNetwork", "Glow", "ConditionalGlow", "MultiscaleLevel", "ImageSummary", "VectorSummary"]
