"""A fully invertible U-Net (iUNet)."""
from __future__ import annotations

from ..core.chain import Chain
from ..core.module import InvertibleModule
from ..layers.conv1x1 import Conv1x1
from ..layers.coupling_kinds import check_coupling, make_coupling
from ..layers.resampling import LearnableDownsample
from ..layers.structural import ChannelSubset, Inverted

__all__ = ["InvertibleUNet"]


class InvertibleUNet(Chain):
    r"""A fully invertible U-Net: same-shape map :math:`y = f(x)` with U-Net structure.

    From "iUNet: a fully invertible U-Net" (Etmann, Ke and Schönlieb, 2020, arXiv:2005.05220).
    Level :math:`\ell` (channels :math:`C_\ell`, space :math:`S/2^\ell`) is

    .. math::
        \mathrm{L}_\ell = \mathrm{B}^{up}_\ell \circ
            \big(\mathrm{id}_{\lfloor C_\ell/2\rfloor} \oplus U_\ell^{-1}\circ \mathrm{L}_{\ell+1}
            \circ D_\ell\big) \circ \mathrm{B}^{down}_\ell,

    where :math:`\mathrm{B}` are ``blocks`` pairs of (orthogonal 1x1 convolution, coupling), the
    first :math:`\lfloor C_\ell/2\rfloor` channels are the skip connection (kept at full
    resolution, the identity), the others go down through a learnable orthogonal downsampling
    :math:`D_\ell` (:class:`~invnet.layers.LearnableDownsample`, initialised as the Haar
    transform; :math:`C_{\ell+1} = \lceil C_\ell/2\rceil 2^d`), through the next level, and
    back up through the inverse of another learnable downsampling :math:`U_\ell` (so the
    upsampling starts as the inverse Haar transform). The skip channels meet the upsampled ones
    again in :math:`\mathrm{B}^{up}_\ell`. The bottom level is only :math:`\mathrm{B}`.

    Everything is invertible, so the whole U-Net is a :class:`~invnet.Chain`: under the
    memory-free backward its training memory does not grow with depth (levels or blocks). With
    additive couplings the map is volume preserving (``logdet = 0``); with affine ones ``logdet``
    is the sum of the log-scales. Use it as a reconstruction network (``x`` to same-shape ``y``,
    e.g. from a back-projection stacked with zero channels) or as a learned invertible
    preprocessing; it takes no condition.

    Args:
        channels: channels of ``x`` (2 or more).
        ndim: space dimensions, 1 to 3. Space sizes must be divisible by ``2^(levels - 1)``.
        levels: resolution levels (1 = no downsampling).
        blocks: (1x1 convolution, coupling) pairs on each side of each level.
        hidden: hidden channels of the couplings' conditioners at level 0, doubled per level.
        coupling: a key of :data:`~invnet.layers.COUPLINGS`: ``"additive"`` (default, volume
            preserving) or ``"affine"``.

    >>> import torch
    >>> net = InvertibleUNet(2, ndim=2, levels=3, blocks=1, hidden=4)
    >>> x = torch.randn(2, 2, 8, 8)
    >>> y, logdet = net(x)
    >>> y.shape, bool(torch.allclose(net.inverse(y)[0], x, atol=1e-5))
    (torch.Size([2, 2, 8, 8]), True)
    """

    def __init__(
        self,
        channels: int,
        ndim: int = 2,
        levels: int = 3,
        blocks: int = 2,
        hidden: int = 32,
        coupling: str = "additive",
    ) -> None:
        if channels < 2:
            raise ValueError(f"InvertibleUNet needs at least 2 channels (couplings split them), got {channels}")
        if ndim not in (1, 2, 3):
            raise ValueError(f"InvertibleUNet needs 1, 2 or 3 space dimensions, got {ndim}")
        if levels < 1 or blocks < 1:
            raise ValueError(f"levels and blocks must be positive counts, got {levels} and {blocks}")
        self._coupling = check_coupling(coupling)
        self._spec = (ndim, levels, blocks, hidden)
        super().__init__(*self._level(0, channels).blocks)
        self.channels = channels
        self.ndim = ndim
        self.levels = levels

    def _side(self, c: int, hidden: int) -> list[InvertibleModule]:
        ndim, _, blocks, _ = self._spec
        out: list[InvertibleModule] = []
        for i in range(blocks):
            out.append(Conv1x1(c, ndim=ndim))
            out.append(make_coupling(self._coupling, c, hidden, ndim, swap=bool(i % 2)))
        return out

    def _level(self, level: int, c: int) -> Chain:
        ndim, levels, _, hidden = self._spec
        h = hidden * 2**level
        if level == levels - 1:
            return Chain(*self._side(c, h))
        skip = c // 2
        down_c = c - skip
        branch = Chain(
            LearnableDownsample(down_c, ndim),
            self._level(level + 1, down_c * 2**ndim),
            Inverted(LearnableDownsample(down_c, ndim)),
        )
        return Chain(*self._side(c, h), ChannelSubset(branch, skip), *self._side(c, h))
