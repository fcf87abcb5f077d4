r"""The conditional flow for super-resolution, SRFlow-style, built from invnet blocks.

After "SRFlow: Learning the Super-Resolution Space with Normalizing Flow" (Lugmayr, Danelljan,
Van Gool and Timofte, 2020, arXiv:2006.14759): a conditional Glow models the high-resolution image
:math:`x` given the low-resolution :math:`y = Dx`, through an encoder of :math:`y`; it is trained by
likelihood and sampled with a temperature. Two choices differ from SRFlow, both to make a small
model learn fast and to make every sample consistent with its input:

1. **Work in the wavelet domain and model only what y does not fix.** ``L = log2(factor)``
   levels of the orthonormal Haar squeeze (a wavelet *packet*: every channel is split again) turn
   each ``factor x factor`` block of :math:`x` into ``factor^2`` coefficients per channel, laid out
   on the low-resolution grid. The all-low-pass coefficient equals ``factor`` times the block mean,
   i.e. ``factor * y`` exactly for the box operator :math:`D`. The other
   ``C (factor^2 - 1)`` coefficients :math:`d` span the null space of :math:`D`. The flow models
   :math:`q(d \mid y)`, and a sample is assembled with the low-pass set to ``factor * y``: every
   sample satisfies :math:`D\hat x = y` up to round-off (LR consistency by construction).
   The Haar map is orthogonal (log-determinant 0), so :math:`\log q(x \mid y) = \log q(d \mid y)`
   on the set of consistent images.
2. **Start at bicubic.** The flow variable is the residual :math:`r = d - d_b` with :math:`d_b`
   the detail coefficients of the bicubic upsample of :math:`y` (a shift that depends only on the
   condition: log-determinant 0). With the couplings starting at the identity, the posterior mean
   starts at the (LR-consistent) bicubic image, and training improves on it.

The flow: ``steps`` Glow steps (ActNorm, invertible 1x1 convolution, conditional affine coupling)
on the ``C (factor^2 - 1)`` channels of :math:`r`. Every coupling receives the encoder's features
(the condition, on the same low-resolution grid). The encoder is a fully convolutional network of
:math:`[y, d_b]` (zero padding by :class:`invnet.layers.ZeroPad` modules, no global pooling), so the
model runs on images of any size that ``factor`` divides, and its latent is spatial:
``(N, C (factor^2 - 1), H / factor, W / factor)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from invnet import Chain
from invnet.layers import ActNorm, AffineCoupling, ConditionalAffine, Conv1x1, HaarSqueeze, ZeroPad
from invnet.networks import ConditionalGlow
from invnet.networks.density import StandardNormal

from .degradation import bicubic_upsample, check_factor, check_image

__all__ = ["LREncoder", "SRFlow"]

#: detail coefficients of natural images are about ten times smaller than intensities; the encoder
#: sees them scaled up so its inputs are of similar size.
_DETAIL_SCALE = 8.0


class LREncoder(nn.Module):
    r"""Fully convolutional encoder of the low-resolution input (the summary network of SRFlow's
    conditioning): ``layers`` stages of zero padding, 3x3 convolution and ReLU, then a 3x3
    convolution to ``out_channels`` features, all on the low-resolution grid:

    .. math:: h_0 = u,\quad h_{k} = \mathrm{ReLU}(K_k * h_{k-1}),\quad c = K_{out} * h_L.

    Its reach is ``layers + 1`` low-resolution pixels each way. Padding is done by
    :class:`invnet.layers.ZeroPad` modules (a domain decomposition can swap them for halo exchanges).

    Args:
        in_channels: channels of the input ``u``.
        out_channels: channels of the features (the condition of the couplings).
        hidden: hidden channels.
        layers: number of hidden stages (at least 1).

    >>> LREncoder(3, 8, hidden=16, layers=2)(torch.zeros(2, 3, 5, 5)).shape
    torch.Size([2, 8, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 64, layers: int = 3) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"LREncoder needs at least 1 layer, got {layers}")
        mods: list[nn.Module] = []
        width = in_channels
        for _ in range(layers):
            mods += [ZeroPad(2, 1), nn.Conv2d(width, hidden, 3), nn.ReLU()]
            width = hidden
        mods += [ZeroPad(2, 1), nn.Conv2d(width, out_channels, 3)]
        self.net = nn.Sequential(*mods)
        self.reach = layers + 1

    def forward(self, u: Tensor) -> Tensor:
        return self.net(u)


class SRFlow(nn.Module):
    r"""Conditional flow :math:`q(x \mid y)` over high-resolution images consistent with
    :math:`y = Dx` (see the module docstring for the math).

    Args:
        channels: image channels (1 for grey levels, 3 for colour).
        factor: scale factor, a power of two (2, 4, 8, ...).
        steps: number of Glow steps (ActNorm, 1x1 convolution, conditional affine coupling).
        hidden: hidden channels of each coupling's conditioner.
        cond_features: channels of the encoder's features.
        encoder_hidden, encoder_layers: size of the encoder.
        clamp: bound on the couplings' log-scales (1.0: with 2.0 short trainings gave samples that
            blew up at temperature 1, see README.md).
        flow: ``"steps"``: a single-scale stack of ``steps`` Glow steps on the low-resolution grid
            (default); ``"glow"``: :class:`invnet.networks.ConditionalGlow` with ``levels`` scales
            (``steps / levels`` steps each; Haar squeezes, so low-resolution sizes must be divisible
            by ``2**levels``), fed the same encoder features as a field condition.
        levels: scales of the ``"glow"`` flow.
        injector: put SRFlow's *affine injector* in every step of the ``"steps"`` flow: a
            :class:`invnet.layers.ConditionalAffine` that shifts and scales *all* channels by
            functions of the encoder features, :math:`h \mapsto h \odot e^{s(c)} + t(c)`
            (log-determinant :math:`\sum s(c)`), between the 1x1 convolution and the coupling.
            The couplings alone only let the condition act on half of the channels, through
            the other half; the injector lets it move the whole conditional mean and spread at
            once, which is what the posterior mean needs.

    >>> model = SRFlow(channels=1, factor=4, steps=2, hidden=8, cond_features=4, encoder_hidden=8)
    >>> x = torch.rand(3, 1, 16, 16)
    >>> y = torch.nn.functional.avg_pool2d(x, 4)
    >>> model.log_prob(x, y).shape
    torch.Size([3])
    >>> s = model.sample(y, n=2, temperature=0.8)
    >>> s.shape, bool(torch.allclose(torch.nn.functional.avg_pool2d(s[0], 4), y, atol=1e-5))
    (torch.Size([2, 3, 1, 16, 16]), True)
    """

    def __init__(
        self,
        channels: int = 1,
        factor: int = 4,
        steps: int = 8,
        hidden: int = 64,
        cond_features: int = 32,
        encoder_hidden: int = 64,
        encoder_layers: int = 3,
        clamp: float = 1.0,
        flow: str = "steps",
        levels: int = 2,
        injector: bool = True,
    ) -> None:
        super().__init__()
        check_factor(factor)
        if flow not in ("steps", "glow"):
            raise ValueError(f"flow must be 'steps' or 'glow', got {flow!r}")
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        if steps < 1:
            raise ValueError(f"steps must be positive, got {steps}")
        self.hparams = dict(
            channels=channels, factor=factor, steps=steps, hidden=hidden, cond_features=cond_features,
            encoder_hidden=encoder_hidden, encoder_layers=encoder_layers, clamp=clamp, flow=flow, levels=levels,
            injector=injector,
        )
        self.channels = channels
        self.factor = factor
        self.levels = int(math.log2(factor))
        per_channel = factor * factor
        #: channels of the flow variable (the detail coefficients) on the low-resolution grid
        self.detail_channels = channels * (per_channel - 1)
        low = torch.arange(channels) * per_channel
        mask = torch.ones(channels * per_channel, dtype=torch.bool)
        mask[low] = False
        self.register_buffer("_low_index", low, persistent=False)
        self.register_buffer("_detail_index", torch.nonzero(mask).flatten(), persistent=False)
        self.haar = HaarSqueeze(ndim=2)
        self.encoder = LREncoder(channels + self.detail_channels, cond_features, encoder_hidden, encoder_layers)
        dc = self.detail_channels
        if flow == "glow":
            if steps % levels:
                raise ValueError(
                    f"flow='glow' spreads steps over levels: steps ({steps}) must be a multiple of levels ({levels})"
                )
            self.flow = ConditionalGlow(
                dc, cond_features, hidden=hidden, levels=levels, depth=steps // levels, ndim=2, clamp=clamp,
            )
        else:
            blocks = []
            for k in range(steps):
                blocks += [ActNorm(dc, ndim=2), Conv1x1(dc, ndim=2)]
                if injector:
                    blocks.append(ConditionalAffine(dc, cond_features, hidden=hidden, ndim=2, clamp=clamp))
                blocks += [
                    AffineCoupling(
                        dc, hidden=hidden, ndim=2, cond_channels=cond_features, clamp=clamp, swap=bool(k % 2)
                    ),
                ]
            self.flow = Chain(*blocks)
        self.base = StandardNormal()

    # ------------------------------------------------------------------------------------------
    # the wavelet packet: x <-> (low = factor * Dx, details)
    def analysis(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Haar packet coefficients of ``x``: ``(low, details)`` on the low-resolution grid, with
        ``low = factor * downsample(x)``."""
        check_image("the high-resolution image", x, channels=self.channels, factor=self.factor)
        t = x
        with torch.no_grad():
            for _ in range(self.levels):
                t = self.haar(t)[0]
        return t[:, self._low_index], t[:, self._detail_index]

    def synthesis(self, low: Tensor, details: Tensor) -> Tensor:
        """Inverse of :meth:`analysis`."""
        n, _, h, w = low.shape
        t = low.new_empty(n, self.channels * self.factor**2, h, w)
        t[:, self._low_index] = low
        t[:, self._detail_index] = details
        with torch.no_grad():
            for _ in range(self.levels):
                t = self.haar.inverse(t)[0]
        return t

    # ------------------------------------------------------------------------------------------
    def condition(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder features ``c`` and bicubic detail coefficients ``d_b`` of the low-resolution ``y``."""
        check_image("the low-resolution image", y, channels=self.channels)
        with torch.no_grad():
            _, base = self.analysis(bicubic_upsample(y, self.factor))
        c = self.encoder(torch.cat([y - 0.5, _DETAIL_SCALE * base], dim=1))
        return c, base

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Latent ``z`` of ``x`` given ``y`` and the log-determinant of ``r -> z`` (per sample).
        Gradients flow to the flow and the encoder (memory-free backward through the flow)."""
        self._check_pair(x, y)
        c, base = self.condition(y)
        _, details = self.analysis(x)
        return self.flow(details - base, c)

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        r""":math:`\log q(x \mid y)` in nats per image (a density over the detail coefficients)."""
        z, logdet = self(x, y)
        return self.base.log_prob(z) + logdet

    def bits_per_dim(self, x: Tensor, y: Tensor, bin_width: float = 1.0 / 256) -> Tensor:
        """Negative log-likelihood in bits per modelled dimension (detail coefficient), for data
        quantised into bins of ``bin_width``."""
        dims = self.detail_channels * (x.shape[2] // self.factor) * (x.shape[3] // self.factor)
        return -(self.log_prob(x, y) + dims * math.log(bin_width)) / (dims * math.log(2))

    def latent_shape(self, y_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the latent for low-resolution inputs of shape ``y_shape``."""
        n, _, h, w = y_shape
        return (n, self.detail_channels, h, w)

    def decode(self, z: Tensor, y: Tensor) -> Tensor:
        """The high-resolution image for latent ``z`` (shape :meth:`latent_shape`) and input ``y``."""
        check_image("the low-resolution image", y, channels=self.channels)
        if tuple(z.shape) != self.latent_shape(tuple(y.shape)):
            raise ValueError(f"z must have shape {self.latent_shape(tuple(y.shape))}, got {tuple(z.shape)}")
        with torch.no_grad():
            c, base = self.condition(y)
            r, _ = self.flow.inverse(z, c)
            return self.synthesis(self.factor * y, r + base)

    def sample(
        self, y: Tensor, n: int = 1, temperature: float = 1.0, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """``n`` high-resolution candidates per input, shape ``(n, N, C, factor H, factor W)``;
        the latent is drawn from :math:`\\mathcal N(0, T^2 I)` with temperature ``T``."""
        check_image("the low-resolution image", y, channels=self.channels)
        if n < 1:
            raise ValueError(f"n must be a positive number of samples, got {n}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        with torch.no_grad():
            c, base = self.condition(y)
            reps = (n,) + (1,) * (y.dim() - 1)
            shape = self.latent_shape((n * y.shape[0],) + tuple(y.shape[1:]))
            p = next(self.parameters())
            # draw where the generator lives (a CPU generator serves a GPU model too), then move
            where = generator.device if generator is not None else p.device
            z = temperature * torch.randn(shape, generator=generator, dtype=p.dtype, device=where).to(p.device)
            r, _ = self.flow.inverse(z, c.repeat(reps))
            x = self.synthesis(self.factor * y.repeat(reps), r + base.repeat(reps))
        return x.reshape((n,) + tuple(y.shape[:2]) + tuple(x.shape[2:]))

    def _check_pair(self, x: Tensor, y: Tensor) -> None:
        check_image("the high-resolution image", x, channels=self.channels, factor=self.factor)
        check_image("the low-resolution image", y, channels=self.channels)
        expected = (x.shape[0], x.shape[1], x.shape[2] // self.factor, x.shape[3] // self.factor)
        if tuple(y.shape) != expected:
            raise ValueError(
                f"the low-resolution image must have shape {expected} for x of shape {tuple(x.shape)}, "
                f"got {tuple(y.shape)}"
            )
