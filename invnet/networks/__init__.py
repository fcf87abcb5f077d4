"""Assembled flows (Glow, HINT, conditional forms, loops, summary networks)."""
from .base import FlowNetwork
from .conditional_coupling_flow import ConditionalCouplingFlow
from .conditional_glow import ConditionalGlow
from .conditional_hint import ConditionalHINT
from .glow import Glow
from .hint import HINT, hint_step
from .hyperbolic import Hyperbolic
from .iunet import InvertibleUNet
from .loop import LearnedLoop
from .multiscale import MultiscaleLevel
from .multiscale_conditional_hint import MultiscaleConditionalHINT
from .multiscale_hint import MultiscaleHINT
from .summary import ImageSummary, VectorSummary

__all__ = ["FlowNetwork", "Glow", "ConditionalGlow", "MultiscaleLevel", "ImageSummary", "VectorSummary"]
__all__ += ["HINT", "MultiscaleHINT", "ConditionalHINT", "hint_step", "MultiscaleConditionalHINT"]
__all__ += ["LearnedLoop", "Hyperbolic", "InvertibleUNet", "ConditionalCouplingFlow"]
