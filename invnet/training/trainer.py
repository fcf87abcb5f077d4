"""The trainer: maximum likelihood of p(x | y) with checkpoints, resume and preemption."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from ..data.loader import BatchLoader
from ..data.normalization import Normalization
from ..networks.base import FlowNetwork
from ..plotting import plot_metrics
from .checkpoint import Checkpoint, capture_rng, latest_checkpoint, read_checkpoint, restore_rng, save_checkpoint
from .comm import Comm, SerialComm, average_gradients
from .metrics import MetricsLog, peak_memory_mb
from .signals import NonFiniteLossError, PreemptionFlag

__all__ = ["Trainer", "TrainResult"]


@dataclass
class TrainResult:
    """Outcome of :meth:`Trainer.fit`: ``status`` is ``"finished"``, ``"preempted"`` (SIGTERM or
    SIGUSR1) or ``"interrupted"`` (Ctrl-C); ``signal`` names the signal that stopped the run."""

    status: str
    step: int
    checkpoint: Optional[str]
    metrics_path: str
    last_train_bpd: Optional[float]
    last_val_bpd: Optional[float]
    signal: Optional[str] = None


class Trainer:
    r"""Maximum-likelihood training of a conditional flow on pairs: minimise the mean negative
    log-likelihood :math:`-\log q_\theta(x \mid y)` in bits per dimension (normalised data), as in
    "Glow" (Kingma and Dhariwal, 2018, arXiv:1807.03039).

    One step: read a batch, loss, backward (memory-free through the flow), average gradients over
    ranks (``comm``), clip, optimizer and scheduler step. Around it:

    * metrics to ``out_dir/metrics.jsonl`` (train bits/dim, learning rate, gradient norm, step
      time, peak memory; validation bits/dim every ``validate_every`` steps) and a plot
      ``metrics.png`` at the end;
    * checkpoints every ``checkpoint_every_steps`` steps and/or ``checkpoint_every_minutes``
      minutes (and at the end), keeping the last ``keep_last``; :meth:`resume` restores weights,
      optimizer, scheduler, every RNG, the data position and the metrics file, so the resumed run
      equals one never stopped (bitwise on CPU);
    * SIGTERM/SIGUSR1: a checkpoint is written after the current step and ``fit`` returns status
      ``"preempted"`` (the command exits with :data:`~invnet.training.signals.EXIT_PREEMPTED`);
      SIGINT (Ctrl-C) likewise with status ``"interrupted"`` (exit 130), and a second one stops at once;
    * a NaN/Inf loss or gradient norm raises :class:`NonFiniteLossError` before the optimizer
      step; no checkpoint is written then, so the last good one stays the latest.

    Distributed hook: ``comm`` (rank, size, allreduce, bcast; serial by default). Every rank
    computes; only rank 0 writes files and shows progress.

    Args:
        model: a :class:`FlowNetwork` taking ``(x, c=y)``.
        optimizer, scheduler: any torch optimizer and (optional) LR scheduler stepped per step.
        loader: the training batches (:class:`BatchLoader`, its position is checkpointed).
        out_dir: run directory (metrics, plot, ``checkpoints/``).
        steps: total optimizer steps.
        validation: optional callable returning an iterable of normalised ``(x, y)`` batches.
        normalization, spec, data_info: stored in checkpoints (``spec`` rebuilds the network).
        clip_grad_norm: optional max gradient norm.
        generators: extra named torch generators whose state is checkpointed.

    >>> import tempfile, numpy as np, torch
    >>> from invnet.data import ArraySource, PairDataset, BatchLoader
    >>> from invnet.networks import ConditionalCouplingFlow
    >>> ds = PairDataset(ArraySource(np.random.randn(16, 2).astype("f4"), "x"), ArraySource(np.random.randn(16, 1).astype("f4"), "y"))
    >>> net = ConditionalCouplingFlow(2, 1, ndim=0, depth=2, hidden=8)
    >>> trainer = Trainer(net, torch.optim.Adam(net.parameters(), 1e-3), BatchLoader(ds, range(16), 8), tempfile.mkdtemp(), steps=3, progress=False)
    >>> result = trainer.fit()
    >>> result.status, result.step
    ('finished', 3)
    """

    def __init__(
        self,
        model: FlowNetwork,
        optimizer: torch.optim.Optimizer,
        loader: BatchLoader,
        out_dir: str,
        steps: int,
        scheduler: Optional[object] = None,
        validation: Optional[Callable[[], Iterable[tuple[Tensor, Tensor]]]] = None,
        normalization: Optional[Normalization] = None,
        spec: Optional[dict] = None,
        data_info: Optional[dict] = None,
        clip_grad_norm: Optional[float] = None,
        validate_every: Optional[int] = None,
        log_every: int = 1,
        checkpoint_every_steps: Optional[int] = None,
        checkpoint_every_minutes: Optional[float] = None,
        keep_last: int = 3,
        progress: bool = True,
        comm: Optional[Comm] = None,
        generators: Optional[dict[str, torch.Generator]] = None,
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be positive, got {steps}")
        for name, v in (("log_every", log_every), ("keep_last", keep_last), ("validate_every", validate_every),
                        ("checkpoint_every_steps", checkpoint_every_steps)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v}")
        if checkpoint_every_minutes is not None and not checkpoint_every_minutes > 0:
            raise ValueError(f"checkpoint_every_minutes must be positive, got {checkpoint_every_minutes}")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be positive, got {clip_grad_norm}")
        self.model, self.optimizer, self.scheduler, self.loader = model, optimizer, scheduler, loader
        self.out_dir, self.steps = out_dir, int(steps)
        self.validation, self.normalization, self.spec = validation, normalization, spec
        self.data_info = data_info or {}
        self.clip_grad_norm, self.validate_every, self.log_every = clip_grad_norm, validate_every, log_every
        self.checkpoint_every_steps, self.checkpoint_every_minutes = checkpoint_every_steps, checkpoint_every_minutes
        self.keep_last, self.progress = keep_last, progress
        self.comm: Comm = comm or SerialComm()
        self.generators = generators or {}
        self.step = 0
        self.checkpoint_dir = os.path.join(out_dir, "checkpoints")
        self.metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"))
        self.last_checkpoint: Optional[str] = None
        self.last_train_bpd: Optional[float] = None
        self.last_val_bpd: Optional[float] = None
        if self.is_root:
            os.makedirs(out_dir, exist_ok=True)

    @property
    def is_root(self) -> bool:
        return self.comm.rank == 0

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Optional[str]:
        """Write a checkpoint of the current step (rank 0 only); returns its path."""
        if not self.is_root:
            return None
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": capture_rng(self.generators),
            "loader": self.loader.state_dict(),
            "step": self.step,
        }
        meta = {
            "spec": self.spec,
            "normalization": self.normalization.to_dict() if self.normalization is not None else None,
            "data": self.data_info,
            "last_train_bpd": self.last_train_bpd,
            "last_val_bpd": self.last_val_bpd,
            "steps_planned": self.steps,
        }
        self.last_checkpoint = save_checkpoint(self.checkpoint_dir, self.step, self.model.state_dict(), state, meta,
                                               self.keep_last)
        return self.last_checkpoint

    def resume(self, checkpoint: "Optional[str | Checkpoint]" = None) -> bool:
        """Restore the latest checkpoint of this run (or ``checkpoint``, a path or one already
        read). Returns False when there is none; raises ``ValueError`` when it does not fit."""
        if checkpoint is None:
            checkpoint = latest_checkpoint(self.checkpoint_dir)
            if checkpoint is None:
                return False
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
        try:
            missing, unexpected = self.model.load_state_dict(ckpt.weights, strict=False)
            if missing or unexpected:
                raise ValueError(f"missing {missing}, unexpected {unexpected}")
            self.optimizer.load_state_dict(ckpt.state["optimizer"])
            if self.scheduler is not None and ckpt.state["scheduler"] is not None:
                self.scheduler.load_state_dict(ckpt.state["scheduler"])
            restore_rng(ckpt.state["rng"], self.generators)
            self.loader.load_state_dict(ckpt.state["loader"])
            self.step = int(ckpt.state["step"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:  # a network or optimizer of another shape
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise ValueError(f"checkpoint {ckpt.path} does not fit this network/optimizer: {reason}") from None
        self.last_train_bpd, self.last_val_bpd = ckpt.meta.get("last_train_bpd"), ckpt.meta.get("last_val_bpd")
        self.last_checkpoint = ckpt.path
        if self.is_root:
            self.metrics.truncate_after(self.step)
        return True

    # ------------------------------------------------------------------ steps
    def _mean_over_ranks(self, value: float) -> float:
        if self.comm.size == 1:
            return value
        return float(self.comm.allreduce(torch.tensor([value], dtype=torch.float64))[0]) / self.comm.size

    def validate(self) -> Optional[float]:
        """Mean validation NLL (bits/dim) over all validation samples (all ranks' shares)."""
        if self.validation is None:
            return None
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in self.validation():
                total += float(self.model.bits_per_dim(x, y).sum())
                count += x.shape[0]
        both = self.comm.allreduce(torch.tensor([total, float(count)], dtype=torch.float64))
        return float(both[0] / both[1]) if float(both[1]) > 0 else None

    def _train_step(self) -> dict:
        t0 = time.perf_counter()
        x, y = self.loader.next_batch()
        self.model.train()
        loss = self.model.bits_per_dim(x, y).mean()
        value = self._mean_over_ranks(float(loss.detach()))
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"the training loss became {value} at step {self.step + 1}; training stopped before the update. "
                f"Last good checkpoint: {self.last_checkpoint or 'none written yet'}. "
                "Try a lower learning rate, gradient clipping, or check the data and normalisation."
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        average_gradients(params, self.comm)
        if self.clip_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm))
        else:
            norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None)))
        if not math.isfinite(norm):
            raise NonFiniteLossError(
                f"the gradient norm became {norm} at step {self.step + 1}; training stopped before the update. "
                f"Last good checkpoint: {self.last_checkpoint or 'none written yet'}."
            )
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        self.last_train_bpd = value
        return {"step": self.step, "epoch": self.loader.epoch, "train_bpd": value,
                "lr": float(self.optimizer.param_groups[0]["lr"]), "grad_norm": norm,
                "step_time_s": time.perf_counter() - t0, "peak_memory_mb": peak_memory_mb()}

    def fit(self) -> TrainResult:
        """Train up to ``steps`` (continuing from the current step after :meth:`resume`)."""
        from tqdm import tqdm

        status, at_once = "finished", False
        last_save = time.monotonic()
        bar = tqdm(total=self.steps, initial=self.step, disable=not (self.progress and self.is_root),
                   desc="train", dynamic_ncols=True)
        try:
            with PreemptionFlag() as flag:
                while self.step < self.steps:
                    record = self._train_step()
                    due_val = self.validate_every is not None and self.step % self.validate_every == 0
                    if due_val or (self.validation is not None and self.step == self.steps):
                        self.last_val_bpd = self.validate()
                        record["val_bpd"] = self.last_val_bpd
                    if self.is_root and (self.step % self.log_every == 0 or "val_bpd" in record or self.step == self.steps):
                        self.metrics.append(record)
                    bar.update(1)
                    bar.set_postfix(bpd=f"{record['train_bpd']:.3f}")
                    stop = self._agree(flag.received is not None)
                    due = self.checkpoint_every_steps is not None and self.step % self.checkpoint_every_steps == 0
                    if self.checkpoint_every_minutes is not None:
                        due = due or self._agree(time.monotonic() - last_save >= 60 * self.checkpoint_every_minutes)
                    if stop or due or self.step == self.steps:
                        self.save()
                        last_save = time.monotonic()
                    if stop:
                        status = "interrupted" if flag.received == "SIGINT" else "preempted"
                        if self.is_root:
                            bar.write(f"received {flag.received}: wrote checkpoint {self.last_checkpoint} at step "
                                      f"{self.step}; rerun the same command to resume")
                        break
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, without drawing the plot
            at_once = True
            raise
        finally:
            bar.close()
            if self.is_root and not at_once:  # also after a non-finite loss: the plot shows how it came
                records = self.metrics.read()
                if records:
                    plot_metrics(records, os.path.join(self.out_dir, "metrics.png"))
        return TrainResult(status, self.step, self.last_checkpoint, self.metrics.path, self.last_train_bpd,
                           self.last_val_bpd, flag.received if status != "finished" else None)

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any (a decision all ranks must take together)."""
        if self.comm.size == 1:
            return flag
        return bool(self.comm.allreduce(torch.tensor([1.0 if flag else 0.0]))[0] > 0)
