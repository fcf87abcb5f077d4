"""Training jobs: the trainer, checkpoints, metrics, preemption signals, configs."""
from .checkpoint import Checkpoint, latest_checkpoint, list_checkpoints, read_checkpoint, resolve_checkpoint, save_checkpoint
from .comm import Comm, SerialComm
from .network_spec import available_networks, build_network, resolve_network_spec
from .signals import (
    EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, NonFiniteLossError, PreemptedError, PreemptionFlag,
)
from .trainer import Trainer, TrainResult
from .config import load_config, validate_config
from .run import train_from_config, trainer_from_config

__all__ = [
    "Trainer", "TrainResult", "Checkpoint", "save_checkpoint", "read_checkpoint", "list_checkpoints",
    "latest_checkpoint", "resolve_checkpoint", "Comm", "SerialComm", "build_network", "resolve_network_spec",
    "available_networks", "EXIT_OK", "EXIT_USAGE", "EXIT_PREEMPTED", "EXIT_NONFINITE", "NonFiniteLossError",
    "PreemptionFlag", "PreemptedError", "load_config", "validate_config", "train_from_config", "trainer_from_config",
]
