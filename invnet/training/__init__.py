"""Training jobs: the trainer and its run stack (batch source, loss, device, precision, parallel
strategy), checkpoints, metrics, preemption signals, configs."""
from .checkpoint import (
                         Checkpoint,
                         CheckpointError,
                         latest_checkpoint,
                         latest_readable_checkpoint,
                         list_checkpoints,
                         read_checkpoint,
                         resolve_checkpoint,
                         save_checkpoint,
)
from .config import load_config, resume_differences, validate_config
from .device import resolve_device, to_device
from .loss import LossFn, bits_per_dim_loss, flow_inputs
from .network_spec import available_networks, build_network, resolve_network_spec
from .precision import PRECISIONS, Precision
from .run import strategy_from_config, train_from_config, trainer_from_config
from .signals import (
                         EXIT_INTERRUPTED,
                         EXIT_NONFINITE,
                         EXIT_OK,
                         EXIT_PREEMPTED,
                         EXIT_USAGE,
                         NonFiniteLossError,
                         PreemptedError,
                         PreemptionFlag,
)
from .trainer import Trainer, TrainResult

__all__ = [
    "Trainer", "TrainResult", "Checkpoint", "CheckpointError", "save_checkpoint", "read_checkpoint",
    "list_checkpoints", "latest_checkpoint", "latest_readable_checkpoint", "resolve_checkpoint",
    "Precision", "PRECISIONS", "resolve_device", "to_device", "LossFn", "bits_per_dim_loss", "flow_inputs",
    "strategy_from_config",
    "build_network", "resolve_network_spec", "available_networks", "EXIT_OK", "EXIT_USAGE", "EXIT_PREEMPTED",
    "EXIT_NONFINITE", "EXIT_INTERRUPTED", "NonFiniteLossError", "PreemptionFlag", "PreemptedError",
    "load_config", "validate_config", "resume_differences", "train_from_config", "trainer_from_config",
]
