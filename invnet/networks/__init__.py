"""Assembled flows (Glow, HINT, conditional forms, loops, summary networks)."""
from .base import FlowNetwork
from .conditional_hint import ConditionalHINT
from .hint import HINT, hint_step
from .multiscale_conditional_hint import MultiscaleConditionalHINT
from .multiscale_hint import MultiscaleHINT, ScaleLevel

__all__ = ["FlowNetwork"]
__all__ += ["HINT", "MultiscaleHINT", "ConditionalHINT", "hint_step", "ScaleLevel", "MultiscaleConditionalHINT"]
