r"""Posterior sampling for conditional flows: batched draws folded into streaming statistics.

For an observation :math:`y`, draws :math:`x^{(i)} = f^{-1}(T z^{(i)}; y)` in batches and folds
them into running statistics (:class:`~invnet.inference.moments.RunningMoments`), so the memory
used does not grow with the number of samples; given the truth it also counts, element-wise, the
samples below it (the truth's rank), from which calibration follows without keeping samples.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch
from torch import Tensor

from ..data.normalization import Normalization
from .moments import RunningMoments

__all__ = ["Sampler", "PosteriorSampler", "PosteriorSummary", "summarize_posterior"]


class Sampler(Protocol):
    """Anything that draws ``n`` posterior samples ``(n, *x_shape)`` given one observation."""

    def sample(self, n: int, y: Tensor, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None) -> Tensor: ...


class PosteriorSampler:
    r"""Posterior sampler of a trained conditional flow in raw data units: normalises the
    observation, draws :math:`\hat x = f^{-1}(T z; \hat y)` and maps the samples back,
    :math:`x = \sigma_x \hat x + \mu_x`.

    Args:
        model: a conditional :class:`~invnet.networks.FlowNetwork`.
        normalization: the statistics the model was trained with (identity when ``None``).
        x_shape: shape of one unknown ``(channels, *space)``, needed when the observation's
            grid differs from it (summary networks).

    >>> from invnet.networks import ConditionalCouplingFlow
    >>> s = PosteriorSampler(ConditionalCouplingFlow(1, 1, ndim=1, depth=1, hidden=4))
    >>> s.sample(5, torch.zeros(1, 8)).shape
    torch.Size([5, 1, 8])
    """

    def __init__(self, model, normalization: Optional[Normalization] = None,
                 x_shape: Optional[Sequence[int]] = None) -> None:
        self.model = model.eval()
        self.normalization = normalization
        self.x_shape = None if x_shape is None else tuple(int(v) for v in x_shape)

    @classmethod
    def from_checkpoint(cls, path: str) -> "PosteriorSampler":
        """Rebuild the network from a checkpoint's spec and weights (no code is unpickled)."""
        from ..training.checkpoint import read_checkpoint
        from ..training.config import torch_dtype
        from ..training.network_spec import build_network

        ckpt = read_checkpoint(path)  # a damaged file: CheckpointError naming it
        if not ckpt.meta.get("spec"):
            raise ValueError(f"checkpoint {ckpt.path} holds no network spec; it was not written by invnet train")
        data = ckpt.meta.get("data") or {}
        model = build_network(ckpt.meta["spec"]).to(torch_dtype(data.get("dtype", "float32")))
        try:
            model.load_state_dict(ckpt.weights)
        except RuntimeError as err:  # weights of another shape than the spec says
            reason = (str(err).strip().splitlines() or ["mismatch"])[0][:300]
            raise ValueError(f"{os.path.join(ckpt.path, 'model.safetensors')} does not fit the network in its "
                             f"meta.json: {reason}") from None
        norm = ckpt.meta.get("normalization")
        return cls(model, Normalization.from_dict(norm) if norm else None, data.get("x_shape"))

    @property
    def dtype(self) -> torch.dtype:
        p = next(iter(self.model.parameters()), None)
        return p.dtype if p is not None else torch.get_default_dtype()

    @torch.no_grad()
    def sample(self, n: int, y: Tensor, temperature: float = 1.0, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` samples given one raw observation ``y`` of shape ``(channels, *space)``."""
        c = torch.as_tensor(y).to(self.dtype)[None]
        if self.normalization is not None:
            c = self.normalization.y_to_normal(c)
        shape = None  # a fully convolutional network trained on patches samples on the observation's grid ...
        if self.x_shape is not None and (tuple(c.shape[2:]) != self.x_shape[1:]
                                         or getattr(self.model, "summary", None) is not None):
            shape = self.x_shape  # ... unless the condition cannot tell the grid (a summary network's output)
        x = self.model.sample(n, c, temperature=temperature, shape=shape, generator=generator)
        if self.normalization is not None:
            x = self.normalization.x_to_raw(x)
        return x


@dataclass
class PosteriorSummary:
    """Streaming summary of the posterior of one observation.

    ``below`` counts, element-wise, the samples smaller than the truth (its rank), from which
    interval coverage follows without keeping samples; ``sq_err_samples`` is
    :math:`\\frac1n\\sum_i \\|x^{(i)} - x\\|^2` (both only when the truth was given)."""

    mean: Tensor
    std: Tensor
    samples: Tensor
    n: int
    below: Optional[Tensor] = None
    sq_err_samples: Optional[float] = None


def summarize_posterior(
    sampler: Sampler, y: Tensor, n_samples: int, batch_size: int = 64, temperature: float = 1.0, keep: int = 4,
    truth: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
) -> PosteriorSummary:
    r"""Draw ``n_samples`` samples for observation ``y`` in batches of ``batch_size``; return the
    mean, standard deviation, the first ``keep`` samples and (given ``truth``) rank counts.

    >>> class Exact:  # posterior N(y, 1)
    ...     def sample(self, n, y, temperature=1.0, generator=None):
    ...         return y + temperature * torch.randn((n,) + tuple(y.shape), generator=generator, dtype=torch.float64)
    >>> s = summarize_posterior(Exact(), torch.zeros(1, 100), 400, batch_size=64, generator=torch.Generator().manual_seed(0))
    >>> bool(s.mean.abs().max() < 0.25), bool((s.std - 1).abs().max() < 0.15), tuple(s.samples.shape)
    (True, True, (4, 1, 100))
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be at least 2 (for a standard deviation), got {n_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    moments = RunningMoments()
    kept: list[Tensor] = []
    below = None
    sq = 0.0
    t = None if truth is None else torch.as_tensor(truth, dtype=torch.float64)
    done = 0
    while done < n_samples:
        m = min(batch_size, n_samples - done)
        s = sampler.sample(m, y, temperature=temperature, generator=generator).detach()
        moments.update(s)
        if len(kept) < keep:
            kept.extend(s[: keep - len(kept)].to(torch.float64).unbind(0))
        if t is not None:
            s64 = s.to(torch.float64)
            if s64.shape[1:] != t.shape:
                raise ValueError(f"truth has shape {tuple(t.shape)}, samples have {tuple(s64.shape[1:])}")
            count = (s64 < t).sum(0)
            below = count if below is None else below + count
            sq += float(((s64 - t) ** 2).reshape(m, -1).sum(1).sum())
        done += m
    samples = torch.stack(kept) if kept else torch.zeros((0,) + tuple(moments.mean.shape), dtype=torch.float64)
    return PosteriorSummary(moments.mean, moments.std(), samples, moments.n, below,
                            None if t is None else sq / n_samples)
