r"""Differentiable sum over ranks for quantities that add up across subdomains (logdets,
log-densities, losses).

On a decomposed volume each rank holds a partial :math:`\ell_r` of a per-sample quantity
:math:`\ell = \sum_r \ell_r`. :func:`sum_over_ranks` returns :math:`\ell` on every rank. Every
rank then computes the same ("replicated") loss :math:`L(\ell)`, which counts once, not once per
rank, so the gradient of the local partial is :math:`\partial L/\partial \ell_r = \partial
L/\partial \ell`: the backward is the identity (no message). Parameter gradients, which are then
partial per rank, are summed by the caller (one flat allreduce per step).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .comm import Communicator

__all__ = ["sum_over_ranks"]


class _SumReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, comm: Communicator) -> Tensor:
        return comm.allreduce_sum(x.detach())

    @staticmethod
    def backward(ctx: FunctionCtx, g: Tensor):
        return g, None


def sum_over_ranks(x: Tensor, comm: Communicator) -> Tensor:
    r""":math:`\sum_r x_r` on every rank of ``comm``, differentiable for a replicated loss (the
    backward passes the cotangent through unchanged; see the module docstring).

    >>> import torch
    >>> from invnet.distributed.comm import SerialComm
    >>> sum_over_ranks(torch.tensor([1.0, 2.0]), SerialComm()).tolist()
    [1.0, 2.0]
    """
    if comm.size == 1:
        return x
    return _SumReplicated.apply(x, comm)
