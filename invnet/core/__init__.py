"""The block contract, the Chain and the memory-free autograd bridge, the tools a hand-written
backward uses (``local_vjp``, ``GradStore``, ``HandOver``), and check helpers."""
from .chain import Chain
from .handover import HandOver
from .module import Backward, InvertibleModule, memory_saving, memory_saving_enabled
from .vjp import GradStore, local_vjp

__all__ = [
    "InvertibleModule", "Chain", "Backward", "GradStore", "memory_saving", "memory_saving_enabled", "local_vjp",
    "HandOver",
]
