"""The block contract, the Chain and the memory-free autograd bridge; the tools a hand-written
backward uses (``local_vjp``, ``GradStore``, ``HandOver``); mixed precision (``pin_full_precision``)
and the reconstruction-drift measurement (``reconstruction_drift``); check helpers."""
from .chain import Chain
from .drift import DriftReport, ReconstructionDriftError, ReconstructionDriftWarning, reconstruction_drift
from .handover import HandOver
from .module import Backward, InvertibleModule, memory_saving, memory_saving_enabled
from .precision import pin_full_precision
from .value_checks import value_checks, value_checks_enabled
from .vjp import GradStore, local_vjp

__all__ = [
    "InvertibleModule", "Chain", "Backward", "GradStore", "memory_saving", "memory_saving_enabled", "local_vjp",
    "HandOver", "pin_full_precision", "reconstruction_drift", "DriftReport", "ReconstructionDriftError",
    "ReconstructionDriftWarning", "value_checks", "value_checks_enabled",
]
