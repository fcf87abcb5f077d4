"""Shape helpers shared by blocks and networks: channel-first tensors ``(N, C, *space)`` with 0
to 3 space dimensions (0: plain vectors ``(N, C)``)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

__all__ = ["broadcast_channel", "reduce_dims", "space_size", "sum_per_sample", "check_condition"]


def broadcast_channel(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-channel vector ``(C,)`` to broadcast against ``(N, C, *space)``.

    >>> import torch
    >>> broadcast_channel(torch.ones(3), torch.zeros(2, 3, 4, 5)).shape
    torch.Size([1, 3, 1, 1])
    """
    return v.reshape((1, -1) + (1,) * (like.dim() - 2))


def reduce_dims(t: Tensor) -> list[int]:
    """All dimensions but the channel one.

    >>> import torch
    >>> reduce_dims(torch.zeros(2, 3, 4, 5))
    [0, 2, 3]
    """
    return [0] + list(range(2, t.dim()))


def space_size(t: Tensor) -> int:
    """Number of space points of a ``(N, C, *space)`` tensor (1 for vectors).

    >>> import torch
    >>> space_size(torch.zeros(2, 3, 4, 5)), space_size(torch.zeros(2, 3))
    (20, 1)
    """
    n = 1
    for s in t.shape[2:]:
        n *= int(s)
    return n


def sum_per_sample(t: Tensor) -> Tensor:
    """Sum over every dimension but the batch one.

    >>> import torch
    >>> sum_per_sample(torch.ones(2, 3, 4)).tolist()
    [12.0, 12.0]
    """
    return t.reshape(t.shape[0], -1).sum(1)


def check_condition(
    owner: str, shape: tuple[int, ...], c_shape: Optional[tuple[int, ...]], cond_channels: int
) -> None:
    """Validate a condition for a block that takes ``cond_channels`` condition channels.

    A condition is either ``(N, cond_channels, *space)`` with the same space shape as the input,
    or a vector ``(N, cond_channels)`` that is broadcast over space. Raises ``ValueError`` naming
    both accepted shapes.

    >>> check_condition("Block", (2, 4, 8, 8), (2, 3), 3)  # a vector: fine
    >>> check_condition("Block", (2, 4, 8, 8), (2, 3, 4, 4), 3)
    Traceback (most recent call last):
    ...
    ValueError: Block: condition c must have shape (2, 3, *(8, 8)) or (2, 3); got (2, 3, 4, 4)
    for input of shape (2, 4, 8, 8)
    """
    if cond_channels == 0:
        return
    if c_shape is None:
        raise ValueError(f"{owner} was built with cond_channels={cond_channels} and needs a condition c")
    space = shape[2:]
    ok_vector = len(c_shape) == 2
    ok_field = len(c_shape) == len(shape) and tuple(c_shape[2:]) == tuple(space)
    if c_shape[0] != shape[0] or c_shape[1] != cond_channels or not (ok_vector or ok_field):
        raise ValueError(
            f"{owner}: condition c must have shape ({shape[0]}, {cond_channels}, *{tuple(space)}) "
            f"or ({shape[0]}, {cond_channels}); got {tuple(c_shape)} for input of shape {tuple(shape)}"
        )
