r"""Domain decomposition of a built invertible network over a :class:`Partition`.

:func:`decompose` walks the module tree once and

* replaces every :class:`invnet.layers.ZeroPad` (placed before each convolution with reach) by a
  :class:`~invnet.distributed.HaloPad` of the same width: convolutions then see their neighbours'
  cells, and zeros only at the global border;
* makes every :class:`invnet.layers.ActNorm` initialise from statistics summed over all ranks;
* checks what cannot be decomposed: convolutions that pad by themselves, ``patch`` squeezes
  (their blocks span the global domain), and local sizes that turn odd at some squeeze level;
* broadcasts parameters and buffers from rank 0 (replicas start identical);

and wraps the network in :class:`DecomposedFlow`, which sums the logdet (and ``log_prob``) over
the ranks that share a volume and sums parameter gradients over them in one allreduce.
Pointwise blocks (ActNorm, 1x1 convolutions, the coupling's affine map, activations, checkerboard
and Haar squeezes on even local offsets) are local and need no messages.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..core.module import GradStore, InvertibleModule, Shape, VJPResult
from ..layers.conditioners import ZeroPad
from ..layers.squeeze import Squeeze, SqueezeBase
from ..networks.base import FlowNetwork
from ..networks.density import StandardNormal
from .data_parallel import allreduce_gradients, broadcast_parameters, use_global_statistics
from .halo import HaloPad
from .partition import Partition
from .reduce import sum_over_ranks

__all__ = ["decompose", "DecomposedFlow", "count_squeezes", "check_decomposable"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def count_squeezes(network: nn.Module) -> int:
    """Number of squeeze modules in ``network`` (the squeeze levels a multiscale flow applies).

    >>> import invnet
    >>> count_squeezes(invnet.Chain(invnet.layers.Squeeze(), invnet.layers.HaarSqueeze()))
    2
    """
    return sum(1 for m in network.modules() if isinstance(m, SqueezeBase))


def _replicated_summary(network: nn.Module) -> Optional[nn.Module]:
    """A summary network whose output is a vector: it reads the whole observation on every rank
    and computes the same condition everywhere (its gradients, partial per rank through ``dc``,
    add up in the one gradient reduction), so it is left as it is."""
    summary = getattr(network, "summary", None)
    return summary if isinstance(summary, nn.Module) and getattr(network, "vector_condition", False) else None


def _modules_outside(network: nn.Module, skip: Optional[nn.Module]) -> list[tuple[str, nn.Module]]:
    """``named_modules`` of ``network`` without the subtree of ``skip``."""
    inside = set() if skip is None else {id(m) for m in skip.modules()}
    return [(name, m) for name, m in network.named_modules() if id(m) not in inside]


def check_decomposable(network: nn.Module, partition: Partition, levels: Optional[int] = None) -> None:
    """Raise a one-line ``ValueError`` unless ``network`` can run on ``partition``'s subdomains:
    no convolution that pads by itself, no ``patch`` squeeze (its blocks span the whole domain)
    when space is split, no summary network that maps the observation onto the grid of ``x``
    (it resamples the whole observation; a summary to a vector is replicated and fine), and even
    local sizes at each of ``levels`` squeeze levels (default: the squeezes counted in the
    network). Local arithmetic only, identical on every rank: nothing is sent, nothing changes.

    >>> import invnet
    >>> from invnet.distributed import Partition, SerialComm
    >>> check_decomposable(invnet.Chain(invnet.layers.Squeeze(ndim=1)), Partition((6,), (1, 1), SerialComm()))
    """
    spatial = partition.spatial_size > 1
    summary = getattr(network, "summary", None)
    replicated = _replicated_summary(network)
    if spatial and isinstance(summary, nn.Module) and replicated is None:
        raise ValueError(
            f"the summary network {type(summary).__name__} maps the observation onto the grid of x and "
            f"cannot be decomposed (it resamples the whole observation); on a grid that splits space "
            f"({partition.grid}) use a summary to a vector (vector_condition), no summary, or one spatial rank"
        )
    for name, m in _modules_outside(network, replicated):
        where = name or type(network).__name__
        if isinstance(m, _CONVS):
            pads = m.padding if isinstance(m.padding, tuple) else (m.padding,)
            if m.padding == "same" or any(p != 0 for p in pads if isinstance(p, int)):
                raise ValueError(
                    f"{where} ({type(m).__name__}) pads by itself (padding={m.padding}); a decomposable "
                    f"network needs padding=0 and a ZeroPad module before the convolution"
                )
        if spatial and isinstance(m, Squeeze) and m.pattern != "checkerboard":
            raise ValueError(
                f"{where}: Squeeze(pattern={m.pattern!r}) moves cells across the whole domain and cannot be "
                f"decomposed; use pattern='checkerboard' or HaarSqueeze"
            )
        if isinstance(m, HaloPad):
            raise ValueError(f"{where} is already decomposed (it contains a HaloPad)")
    partition.check_levels(count_squeezes(network) if levels is None else levels)


def _swap_pads(network: nn.Module, partition: Partition) -> int:
    count = 0
    for _, parent in _modules_outside(network, _replicated_summary(network)):
        for name, child in list(parent._modules.items()):
            if isinstance(child, ZeroPad):
                parent._modules[name] = HaloPad(partition, child.ndim, child.width)
                count += 1
    return count


class DecomposedFlow(FlowNetwork):
    r"""A network running on this rank's subdomain of each volume of a :class:`Partition`.

    The input is the local block ``(local_batch, channels, *local_space)``; the output is the
    local block of the latent. The logdet is the global one,

    .. math:: \log|\det J_f(x)| = \sum_{r \in \text{spatial}} \ell_r,

    summed over the ranks sharing the volume (a replicated value: every spatial rank of a batch
    group returns the same numbers), and ``log_prob`` likewise. The backward is local plus the
    halo adjoints inside the conditioners; call :meth:`reduce_gradients` after ``backward`` to sum
    parameter gradients over spatial ranks and average them over batch groups (one allreduce).

    Spatial (and combined sample-spatial) decomposition of convolutions by halo exchange, as in
    "Improving Strong-Scaling of CNN Training by Exploiting Finer-Grained Parallelism" (Dryden et
    al., 2019, arXiv:1903.06681), applied here to invertible flows with memory-free backward.

    Build with :func:`decompose`.
    """

    #: a memory budget would let each rank choose its kept blocks from its own timings, and ranks
    #: that keep different blocks exchange different halo messages in the backward
    memory_budget_supported = False

    def __init__(self, network: InvertibleModule, partition: Partition) -> None:
        super().__init__()
        self.network = network
        self.partition = partition
        self.ndim = partition.ndim
        self.channels = getattr(network, "channels", None)
        self.cond_channels = getattr(network, "cond_channels", 0)
        self.base = getattr(network, "base", StandardNormal())

    def _check_shape(self, shape: Shape, c_shape: Optional[Shape], inverse: bool) -> Shape:
        local = self.partition.local_space_shape
        if not inverse and tuple(shape[2:]) != local:
            raise ValueError(
                f"this rank expects its subdomain with space shape {local} (global {self.partition.space_shape} "
                f"over grid {self.partition.grid}), got shape {tuple(shape)}"
            )
        if c_shape is not None and len(c_shape) > 2 and not inverse and tuple(c_shape[2:]) != local:
            raise ValueError(
                f"the condition must be split like the data (space shape {local} on this rank), got {tuple(c_shape)}"
            )
        return self.network.check_shape(shape, c_shape, inverse)

    def _forward(self, x: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        z, logdet = self.network._forward(x, c)
        return z, sum_over_ranks(logdet, self.partition.spatial)

    def _inverse(self, z: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        x, logdet = self.network._inverse(z, c)
        return x, sum_over_ranks(logdet, self.partition.spatial)

    # The reduced logdet's cotangent is replicated over spatial ranks, and the sum's adjoint for a
    # replicated loss is the identity: the wrapped network's own backward is the right one.
    def _vjp(self, z: Tensor, dz: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        return self.network._vjp(z, dz, dlogdet, c, grads)

    def _vjp_inverse(self, x: Tensor, dx: Tensor, dlogdet: Tensor, c: Optional[Tensor], grads: GradStore) -> VJPResult:
        return self.network._vjp_inverse(x, dx, dlogdet, c, grads)

    def sample_shape(self, c: Optional[Tensor] = None, shape: Optional[tuple[int, ...]] = None) -> tuple[int, ...]:
        """Shape of this rank's block of one sample (the wrapped network's rule, on local data).

        Sampling draws this rank's block of the latent from whatever generator the caller passes
        to :meth:`sample` (the global RNG when none): nothing here seeds ranks differently. For
        independent noise across the volume, give each spatial rank its own stream (for example
        a generator seeded with the base seed plus the rank); ranks sharing a seed draw the same
        block everywhere."""
        inner = getattr(self.network, "sample_shape", None)
        if inner is not None:
            return inner(c, shape)
        return super().sample_shape(c, shape)

    def condition(self, c: Optional[Tensor]) -> Optional[Tensor]:
        """The wrapped network's condition (its summary network's output, if it has one)."""
        return self.network.condition(c) if isinstance(self.network, FlowNetwork) else c

    def log_prob(self, x: Tensor, c: Optional[Tensor] = None) -> Tensor:
        """Global :math:`\\log q(x|c)` per local sample (replicated over spatial ranks)."""
        z, logdet = self(x, self.condition(c))
        return sum_over_ranks(self.base.log_prob(z), self.partition.spatial) + logdet

    def bits_per_dim(self, x: Tensor, c: Optional[Tensor] = None, bin_width: float = 1.0) -> Tensor:
        """Negative log-likelihood in bits per dimension of the global sample."""
        from ..networks.density import bits_per_dim

        dims = x[0].numel() * self.partition.spatial_size
        return bits_per_dim(self.log_prob(x, c), dims, bin_width)

    def reduce_gradients(self) -> None:
        """Sum parameter gradients over spatial ranks and average them over batch groups (one
        flat allreduce over all ranks)."""
        allreduce_gradients(self.network, self.partition.world, scale=1.0 / self.partition.batch_ranks)

    def scatter(self, global_tensor: Optional[Tensor], root: int = 0) -> Tensor:
        """This rank's block of a global array held by ``root`` (see :meth:`Partition.scatter`)."""
        return self.partition.scatter(global_tensor, root)

    def gather(self, local: Tensor, root: int = 0) -> Optional[Tensor]:
        """The global array on ``root`` (see :meth:`Partition.gather`)."""
        return self.partition.gather(local, root)


def decompose(network: InvertibleModule, partition: Partition, levels: Optional[int] = None) -> DecomposedFlow:
    r"""Prepare a built network to run on a partitioned volume (modifies ``network`` in place:
    pads become halo exchanges, ActNorms use global statistics) and wrap it.

    Validation (local arithmetic, identical on every rank) comes first, so a bad configuration
    fails everywhere before any message; then rank 0's parameters are broadcast.

    Args:
        network: an invertible network whose spatial convolutions follow ``ZeroPad`` modules.
        partition: the process grid and volume.
        levels: squeeze levels to check even local sizes for (default: the number of squeeze
            modules in ``network``).

    >>> import torch, invnet
    >>> from invnet.distributed import Partition, decompose
    >>> from invnet.distributed.comm import SerialComm
    >>> net = invnet.Chain(invnet.layers.ActNorm(2), invnet.layers.AffineCoupling(2, hidden=4, ndim=2))
    >>> flow = decompose(net, Partition((4, 4), grid=(1, 1, 1), comm=SerialComm()))
    >>> z, logdet = flow(torch.randn(3, 2, 4, 4))
    >>> z.shape, logdet.shape
    (torch.Size([3, 2, 4, 4]), torch.Size([3]))
    """
    if not isinstance(network, InvertibleModule):
        raise ValueError(f"decompose takes an InvertibleModule, got {type(network).__name__}")
    if not isinstance(partition, Partition):
        raise ValueError(f"decompose takes a Partition, got {type(partition).__name__}")
    net_ndim = getattr(network, "ndim", None)
    if net_ndim is not None and net_ndim != partition.ndim:
        raise ValueError(f"network has {net_ndim} space dimension(s) but the partition {partition.ndim}")
    check_decomposable(network, partition, levels)
    _swap_pads(network, partition)
    use_global_statistics(network, partition.world)
    broadcast_parameters(network, partition.world)
    return DecomposedFlow(network, partition)
