"""The block contract, the Chain and the memory-free autograd bridge, plus check helpers."""
from .chain import Chain
from .module import Backward, GradStore, InvertibleModule, memory_saving, memory_saving_enabled
from .value_checks import value_checks, value_checks_enabled

__all__ = ["InvertibleModule", "Chain", "Backward", "GradStore", "memory_saving", "memory_saving_enabled",
           "value_checks", "value_checks_enabled"]
