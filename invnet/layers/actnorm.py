"""Activation normalisation (ActNorm)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..core.forward_mode import ForwardModeError, transforms_active
from ..core.module import GradStore, InvertibleModule, VJPResult
from ..core.shapes import broadcast_channel, reduce_dims, space_size

__all__ = ["ActNorm"]


class ActNorm(InvertibleModule):
    r"""Per-channel affine map with data-dependent initialisation.

    From "Glow: Generative Flow with Invertible 1x1 Convolutions" (Kingma and Dhariwal, 2018,
    arXiv:1807.03039).

    .. math::
        y_{n,c,s} = e^{\ell_c}\, x_{n,c,s} + b_c, \qquad
        \log|\det J| = |S| \sum_c \ell_c

    where :math:`|S|` is the number of space points. On the first call the parameters are set so
    that the output of that batch has zero mean and unit variance per channel (when the first call
    is an inverse, so that the *inverse's* output does). Backward, written out:

    .. math::
        x = (y - b) e^{-\ell},\quad \bar x = e^{\ell}\bar y,\quad
        \bar b_c = \sum_{n,s} \bar y_{n,c,s},\quad
        \bar\ell_c = \sum_{n,s} \bar y_{n,c,s}(y_{n,c,s} - b_c) + |S| \sum_n \overline{\log\det}_n.

    Args:
        channels: number of channels.
        ndim: space dimensions (0 to 3) or ``None`` to accept any.
        stats_reduce: optional function that sums a tensor over the processes sharing the data
            (distributed runs use it so that the initialisation sees global statistics).

    >>> import torch
    >>> from invnet.layers import ActNorm
    >>> an = ActNorm(3)
    >>> y, logdet = an(3 * torch.randn(16, 3, 10) + 1)
    >>> bool(y.mean().abs() < 1e-6), an.initialized
    (True, True)
    """

    def __init__(
        self,
        channels: int,
        ndim: Optional[int] = None,
        stats_reduce: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"ActNorm needs at least 1 channel, got {channels}")
        self.channels = channels
        self.ndim = ndim
        self.stats_reduce = stats_reduce
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("_initialized", torch.tensor(False))
        # host copy of the buffer once it is True: reading a GPU buffer stalls the device, and
        # every forward asks (the buffer stays the truth that checkpoints carry)
        self._known_initialized = False

    @property
    def initialized(self) -> bool:
        if not self._known_initialized:
            self._known_initialized = bool(self._initialized)  # one read-back until initialised
        return self._known_initialized

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = False  # the loaded buffer decides again

    def extra_repr(self) -> str:
        return f"channels={self.channels}, initialized={self.initialized}"

    @torch.no_grad()
    def _initialize(self, data: Tensor, inverse: bool) -> None:
        if transforms_active():
            raise ForwardModeError(
                "ActNorm's data-dependent initialisation writes its parameters and cannot run inside a "
                "torch.func transform (jvp, jacfwd, vmap, ...): call the network once outside it first"
            )
        dims = reduce_dims(data)
        count = data.new_tensor(float(data.numel() // data.shape[1]))
        stats = torch.cat([data.sum(dims), (data * data).sum(dims), count.reshape(1)])
        if self.stats_reduce is not None:
            stats = self.stats_reduce(stats)
        c = self.channels
        n = stats[2 * c]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        std = torch.sqrt(var + 1e-6)
        if inverse:  # x = (y - b) e^{-l} should be standardised
            self.log_scale.copy_(torch.log(std).to(self.log_scale))
            self.bias.copy_(mean.to(self.bias))
        else:  # y = x e^{l} + b should be standardised
            self.log_scale.copy_((-torch.log(std)).to(self.log_scale))
            self.bias.copy_((-mean / std).to(self.bias))
        self._initialized.fill_(True)
        self._known_initialized = True

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        if not self.initialized:
            self._initialize(x, inverse=False)
        ls = broadcast_channel(self.log_scale, x)
        y = x * torch.exp(ls) + broadcast_channel(self.bias, x)
        logdet = (space_size(x) * self.log_scale.sum()).expand(x.shape[0]).to(x.dtype)
        return y, logdet

    def _inverse(self, y: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        if not self.initialized:
            self._initialize(y, inverse=True)
        x = (y - broadcast_channel(self.bias, y)) * torch.exp(-broadcast_channel(self.log_scale, y))
        logdet = (-space_size(y) * self.log_scale.sum()).expand(y.shape[0]).to(y.dtype)
        return x, logdet

    def _vjp(self, y: Tensor, dy: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        centred = y - broadcast_channel(self.bias, y)
        scale = torch.exp(broadcast_channel(self.log_scale, y))
        x = centred / scale
        dx = dy * scale
        dims = reduce_dims(y)
        grads.add(self.bias, dy.sum(dims))
        grads.add(self.log_scale, (dy * centred).sum(dims) + space_size(y) * dlogdet.sum())
        return x, dx, None

    def _vjp_inverse(
        self, x: Tensor, dx: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore
    ) -> VJPResult:
        # inverse map: x = (y - b) e^{-l};  dy = e^{-l} dx;  db = -sum e^{-l} dx;
        # dl = -sum dx * x - |S| sum dlogdet
        scale = torch.exp(broadcast_channel(self.log_scale, x))
        y = x * scale + broadcast_channel(self.bias, x)
        dy = dx / scale
        dims = reduce_dims(x)
        grads.add(self.bias, -dy.sum(dims))
        grads.add(self.log_scale, -(dx * x).sum(dims) - space_size(x) * dlogdet.sum())
        return y, dy, None
