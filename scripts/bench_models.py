"""Matched multiscale Glow models for the benchmarks: invnet and its peers (normflows, FrEIA,
FrEIA blocks in MemCNN's memory-saving wrapper).

Every model has the same structure: ``levels`` scales; at each scale a checkerboard squeeze,
``steps`` Glow steps (ActNorm, invertible 1x1 convolution in the LU parametrisation, one-sided
affine coupling), then (except at the last scale) half of the channels leave as a latent. Every
coupling uses the *same* conditioner class, invnet's :class:`~invnet.layers.ConvConditioner`
(3x3 conv, ReLU, residual 1x1 conv + ReLU, 3x3 conv, ``hidden`` channels), so that the networks
do the same arithmetic and hold the same number of parameters up to the 1x1-convolution and
ActNorm bookkeeping. Each model has ``nll(x, c=None)``: the mean negative log-likelihood (nats,
up to the constant) of a batch, the loss of one training step.

invnet's network is :class:`invnet.networks.Glow` (``invnet``, ``invnet-plain``); the same Glow
assembled here from core blocks (``invnet-core``, ``invnet-core-plain``) is kept for comparison.
The peers are optional (``pip install -e .[bench]``, see scripts/install_bench_peers.sh); their
builders raise ``ImportError`` when a peer is missing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

import invnet
from invnet.layers import ActNorm, AffineCoupling, Conv1x1, ConvConditioner, Squeeze, split_channels

PEERS_2D_ONLY = ("normflows", "freia", "memcnn-freia")
LIBRARIES = ("invnet", "invnet-plain") + PEERS_2D_ONLY
#: invnet Glow assembled from core blocks in this file (one Chain per scale), for comparison
EXTRA_LIBRARIES = ("invnet-core", "invnet-core-plain")


def squeeze(x: Tensor) -> Tensor:
    """Checkerboard space-to-depth (same channel order as invnet's ``Squeeze``), plain torch."""
    n, c = x.shape[:2]
    space = x.shape[2:]
    d = len(space)
    shape = [n, c] + [v for s in space for v in (s // 2, 2)]
    perm = [0, 1] + [3 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
    return x.reshape(shape).permute(perm).reshape([n, c * 2**d] + [s // 2 for s in space])


def gaussian_nll(latents: list[Tensor], logdet: Tensor) -> Tensor:
    """Mean over the batch of ``0.5 |z|^2 - logdet`` (the constant is left out)."""
    sq = sum(0.5 * z.reshape(z.shape[0], -1).pow(2).sum(1) for z in latents)
    return (sq - logdet).mean()


def level_channels(channels: int, levels: int, ndim: int) -> list[int]:
    """Channels inside each scale after its squeeze (half are factored out between scales)."""
    out = []
    c = channels
    for _ in range(levels):
        c = c * 2**ndim
        out.append(c)
        c = c // 2
    return out


# ----------------------------------------------------------------------------------------------
# invnet
class InvnetCoreGlow(nn.Module):
    """Multiscale Glow assembled from invnet core blocks: one :class:`invnet.Chain` per scale
    (``Squeeze`` then the steps), so each scale is one memory-saving autograd node that keeps only
    its output. ``memory_saving`` selects invnet's memory-free backward or plain autograd through
    the same blocks. A condition (a field at full resolution) is squeezed along with the data and
    fed to every coupling."""

    def __init__(
        self, channels: int, levels: int, steps: int, hidden: int, ndim: int = 2,
        cond_channels: int = 0, memory_saving: bool = True,
    ) -> None:
        super().__init__()
        self.memory_saving = memory_saving
        self.levels = levels
        self.ndim = ndim
        chains = []
        cond = cond_channels
        for c in level_channels(channels, levels, ndim):
            cond = cond * 2**ndim
            blocks: list[invnet.InvertibleModule] = [Squeeze(ndim=ndim)]
            for k in range(steps):
                blocks += [
                    ActNorm(c, ndim=ndim),
                    Conv1x1(c, parametrization="lu", ndim=ndim),
                    AffineCoupling(c, hidden=hidden, ndim=ndim, cond_channels=cond, swap=bool(k % 2)),
                ]
            chains.append(invnet.Chain(*blocks))
        self.chains = nn.ModuleList(chains)

    def nll(self, x: Tensor, c: Optional[Tensor] = None) -> Tensor:
        latents = []
        logdet = x.new_zeros(x.shape[0])
        with invnet.memory_saving(self.memory_saving):
            for i, chain in enumerate(self.chains):
                if c is not None:
                    with torch.no_grad():
                        c = squeeze(c)
                x, ld = chain(x, c)
                logdet = logdet + ld
                if i < self.levels - 1:
                    x, z = split_channels(x)
                    latents.append(z)
        latents.append(x)
        return gaussian_nll(latents, logdet)


# ----------------------------------------------------------------------------------------------
# normflows
def _lu_parameters(channels: int, generator: torch.Generator):
    q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator, dtype=torch.float64))
    p, low, up = torch.linalg.lu(q)
    diag = torch.diagonal(up)
    return (p.float(), torch.tril(low, -1).float(), torch.triu(up, 1).float(), torch.sign(diag).float(),
            torch.log(diag.abs()).float())


class NormflowsGlow(nn.Module):
    """The matched Glow from normflows' flows (``ActNorm``, ``Invertible1x1Conv(use_lu=True)``,
    ``AffineCouplingBlock`` with invnet's conditioner as ``param_map``), run in the density
    direction (normflows' ``inverse``), as its ``forward_kld`` does. Plain autograd."""

    def __init__(self, channels: int, levels: int, steps: int, hidden: int) -> None:
        super().__init__()
        import normflows as nf

        self.levels = levels
        scales = []
        for c in level_channels(channels, levels, 2):
            flows = []
            for _ in range(steps):
                flows += [
                    nf.flows.ActNorm((c, 1, 1)),
                    nf.flows.Invertible1x1Conv(c, use_lu=True),
                    nf.flows.AffineCouplingBlock(
                        ConvConditioner(c - c // 2, 2 * (c // 2), hidden, 2), scale=True, scale_map="exp",
                    ),
                ]
            scales.append(nn.ModuleList(flows))
        self.scales = nn.ModuleList(scales)

    def nll(self, x: Tensor, c: Optional[Tensor] = None) -> Tensor:
        latents = []
        logdet = x.new_zeros(x.shape[0])
        for i, flows in enumerate(self.scales):
            x = squeeze(x)
            for f in flows:
                x, ld = f.inverse(x)
                logdet = logdet + ld
            if i < self.levels - 1:
                x, z = split_channels(x)
                latents.append(z)
        latents.append(x)
        return gaussian_nll(latents, logdet)


# ----------------------------------------------------------------------------------------------
# FrEIA (plain, and each Glow step in MemCNN's InvertibleModuleWrapper)
def _freia_conv1x1_class():
    import FrEIA.modules as Fm

    class LUConv1x1(Fm.InvertibleModule):
        """Learned invertible 1x1 convolution (LU parametrisation) written for FrEIA, which ships
        only fixed ones; the same parametrisation as normflows' and invnet's ``lu``."""

        def __init__(self, dims_in, dims_c=None, seed: int = 0):
            super().__init__(dims_in, dims_c)
            c = dims_in[0][0]
            self.space = int(torch.tensor(dims_in[0][1:]).prod())
            p, low, up, sign, log_diag = _lu_parameters(c, torch.Generator().manual_seed(seed))
            self.register_buffer("perm", p)
            self.register_buffer("sign", sign)
            self.register_buffer("eye", torch.eye(c))
            self.lower = nn.Parameter(low)
            self.upper = nn.Parameter(up)
            self.log_diag = nn.Parameter(log_diag)

        def forward(self, x, c=None, rev=False, jac=True):
            low = torch.tril(self.lower, -1) + self.eye
            up = torch.triu(self.upper, 1) + torch.diag(self.sign * torch.exp(self.log_diag))
            w = self.perm @ low @ up
            if rev:
                w = torch.linalg.inv(w)
            x0 = x[0]
            y = torch.matmul(w, x0.reshape(x0.shape[0], x0.shape[1], -1)).reshape(x0.shape)
            ld = (self.space * self.log_diag.sum()).expand(x0.shape[0])
            return (y,), (-ld if rev else ld)

        def output_dims(self, input_dims):
            return input_dims

    return LUConv1x1


def _freia_step(c: int, space: tuple[int, ...], hidden: int, seed: int):
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    seq = Ff.SequenceINN(c, *space)
    seq.append(Fm.ActNorm)
    seq.append(_freia_conv1x1_class(), seed=seed)
    seq.append(
        Fm.AffineCouplingOneSided,
        subnet_constructor=lambda cin, cout: ConvConditioner(cin, cout, hidden, 2),
        clamp=2.0, clamp_activation="TANH",
    )
    return seq


class _MemcnnStep(nn.Module):
    """A FrEIA Glow step with MemCNN's calling convention: ``forward(x) -> (y, logdet)`` and
    ``inverse(y, logdet) -> x`` (MemCNN rebuilds the input from the outputs; the logdet rides
    along as a second output so that its gradient flows)."""

    def __init__(self, seq: nn.Module) -> None:
        super().__init__()
        self.seq = seq

    def forward(self, x: Tensor):
        y, ld = self.seq(x)
        return y, ld

    def inverse(self, y: Tensor, ld: Tensor) -> Tensor:
        x, _ = self.seq(y, rev=True)
        return x


class FreiaGlow(nn.Module):
    """The matched Glow from FrEIA blocks (``ActNorm``, an LU 1x1 convolution, and
    ``AffineCouplingOneSided`` with invnet's conditioner and a tanh soft clamp). With
    ``memcnn=True`` every Glow step sits in ``memcnn.InvertibleModuleWrapper(keep_input=False)``,
    which frees each step's input and rebuilds it by inversion in the backward."""

    def __init__(self, channels: int, levels: int, steps: int, hidden: int, image: int, memcnn: bool = False):
        super().__init__()
        self.levels = levels
        self.memcnn = memcnn
        if memcnn:
            import memcnn as mc
        scales = []
        size = image
        seed = 0
        for c in level_channels(channels, levels, 2):
            size //= 2
            steps_here = []
            for _ in range(steps):
                seq = _freia_step(c, (size, size), hidden, seed)
                seed += 1
                if memcnn:
                    seq = mc.InvertibleModuleWrapper(_MemcnnStep(seq), keep_input=False, keep_input_inverse=False)
                steps_here.append(seq)
            scales.append(nn.ModuleList(steps_here))
        self.scales = nn.ModuleList(scales)

    def nll(self, x: Tensor, c: Optional[Tensor] = None) -> Tensor:
        latents = []
        logdet = x.new_zeros(x.shape[0])
        for i, steps in enumerate(self.scales):
            x = squeeze(x)
            if self.memcnn:  # MemCNN frees its input's storage: never hand it a shared one
                x = x.clone()
            for s in steps:
                x, ld = s(x)
                logdet = logdet + ld
            if i < self.levels - 1:
                x, z = split_channels(x)
                latents.append(z)
                if self.memcnn:
                    x = x.clone()
        latents.append(x)
        return gaussian_nll(latents, logdet)


class InvnetGlow(nn.Module):
    """invnet's own :class:`invnet.networks.Glow` (or :class:`~invnet.networks.ConditionalGlow`
    with a field condition), configured to match the peers: checkerboard squeeze, LU 1x1
    convolutions, the default conditioner (= :class:`~invnet.layers.ConvConditioner`). The whole
    network is one memory-saving autograd node that keeps only ``z`` (and ``c``);
    ``memory_saving=False`` runs plain autograd through the same blocks."""

    def __init__(
        self, channels: int, levels: int, steps: int, hidden: int, ndim: int = 2,
        cond_channels: int = 0, memory_saving: bool = True,
    ) -> None:
        super().__init__()
        from invnet.networks import ConditionalGlow, Glow

        kw = dict(hidden=hidden, levels=levels, depth=steps, ndim=ndim, squeeze="checkerboard", conv1x1="lu")
        if cond_channels:
            self.net = ConditionalGlow(channels, cond_channels, **kw)
        else:
            self.net = Glow(channels, **kw)
        self.memory_saving = memory_saving

    def nll(self, x: Tensor, c: Optional[Tensor] = None) -> Tensor:
        with invnet.memory_saving(self.memory_saving):
            z, logdet = self.net(x, c)
        return gaussian_nll([z], logdet)


def build(
    library: str, channels: int, levels: int, steps: int, hidden: int, image: int, ndim: int = 2,
    cond_channels: int = 0,
) -> nn.Module:
    """The matched Glow of ``library`` (one of :data:`LIBRARIES`)."""
    if library in ("invnet", "invnet-plain"):
        return InvnetGlow(channels, levels, steps, hidden, ndim, cond_channels, memory_saving=library == "invnet")
    if library in ("invnet-core", "invnet-core-plain"):
        return InvnetCoreGlow(channels, levels, steps, hidden, ndim, cond_channels,
                              memory_saving=library == "invnet-core")
    if ndim != 2 or cond_channels:
        raise ValueError(f"{library} is benchmarked on unconditional 2D images only (ndim=2), got ndim={ndim}")
    if library == "normflows":
        return NormflowsGlow(channels, levels, steps, hidden)
    if library == "freia":
        return FreiaGlow(channels, levels, steps, hidden, image, memcnn=False)
    if library == "memcnn-freia":
        return FreiaGlow(channels, levels, steps, hidden, image, memcnn=True)
    raise ValueError(f"library must be one of {LIBRARIES + EXTRA_LIBRARIES}, got {library!r}")
