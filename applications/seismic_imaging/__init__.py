"""Seismic imaging with uncertainty: the posterior of log-impedance given post-stack seismic data.

``python -m applications.seismic_imaging`` trains the conditional flow of ``config_2d.toml`` (or
``--config config_3d.toml``) through ``invnet.training`` on pairs simulated afresh for every batch
(``[data] source = "applications.seismic_imaging:simulate"``), then samples the posterior of
held-out simulations and measures its calibration: README.md in this folder.
"""
from .earth_models import earth_model, earth_models, reflectivity
from .forward import (
           observe,
           poststack_operator,
           simulate,
           standardization,
           to_log_impedance,
)

__all__ = ["earth_model", "earth_models", "reflectivity", "observe", "poststack_operator", "simulate",
           "standardization", "to_log_impedance"]
