"""HINT: the step (ActNorm, channel mixing, recursive HINT coupling), its factory, and the
single-scale network."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..core.chain import Chain
from ..core.module import InvertibleModule
from ..layers.actnorm import ActNorm
from ..layers.conv1x1 import ChannelPermutation, Conv1x1
from ..layers.coupling_kinds import check_coupling
from ..layers.hint import HINTCoupling
from .multiscale_flow import MultiscaleFlow

__all__ = ["HINT", "HINTStep", "hint_step", "channel_mixing", "MIXINGS"]

#: channel mixings between steps: learned 1x1 convolutions, or a fixed random permutation
MIXINGS = ("householder", "lu", "permutation")


def channel_mixing(channels: int, mixing: str, ndim: int, seed: int) -> InvertibleModule:
    """The mixing block between HINT steps: :class:`~invnet.layers.Conv1x1` (``"householder"``
    or ``"lu"``) or a fixed random :class:`~invnet.layers.ChannelPermutation` seeded with
    ``seed`` (``"permutation"``).

    >>> type(channel_mixing(4, "permutation", ndim=1, seed=3)).__name__
    'ChannelPermutation'
    """
    if mixing not in MIXINGS:
        raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
    if mixing == "permutation":
        return ChannelPermutation(channels, kind="random", seed=seed, ndim=ndim)
    return Conv1x1(channels, parametrization=mixing, ndim=ndim)


def hint_step(
    channels: int,
    hidden: int,
    ndim: int,
    cond_channels: int = 0,
    mixing: str = "householder",
    clamp: float = 2.0,
    leaf_channels: int = 3,
    seed: int = 0,
    coupling: str = "affine",
    **conditioner_kwargs,
) -> Chain:
    r"""One HINT step, :math:`T \circ W \circ A`: ``Chain(ActNorm, mixing, HINTCoupling)`` (see
    :class:`HINT`; "HINT", Kruse et al., 2021, arXiv:1905.10687). Arguments as :class:`HINT`;
    ``seed`` fixes the step's permutations.

    >>> import torch
    >>> step = hint_step(4, hidden=8, ndim=1)
    >>> step(torch.randn(3, 4, 6))[0].shape
    torch.Size([3, 4, 6])
    """
    return Chain(
        ActNorm(channels, ndim=ndim),
        channel_mixing(channels, mixing, ndim, seed),
        HINTCoupling(
            channels, hidden, ndim, cond_channels, clamp=clamp, leaf_channels=leaf_channels, seed=seed,
            coupling=coupling, **conditioner_kwargs,
        ),
    )


@dataclass(frozen=True)
class HINTStep:
    r"""Step factory of the HINT networks: step ``index`` of scale ``scale`` is one
    :func:`hint_step` (ActNorm, channel mixing, recursive :class:`~invnet.layers.HINTCoupling`)
    whose fixed permutations are seeded with ``100 * scale + index``. Give it to
    :class:`~invnet.networks.MultiscaleFlow` (see :class:`~invnet.networks.StepFactory`).

    Args:
        hidden: hidden channels of every conditioner.
        mixing: one of :data:`MIXINGS`.
        clamp: bound on the log-scales of all sub-couplings.
        leaf_channels: channel count at which the HINT recursion stops.
        coupling: the transform of every node of the recursion, a key of
            :data:`~invnet.layers.COUPLINGS` (``"affine"``, the paper's, or ``"additive"``).
        conditioner_kwargs: passed to every conditioner (``kernel_size``, ``residual_blocks``).

    >>> blocks = HINTStep(hidden=8)(channels=4, cond_channels=0, ndim=0, scale=1, index=2)
    >>> [type(b).__name__ for b in blocks[0]]
    ['ActNorm', 'Conv1x1', 'HINTCoupling']
    """

    hidden: int = 64
    mixing: str = "householder"
    clamp: float = 2.0
    leaf_channels: int = 3
    coupling: str = "affine"
    conditioner_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise ValueError(f"hidden must be a positive channel count, got {self.hidden}")
        if self.mixing not in MIXINGS:
            raise ValueError(f"mixing must be one of {MIXINGS}, got {self.mixing!r}")
        if not self.clamp > 0:
            raise ValueError(f"clamp must be positive, got {self.clamp}")
        if self.leaf_channels < 2:
            raise ValueError(f"leaf_channels must be at least 2, got {self.leaf_channels}")
        check_coupling(self.coupling)

    def __call__(self, channels: int, cond_channels: int, ndim: int, scale: int, index: int) -> list[InvertibleModule]:
        # each step stays one Chain: its parameter names (steps.blocks.k.blocks.i) predate the builder
        return [hint_step(channels, self.hidden, ndim, cond_channels, self.mixing, self.clamp, self.leaf_channels,
                          100 * scale + index, self.coupling, **self.conditioner_kwargs)]


class HINT(MultiscaleFlow):
    r"""HINT network at one scale: ``depth`` steps of ActNorm, channel mixing and a recursive
    :class:`~invnet.layers.HINTCoupling`, with a standard normal latent of the shape of ``x``:
    :class:`~invnet.networks.MultiscaleFlow` with :class:`HINTStep`, one level, no squeeze.

    From "HINT: Hierarchical Invertible Neural Transport for Density Estimation and Bayesian
    Inference" (Kruse, Detommaso, Köthe, Scheichl, 2021, arXiv:1905.10687); ActNorm and 1x1
    mixing from "Glow" (Kingma and Dhariwal, 2018, arXiv:1807.03039).

    .. math::
        z = f(x; c) = (T_K \circ W_K \circ A_K) \circ \dots \circ (T_1 \circ W_1 \circ A_1)(x), \qquad
        \log q(x \mid c) = \log \mathcal N(z; 0, I) + \textstyle\sum_k \log|\det J_k|

    Args:
        channels: channels of ``x`` (2 or more, odd allowed).
        hidden: hidden channels of every conditioner.
        depth: number of steps.
        ndim: space dimensions, 0 (vectors) to 3.
        cond_channels: channels of an optional condition ``c`` (field of the space shape of ``x``,
            or a vector broadcast over space) fed to every conditioner.
        mixing: ``"householder"`` / ``"lu"`` (learned :class:`~invnet.layers.Conv1x1`) or
            ``"permutation"`` (fixed random :class:`~invnet.layers.ChannelPermutation`).
        clamp: bound on the log-scales of all couplings.
        leaf_channels: channel count at which the HINT recursion stops.
        vector_condition: the condition is a vector (informational at one scale: both forms are
            accepted; set by a job from the data).
        coupling: the transform of every node of the recursion: ``"affine"`` (the paper's,
            default) or ``"additive"`` (volume preserving); see :data:`~invnet.layers.COUPLINGS`.
        **conditioner_kwargs: passed to every conditioner.

    Latent: ``z`` has the shape of ``x``. The backward is memory-free: steps rebuild their input
    from their output one at a time.

    >>> import torch
    >>> from invnet.networks import HINT
    >>> flow = HINT(3, hidden=16, depth=2, ndim=0)
    >>> x = torch.randn(8, 3)
    >>> flow.log_prob(x).shape, flow.sample(5).shape
    (torch.Size([8]), torch.Size([5, 3]))
    """

    #: parameter names before the multiscale builder: the steps were ``flow.blocks.k``
    legacy_prefixes = (("flow.", "body.steps."),)

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        depth: int = 4,
        ndim: int = 2,
        cond_channels: int = 0,
        mixing: str = "householder",
        clamp: float = 2.0,
        leaf_channels: int = 3,
        vector_condition: bool = False,
        coupling: str = "affine",
        **conditioner_kwargs,
    ) -> None:
        step = HINTStep(hidden, mixing, clamp, leaf_channels, coupling, conditioner_kwargs)
        super().__init__(step, channels, levels=1, depth=depth, ndim=ndim, squeeze=None,
                         cond_channels=cond_channels, vector_condition=vector_condition)
