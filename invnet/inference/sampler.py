r"""Posterior sampling for conditional flows: batched draws folded into streaming statistics.

For an observation :math:`y`, draws :math:`x^{(i)} = f^{-1}(T z^{(i)}; y)` in batches and folds
them into running statistics (:class:`~invnet.inference.moments.RunningMoments`), so the memory
used does not grow with the number of samples; given the truth it also counts, element-wise, the
samples below it (the truth's rank), from which calibration follows without keeping samples.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol, Sequence, Union

import torch
from torch import Tensor

from ..data.normalization import Normalization
from .moments import RunningMoments
from .noise import TiledNoise

if TYPE_CHECKING:
    from ..distributed.decompose import DecomposedFlow
    from ..distributed.partition import Partition
    from ..distributed.strategy import ParallelStrategy
    from ..networks.base import FlowNetwork
    from ..training.precision import Precision

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
        model: a conditional :class:`~invnet.networks.FlowNetwork`, or one decomposed over a
            parallel grid (:class:`~invnet.distributed.DecomposedFlow`: observations and samples
            are then this rank's subdomain).
        normalization: the statistics the model was trained with (identity when ``None``).
        x_shape: shape of one unknown ``(channels, *space)``, needed when the observation's
            grid differs from it (summary networks).
        device: where to compute (default: where the model is); samples come back on the CPU.
        precision: a :class:`~invnet.training.precision.Precision` (or its name) whose autocast
            the inverse runs under (default: the model's dtype, no autocast).

    Noise: ``generator`` in :meth:`sample` is a ``torch.Generator`` (or ``None``: the global
    one), or a :class:`~invnet.inference.noise.TiledNoise`, whose latents do not depend on how
    the volume is split (what ``invnet sample`` uses).

    >>> from invnet.networks import ConditionalCouplingFlow
    >>> s = PosteriorSampler(ConditionalCouplingFlow(1, 1, ndim=1, depth=1, hidden=4))
    >>> s.sample(5, torch.zeros(1, 8)).shape
    torch.Size([5, 1, 8])
    """

    def __init__(self, model: Union[FlowNetwork, DecomposedFlow], normalization: Optional[Normalization] = None,
                 x_shape: Optional[Sequence[int]] = None, device: Optional[torch.device] = None,
                 precision: Optional[Precision | str] = None) -> None:
        from ..training.precision import Precision

        self.model = model.eval()
        self.normalization = normalization
        self.x_shape = None if x_shape is None else tuple(int(v) for v in x_shape)
        ref = next(iter(model.parameters()), None)
        self.device = device if device is not None else (ref.device if ref is not None else torch.device("cpu"))
        self.precision = precision if isinstance(precision, Precision) else (
            Precision(precision) if precision is not None else Precision.of_model(model))

    @classmethod
    def from_checkpoint(cls, path: str, device: Optional[str | torch.device] = None,
                        strategy: Optional[ParallelStrategy] = None) -> PosteriorSampler:
        """Rebuild the network from a checkpoint's spec and weights (no code is unpickled), in the
        run's precision, on ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``, ...; default the CPU),
        decomposed over ``strategy``'s grid when it splits space."""
        from ..training.checkpoint import read_checkpoint
        from ..training.device import resolve_device
        from ..training.network_spec import build_network
        from ..training.precision import Precision

        ckpt = read_checkpoint(path)  # a damaged file: CheckpointError naming it
        if not ckpt.meta.get("spec"):
            raise ValueError(f"checkpoint {ckpt.path} holds no network spec; it was not written by invnet train")
        data = ckpt.meta.get("data") or {}
        precision = Precision((ckpt.meta.get("run") or {}).get("precision") or data.get("dtype", "float32"))
        model = build_network(ckpt.meta["spec"]).to(precision.parameter_dtype)  # (older runs: dtype)
        if strategy is not None:
            strategy.check_network(model)
        try:
            model.load_state_dict(ckpt.weights)
        except RuntimeError as err:  # weights of another shape than the spec says
            reason = (str(err).strip().splitlines() or ["mismatch"])[0][:300]
            raise ValueError(f"{os.path.join(ckpt.path, 'model.safetensors')} does not fit the network in its "
                             f"meta.json: {reason}") from None
        where = resolve_device(device or "cpu", None if strategy is None else strategy.comm)
        model.to(where)
        if strategy is not None:
            model = strategy.prepare(model)
        norm = ckpt.meta.get("normalization")
        return cls(model, Normalization.from_dict(norm) if norm else None, data.get("x_shape"), where, precision)

    @property
    def dtype(self) -> torch.dtype:
        p = next(iter(self.model.parameters()), None)
        return p.dtype if p is not None else torch.get_default_dtype()

    @torch.no_grad()
    def sample(self, n: int, y: Tensor, temperature: float = 1.0,
               generator: Optional[torch.Generator | TiledNoise] = None) -> Tensor:
        """``n`` samples given one raw observation ``y`` of shape ``(channels, *space)`` (this
        rank's subdomain of it for a decomposed model whose observation lives on the grid)."""
        from ..distributed.decompose import DecomposedFlow

        c = torch.as_tensor(y).to(self.dtype)[None]
        if self.normalization is not None:
            c = self.normalization.y_to_normal(c)
        c = c.to(self.device)
        part = self.model.partition if isinstance(self.model, DecomposedFlow) else None
        shape = None  # a fully convolutional network trained on patches samples on the observation's grid ...
        if self.x_shape is not None and (tuple(c.shape[2:]) != self.x_shape[1:]
                                         or getattr(self.model, "summary", None) is not None):
            shape = self.x_shape  # ... unless the condition cannot tell the grid (a summary network's output)
            if part is not None:
                shape = (shape[0],) + part.local_space_shape
        with self.precision.autocast(self.device):
            if isinstance(generator, TiledNoise):
                x = self._inverse_of_noise(n, c, shape, temperature, generator, part)
            else:
                x = self.model.sample(n, c, temperature=temperature, shape=shape, generator=generator)
        x = x.to("cpu", self.dtype)
        if self.normalization is not None:
            x = self.normalization.x_to_raw(x)
        return x

    def _inverse_of_noise(
        self, n: int, c: Tensor, shape: Optional[tuple[int, ...]], temperature: float, noise: TiledNoise,
        part: Optional[Partition],
    ) -> Tensor:
        """``x = f^{-1}(T z; c)`` with ``z`` this rank's block of the grid-independent latents."""
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        cond = self.model.condition(c)
        if cond is not None and n > 1:
            cond = cond.expand((n,) + tuple(cond.shape[1:]))
        shape = self.model.sample_shape(cond, shape)
        z_shape = self.model.latent_shape((n,) + tuple(shape), None if cond is None else tuple(cond.shape))
        local = tuple(z_shape[2:])
        grid = part.space_grid if part is not None else (1,) * len(local)
        coords = part.coords if part is not None else (0,) * len(local)
        space = tuple(m * p for m, p in zip(local, grid))  # the latent's blocks are proportional to x's
        block = tuple(slice(k * m, (k + 1) * m) for k, m in zip(coords, local))
        z = noise.draw(n, z_shape[1], space, block).to(self.device, self.dtype)
        x, _ = self.model.inverse(temperature * z, cond)
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
    >>> gen = torch.Generator().manual_seed(0)
    >>> s = summarize_posterior(Exact(), torch.zeros(1, 100), 400, batch_size=64, generator=gen)
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
