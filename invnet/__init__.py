"""invnet: memory-efficient invertible neural networks for large inverse problems.

Blocks rebuild their input from their output, so training keeps the activations of one block at a
time whatever the depth. See docs/architecture.md.
"""
# host_memory must be imported before anything that imports torch (large CPU tensors on huge
# pages; invnet/host_memory.py says why): keep it first in this line
from . import host_memory, layers, networks
from .core import (
    Backward,
    Chain,
    InvertibleModule,
    memory_budget,
    memory_plans,
    memory_saving,
    memory_saving_enabled,
    value_checks,
    value_checks_enabled,
)

__version__ = "0.1.0"

__all__ = [
    "InvertibleModule", "Chain", "Backward", "memory_saving", "memory_budget", "memory_plans",
    "memory_saving_enabled", "value_checks", "value_checks_enabled", "layers", "networks",
]
