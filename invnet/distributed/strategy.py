r"""The parallel strategy of a job: how its processes share the work, in one object.

A job runs on a grid of ranks ``(batch_ranks, p_1, ..., p_d)`` (a
:class:`~invnet.distributed.Partition`): the samples of every batch are split over
``batch_ranks`` groups (data parallelism) and the space of every sample over ``p_1 x ... x p_d``
ranks (domain decomposition). One grid describes every case:

=================================  ==============================================
serial                             a grid of one, ``(1, 1, ..., 1)``
data parallel over N ranks         ``(N, 1, ..., 1)`` (the default under mpiexec)
one volume split over N ranks      ``(1, p_1, ..., p_d)``, ``prod(p) = N``
both                               ``(B, p_1, ..., p_d)``, ``B prod(p) = N``
=================================  ==============================================

The strategy owns what differs between them, so that the trainer, the sampler and the data
sources do not: what each rank reads (:meth:`shard`), whether the network is decomposed and
whether it can be (:meth:`check_network`, :meth:`prepare`), the one gradient reduction
(:meth:`reduce_gradients`), global statistics and loss sums (:meth:`global_mean`,
:meth:`sum_over_ranks`), joint decisions (:meth:`agree`) and who writes (:attr:`writes_replicated`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..data.shard import Shard
from .comm import Communicator, SerialComm
from .data_parallel import allreduce_gradients, broadcast_parameters, use_global_statistics
from .decompose import DecomposedFlow, check_decomposable, decompose
from .partition import Partition

__all__ = ["ParallelStrategy"]


class ParallelStrategy:
    r"""How the ranks of ``comm`` share a job on samples of space shape ``space_shape``.

    Args:
        space_shape: space shape of one sample as the network sees it (the patch, if training on
            patches); ``()`` for vectors.
        grid: ``(batch_ranks, p_1, ..., p_d)``; ``None``: data parallel over all ranks.
        comm: the job's communicator (serial by default).

    The grid is checked against the world and the space shape before any message (a one-line
    ``ValueError``, the same on every rank): rank count, divisibility; :meth:`check_network` then
    checks the network (squeeze levels, decomposability) before anything is read.

    Training with it (what :class:`~invnet.training.Trainer` does)::

        model = strategy.prepare(network)           # decomposed or replicated; parameters broadcast
        loss = loss_fn(model, batch).mean()          # per-sample losses: global, replicated in space
        loss.backward()
        strategy.reduce_gradients(model)             # one allreduce
        optimizer.step()

    >>> import torch, invnet
    >>> s = ParallelStrategy((8, 8))                   # serial: a grid of one
    >>> s.kind, s.grid, s.shard()
    ('serial', (1, 1, 1), Shard(group=0, groups=1, cell=(), cells=()))
    >>> net = s.prepare(invnet.networks.Glow(1, hidden=4, levels=1, depth=1, ndim=2))
    >>> loss = net.bits_per_dim(torch.randn(2, 1, 8, 8)).mean(); loss.backward()
    >>> s.reduce_gradients(net); s.global_mean(torch.tensor([1.0, 3.0]))
    2.0
    """

    def __init__(self, space_shape: Sequence[int], grid: Optional[Sequence[int]] = None,
                 comm: Optional[Communicator] = None) -> None:
        self.comm = comm if comm is not None else SerialComm()
        space_shape = tuple(int(s) for s in space_shape)
        if grid is None:
            grid = (self.comm.size,) + (1,) * len(space_shape)
        self.partition = Partition(space_shape, tuple(grid), self.comm)  # validates before any message

    # ------------------------------------------------------------------ the grid
    @property
    def grid(self) -> tuple[int, ...]:
        return self.partition.grid

    @property
    def batch_ranks(self) -> int:
        """Number of batch groups (the data-parallel degree)."""
        return self.partition.batch_ranks

    @property
    def batch_group(self) -> int:
        """This rank's batch group."""
        return self.partition.batch_coord

    @property
    def spatial_size(self) -> int:
        """Ranks that share one sample (the domain-decomposition degree)."""
        return self.partition.spatial_size

    @property
    def decomposed(self) -> bool:
        """Whether every sample is split over several ranks."""
        return self.spatial_size > 1

    @property
    def kind(self) -> str:
        """``"serial"``, ``"data parallel"``, ``"domain decomposition"`` or ``"batch x space"``."""
        if self.comm.size == 1:
            return "serial"
        if not self.decomposed:
            return "data parallel"
        return "domain decomposition" if self.batch_ranks == 1 else "batch x space"

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def writes_replicated(self) -> bool:
        """Whether this rank writes what every rank holds alike (checkpoints, metrics, logs,
        reports): world rank 0 only."""
        return self.comm.rank == 0

    @property
    def local_space_shape(self) -> tuple[int, ...]:
        """This rank's subdomain of one sample."""
        return self.partition.local_space_shape

    def describe(self) -> str:
        """One line for the log.

        >>> ParallelStrategy((16, 8)).describe()
        'serial: grid (1, 1, 1), 1 batch group(s) x 1 subdomain(s) of 16x8'
        """
        local = "x".join(map(str, self.local_space_shape)) or "vectors"
        return (f"{self.kind}: grid {self.grid}, {self.batch_ranks} batch group(s) x {self.spatial_size} "
                f"subdomain(s) of {local}")

    # ------------------------------------------------------------------ data
    def shard(self) -> Shard:
        """What this rank reads: its batch group's samples and, when space is split, its
        subdomain of each (see :class:`~invnet.data.shard.Shard`)."""
        if not self.decomposed:
            return Shard(self.batch_group, self.batch_ranks)
        return Shard(self.batch_group, self.batch_ranks, self.partition.coords, self.partition.space_grid)

    def check_data(self, x_shape: Sequence[int], y_shape: Optional[Sequence[int]] = None) -> None:
        """Check one sample's ``x`` (and observation ``y``) shapes ``(channels, *space)`` against
        the grid: ``x`` must have the strategy's space shape, and when space is split ``y`` must
        live on the grid of ``x`` (then it is split alike) or be a vector (then it is replicated).
        No messages."""
        space = tuple(x_shape[1:])
        if space != self.partition.space_shape:
            raise ValueError(f"the data have space shape {space}, the parallel grid was laid out for "
                             f"{self.partition.space_shape}")
        if self.decomposed and y_shape is not None and len(y_shape) > 1 and tuple(y_shape[1:]) != space:
            raise ValueError(
                f"on a grid that splits space ({self.grid}) the observation must live on the grid of x "
                f"{space} (it is split alike) or be a vector (it is replicated); it has space shape "
                f"{tuple(y_shape[1:])}"
            )

    # ------------------------------------------------------------------ the network
    def check_network(self, network: nn.Module, levels: Optional[int] = None) -> None:
        """Raise a one-line ``ValueError`` (the same on every rank, no messages) unless the
        network can run on this grid: when space is split, every local size even at each squeeze
        level, no self-padding convolution or ``patch`` squeeze, no summary network onto the grid
        of ``x`` (:func:`~invnet.distributed.check_decomposable`)."""
        if isinstance(network, DecomposedFlow):
            raise ValueError("pass the network itself: the strategy decomposes it")
        if self.decomposed:
            check_decomposable(network, self.partition, levels)

    def prepare(self, network: nn.Module) -> nn.Module:
        """The model to train or sample with: decomposed over the grid when space is split
        (:func:`~invnet.distributed.decompose`), the network itself otherwise; either way its
        ActNorms initialise from statistics over all ranks and rank 0's parameters are
        broadcast, so replicas start identical. Collective."""
        self.check_network(network)
        if self.decomposed:
            return decompose(network, self.partition)
        if self.comm.size > 1:
            use_global_statistics(network, self.comm)
            broadcast_parameters(network, self.comm)
        return network

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The network inside a prepared model (what checkpoints store: parameters are
        replicated, so the same weights serve any grid)."""
        return model.network if isinstance(model, DecomposedFlow) else model

    # ------------------------------------------------------------------ reductions
    def reduce_gradients(self, model: nn.Module) -> None:
        r"""The one gradient reduction: sum the gradients over the ranks that share a sample
        (each holds the partial gradient of its subdomain) and average them over batch groups
        (each holds the mean over its samples), in one allreduce. With a per-sample loss that is
        global (replicated over the ranks of a sample) and a mean over equal local batches, the
        result is the serial gradient of the global batch's mean loss. A no-op serially."""
        if self.comm.size > 1:
            allreduce_gradients(self.unwrap(model), self.comm, scale=1.0 / self.batch_ranks)

    def global_mean(self, per_sample: Tensor) -> float:
        """Mean of a per-sample quantity over every sample of every batch group (per-sample values
        are replicated over the ranks of a sample, which the ratio cancels). Collective."""
        local = torch.stack([per_sample.detach().double().sum().cpu(),
                             torch.tensor(float(per_sample.numel()), dtype=torch.float64)])
        total = self.comm.allreduce_sum(local) if self.comm.size > 1 else local
        return float(total[0] / total[1]) if float(total[1]) > 0 else float("nan")

    def sum_over_ranks(self, t: Tensor) -> Tensor:
        """Sum of a tensor over all ranks (for quantities each rank holds a disjoint part of)."""
        return self.comm.allreduce_sum(t) if self.comm.size > 1 else t

    def agree(self, flag: bool) -> bool:
        """True on every rank if true on any (stop now, checkpoint now). Collective."""
        return self.comm.agree(flag)

    def __repr__(self) -> str:
        return f"ParallelStrategy({self.describe()}, rank {self.rank})"
