"""Assembled flows: one multiscale builder (:class:`MultiscaleFlow`) with Glow and HINT step
factories, the named networks built from it (Glow, ConditionalGlow, ConditionalCouplingFlow, HINT,
MultiscaleHINT), the two-lane conditional HINTs, loops, U-Net, hyperbolic and summary networks."""
from .base import FlowNetwork
from .conditional_coupling_flow import ConditionalCouplingFlow
from .conditional_glow import ConditionalGlow
from .conditional_hint import ConditionalHINT
from .glow import Glow, GlowStep
from .hint import HINT, HINTStep, hint_step
from .hyperbolic import Hyperbolic
from .iunet import InvertibleUNet
from .loop import LearnedLoop
from .multiscale import MultiscaleLevel
from .multiscale_conditional_hint import MultiscaleConditionalHINT
from .multiscale_flow import MultiscaleFlow, StepFactory
from .multiscale_hint import MultiscaleHINT
from .summary import ImageSummary, VectorSummary

__all__ = ["FlowNetwork", "MultiscaleFlow", "MultiscaleLevel", "StepFactory", "GlowStep", "HINTStep"]
__all__ += ["Glow", "ConditionalGlow", "ConditionalCouplingFlow", "ImageSummary", "VectorSummary"]
__all__ += ["HINT", "MultiscaleHINT", "ConditionalHINT", "hint_step", "MultiscaleConditionalHINT"]
__all__ += ["LearnedLoop", "Hyperbolic", "InvertibleUNet"]
