"""Limited-angle tomography with an invertible learned iterative reconstruction (i-RIM).

``python -m applications.limited_angle_tomography`` trains :class:`invnet.networks.LearnedLoop`
through invnet's trainer on random-ellipse phantoms simulated every step (``problem``), then
compares it with Tikhonov-CG on held-out phantoms and the Shepp-Logan phantom (``evaluation``).
README.md in this folder has the commands and the numbers. Modules: ``tomography`` (the Radon
matrix, phantoms, the CG baseline), ``problem`` (operator, simulator, model and loss for the
config's entry points), ``evaluation`` (the comparison, figures), ``__main__`` (the command).
"""
from .problem import learned_loop, radon_operator, simulate, squared_error

__all__ = ["learned_loop", "radon_operator", "simulate", "squared_error"]
