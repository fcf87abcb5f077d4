"""A single-scale conditional coupling flow (RealNVP/Glow steps with a condition)."""
from __future__ import annotations

from .glow import GlowStep
from .multiscale_flow import MultiscaleFlow

__all__ = ["ConditionalCouplingFlow"]


class ConditionalCouplingFlow(MultiscaleFlow):
    r"""Conditional flow :math:`z = f(x; c)`: an optional space-to-depth squeeze of ``x`` (and of a
    spatial condition ``c`` alike, so the two stay aligned), then ``depth`` steps of
    ActNorm, invertible 1x1 convolution and coupling whose conditioner sees ``c``:

    .. math:: z = (g_K \circ \dots \circ g_1)(S x; S c),\qquad
        g_k = \mathrm{Coupling}_k(\cdot\,; S c) \circ \mathrm{Conv1x1}_k \circ \mathrm{ActNorm}_k

    Conditional density estimation with couplings follows "Guided Image Generation with
    Conditional Invertible Neural Networks" (Ardizzone et al., 2019, arXiv:1907.02392) on the
    Glow step (Kingma and Dhariwal, 2018, arXiv:1807.03039). It is the one-scale conditional
    Glow (:class:`~invnet.networks.MultiscaleFlow` with :class:`~invnet.networks.GlowStep`,
    ``levels=1``, a checkerboard squeeze) whose latent keeps the squeezed layout
    ``(channels * 2^d, *space / 2)`` (``latent="squeezed"``). A vector condition
    ``(N, cond_channels)`` is broadcast over space.

    Args:
        channels: channels of ``x``.
        cond_channels: channels of ``c``.
        ndim: space dimensions (0 = vectors; then no squeeze and ``channels >= 2``).
        depth: number of steps.
        hidden: hidden channels of each conditioner.
        squeeze: squeeze before the steps (``ndim >= 1``; needs even space sizes).
        clamp: bound of the coupling log-scales.
        vector_condition: the condition is a vector ``(N, cond_channels)`` (e.g. a summary
            network's output) instead of a field with the space shape of ``x``.
        coupling: ``"affine"`` (default), ``"additive"`` or ``"spline"`` (rational-quadratic); see
            :data:`~invnet.layers.COUPLINGS`.

    >>> import torch
    >>> flow = ConditionalCouplingFlow(1, 2, ndim=2, depth=2, hidden=8)
    >>> x, c = torch.randn(3, 1, 8, 8), torch.randn(3, 2, 8, 8)
    >>> z, logdet = flow(x, c)
    >>> z.shape, bool(torch.allclose(flow.inverse(z, c)[0], x, atol=1e-5)), flow.sample(4, c[:1]).shape
    (torch.Size([3, 4, 4, 4]), True, torch.Size([4, 1, 8, 8]))
    """

    #: parameter names before the multiscale builder: the steps were ``steps.blocks.k``
    legacy_prefixes = (("steps.", "body.steps."),)

    def __init__(
        self, channels: int, cond_channels: int, ndim: int, depth: int = 4, hidden: int = 32,
        squeeze: bool = True, clamp: float = 2.0, vector_condition: bool = False, coupling: str = "affine",
    ) -> None:
        if cond_channels < 1:
            raise ValueError(f"ConditionalCouplingFlow needs cond_channels >= 1, got {cond_channels}")
        super().__init__(
            GlowStep(hidden, clamp, coupling=coupling), channels, levels=1, depth=depth, ndim=ndim,
            squeeze="checkerboard" if squeeze else None, cond_channels=cond_channels,
            vector_condition=vector_condition, latent="squeezed",
        )
