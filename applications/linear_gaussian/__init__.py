"""Linear-Gaussian posterior: amortized conditional flows against the exactly known posterior.

``python -m applications.linear_gaussian`` trains the network of ``config.toml`` (or
``--config config_hint.toml`` / ``config_field.toml``) through ``invnet.training`` on fresh joint
pairs every step (``[data] source = "applications.linear_gaussian:simulate"``), then compares
``q(x | y)`` with the exact ``p(x | y)``: README.md in this folder.
"""
from .problem import LinearGaussianProblem, evaluate, make_problem, simulate

__all__ = ["LinearGaussianProblem", "evaluate", "make_problem", "simulate"]
