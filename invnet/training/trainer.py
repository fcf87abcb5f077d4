"""The trainer: one loop for every job and application, on any device, precision and parallel grid."""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from ..data.normalization import Normalization
from ..data.source import BatchSource
from ..distributed.strategy import ParallelStrategy
from ..plotting import plot_metrics
from .checkpoint import Checkpoint, capture_rng, latest_checkpoint, read_checkpoint, restore_rng, save_checkpoint
from .device import resolve_device, to_device
from .loss import LossFn, bits_per_dim_loss, flow_inputs
from .metrics import MetricsLog, peak_memory_mb
from .precision import Precision
from .signals import NonFiniteLossError, PreemptionFlag

__all__ = ["Trainer", "TrainResult"]


@dataclass
class TrainResult:
    """Outcome of :meth:`Trainer.fit`: ``status`` is ``"finished"``, ``"preempted"`` (SIGTERM or
    SIGUSR1) or ``"interrupted"`` (Ctrl-C); ``signal`` names the signal that stopped the run.
    ``last_train_loss``/``last_val_loss`` are global means of the loss named ``loss_name``
    (``"bpd"``: bits per dimension, the default maximum-likelihood loss)."""

    status: str
    step: int
    checkpoint: Optional[str]
    metrics_path: str
    last_train_loss: Optional[float]
    last_val_loss: Optional[float]
    signal: Optional[str] = None
    loss_name: str = "bpd"


def _state_on_cpu(obj: Any) -> Any:
    """``obj`` (nested dicts, lists, tuples of tensors and numbers) with every tensor on the CPU:
    checkpoints never depend on the device they were written from."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _state_on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_state_on_cpu(v) for v in obj)
    return obj


def _move(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, dtype: torch.dtype) -> None:
    """Move ``model`` to ``device`` and ``dtype`` and keep ``optimizer`` pointing at its
    parameters: ``Module.to`` replaces a parameter object when the new tensor cannot share its
    type (e.g. to another kind of device), which would leave the optimizer updating the old one."""
    before = dict(model.named_parameters())
    model.to(device=device, dtype=dtype)
    replaced = {id(before[name]): p for name, p in model.named_parameters() if p is not before[name]}
    if not replaced:
        return
    for group in optimizer.param_groups:
        group["params"] = [replaced.get(id(p), p) for p in group["params"]]
    for old in [p for p in optimizer.state if id(p) in replaced]:
        optimizer.state[replaced[id(old)]] = optimizer.state.pop(old)


class Trainer:
    r"""Train a network on batches from a batch source with a loss function, on a device, in a
    precision, over a parallel strategy, with checkpoints, exact resume, signals and metrics.

    One step: ``batch = batches.next_batch()`` (moved to ``device``), per-sample losses
    ``loss_fn(model, batch)`` under the precision's autocast, their mean backward (memory-free
    through the flow; scaled for float16), ``strategy.reduce_gradients`` (one allreduce), optional
    clipping, optimizer and scheduler step. The default loss is maximum likelihood in bits per
    dimension, :math:`-\log q_\theta(x \mid y) / (D \ln 2)` on ``(x, y)`` batches ("Glow", Kingma and
    Dhariwal, 2018, arXiv:1807.03039); nothing else assumes what a batch is.

    Around the step:

    * metrics to ``out_dir/metrics.jsonl`` (train loss, learning rate, gradient norm, step time,
      peak memory; the validation loss every ``validate_every`` steps and at the end; the
      reconstruction drift every ``drift_check_every`` steps) and the plot ``metrics.png``;
    * checkpoints every ``checkpoint_every_steps`` steps and/or ``checkpoint_every_minutes``
      minutes (and at the end), keeping the last ``keep_last``; :meth:`resume` restores weights,
      optimizer, scheduler, loss scaler, every RNG, the batch source's position and the metrics
      file, so the resumed run equals one never stopped (bitwise on CPU);
    * SIGTERM/SIGUSR1 on any rank: every rank writes its part (rank 0 the checkpoint) after the
      current step and ``fit`` returns ``"preempted"`` (exit 75); SIGINT likewise with
      ``"interrupted"`` (exit 130); a second Ctrl-C stops at once;
    * a NaN/Inf loss or gradient norm raises :class:`NonFiniteLossError` before the update (no
      checkpoint is written, so the last good one stays the latest); with float16 a non-finite
      gradient is the loss scaler's business (the step is skipped and the scale lowered);
    * the drift guard: every ``drift_check_every`` steps the memory-free backward's rebuild of
      the batch is compared with the true inputs (:func:`invnet.core.reconstruction_drift`,
      global over ranks): ``reconstruction_error`` (and per scale) goes to the metrics; above
      ``drift_warn_above`` a warning, above ``drift_fail_above`` a
      :class:`~invnet.core.ReconstructionDriftError` naming the worst block and a remedy, before
      the update.

    Parallel jobs: every rank builds its own trainer with the same arguments and its own batch
    source (for its :meth:`ParallelStrategy.shard`); the strategy decomposes or replicates the
    model, reduces gradients and losses; only :attr:`ParallelStrategy.writes_replicated` (rank 0)
    writes checkpoints, metrics and the plot and shows progress. Checkpoints hold the network's
    weights on the CPU, so a run resumes on any device and grid.

    Args:
        model: the network (a :class:`~invnet.networks.FlowNetwork` for the default loss), not yet
            decomposed: the strategy prepares it; moved to ``device`` and the precision's dtype.
        optimizer, scheduler: any torch optimizer over the model's parameters, an optional LR
            scheduler stepped once per step.
        batches: a :class:`~invnet.data.source.BatchSource` (its position is checkpointed).
        out_dir: run folder (metrics, plot, ``checkpoints/``).
        steps: total optimizer steps.
        loss_fn: ``loss_fn(model, batch) -> (local_batch,)`` per-sample losses; with a decomposed
            model each value must be the sample's global loss (sum the subdomains' parts with the
            decomposed model's ``log_prob``, which does). Default: bits per dimension on ``(x, y)``.
        loss_name: name of the loss in the metrics (``train_<name>``, ``val_<name>``; default
            ``"bpd"`` for the default loss, else ``"loss"``).
        strategy: the :class:`~invnet.distributed.ParallelStrategy` (serial by default).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device`` (default:
            where the model is).
        precision: a :class:`~invnet.training.precision.Precision` or its name (default: float64
            for a float64 model, else float32).
        validation: a callable returning an iterable of this rank's validation batches; the
            validation loss is the global mean over every rank's samples.
        drift_check_every, drift_warn_above, drift_fail_above: the drift guard (off when
            ``drift_check_every`` is ``None``).
        drift_inputs: ``drift_inputs(model, batch) -> (flow, x, c)``: what to measure on a batch
            (default: the model, ``x`` and ``model.condition(y)`` of an ``(x, y)`` batch; required
            for the drift guard with another ``loss_fn``).
        normalization, spec, data_info, run_info: stored in checkpoints (``spec`` rebuilds the
            network; ``run_info`` any JSON-able facts, e.g. the grid).
        clip_grad_norm: optional max gradient norm.
        generators: extra named torch generators whose state is checkpointed.

    >>> import tempfile, numpy as np, torch
    >>> from invnet.data import ArraySource, PairDataset, BatchLoader
    >>> from invnet.networks import ConditionalCouplingFlow
    >>> x, y = np.random.randn(16, 2).astype("f4"), np.random.randn(16, 1).astype("f4")
    >>> ds = PairDataset(ArraySource(x, "x"), ArraySource(y, "y"))
    >>> net = ConditionalCouplingFlow(2, 1, ndim=0, depth=2, hidden=8)
    >>> optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    >>> trainer = Trainer(net, optimizer, BatchLoader(ds, range(16), 8), tempfile.mkdtemp(), steps=3, progress=False)
    >>> result = trainer.fit()
    >>> result.status, result.step
    ('finished', 3)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: BatchSource,
        out_dir: str,
        steps: int,
        *,
        loss_fn: Optional[LossFn] = None,
        loss_name: Optional[str] = None,
        strategy: Optional[ParallelStrategy] = None,
        device: Union[str, torch.device, None] = None,
        precision: Union[str, Precision, None] = None,
        scheduler: Optional[Any] = None,
        validation: Optional[Callable[[], Iterable[Any]]] = None,
        validate_every: Optional[int] = None,
        drift_check_every: Optional[int] = None,
        drift_warn_above: float = 1e-4,
        drift_fail_above: float = 1e-2,
        drift_inputs: Optional[Callable[[nn.Module, Any], tuple]] = None,
        normalization: Optional[Normalization] = None,
        spec: Optional[dict] = None,
        data_info: Optional[dict] = None,
        run_info: Optional[dict] = None,
        clip_grad_norm: Optional[float] = None,
        log_every: int = 1,
        checkpoint_every_steps: Optional[int] = None,
        checkpoint_every_minutes: Optional[float] = None,
        keep_last: int = 3,
        progress: bool = True,
        generators: Optional[dict[str, torch.Generator]] = None,
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be positive, got {steps}")
        for name, v in (("log_every", log_every), ("keep_last", keep_last), ("validate_every", validate_every),
                        ("checkpoint_every_steps", checkpoint_every_steps), ("drift_check_every", drift_check_every)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v}")
        if checkpoint_every_minutes is not None and not checkpoint_every_minutes > 0:
            raise ValueError(f"checkpoint_every_minutes must be positive, got {checkpoint_every_minutes}")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be positive, got {clip_grad_norm}")
        if not 0 < drift_warn_above <= drift_fail_above:
            raise ValueError(f"need 0 < drift_warn_above <= drift_fail_above, got {drift_warn_above} and "
                             f"{drift_fail_above}")
        if drift_check_every is not None and loss_fn is not None and drift_inputs is None:
            raise ValueError("the drift guard (drift_check_every) with your own loss_fn needs "
                             "drift_inputs(model, batch) -> (flow, x, c): what to rebuild")
        self.strategy = strategy if strategy is not None else ParallelStrategy(())
        self.precision = precision if isinstance(precision, Precision) else (
            Precision(precision) if precision is not None else Precision.of_model(model))
        if device is None:
            ref = next(iter(model.parameters()), None)
            device = ref.device if ref is not None else torch.device("cpu")
        self.device = resolve_device(device, self.strategy.comm)
        _move(model, optimizer, self.device, self.precision.parameter_dtype)
        self.model = self.strategy.prepare(model)
        self.optimizer, self.scheduler, self.batches = optimizer, scheduler, batches
        self.scaler = self.precision.grad_scaler(self.device)
        self.loss_fn: LossFn = loss_fn or bits_per_dim_loss
        self.loss_name = loss_name or ("bpd" if loss_fn is None else "loss")
        self.drift_inputs = drift_inputs or flow_inputs
        self.out_dir, self.steps = out_dir, int(steps)
        self.validation, self.normalization, self.spec = validation, normalization, spec
        self.data_info, self.run_info = data_info or {}, run_info or {}
        self.clip_grad_norm, self.validate_every, self.log_every = clip_grad_norm, validate_every, log_every
        self.drift_check_every, self.drift_thresholds = drift_check_every, (drift_warn_above, drift_fail_above)
        self.checkpoint_every_steps, self.checkpoint_every_minutes = checkpoint_every_steps, checkpoint_every_minutes
        self.keep_last, self.progress = keep_last, progress
        self.generators = generators or {}
        self.step = 0
        self.checkpoint_dir = os.path.join(out_dir, "checkpoints")
        self.metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"))
        self.last_checkpoint: Optional[str] = None
        self.last_train_loss: Optional[float] = None
        self.last_val_loss: Optional[float] = None
        if self.is_root:
            os.makedirs(out_dir, exist_ok=True)

    @property
    def is_root(self) -> bool:
        """Whether this rank writes the run's files (rank 0)."""
        return self.strategy.writes_replicated

    @property
    def network(self) -> nn.Module:
        """The network being trained (inside the decomposed wrapper, if any)."""
        return self.strategy.unwrap(self.model)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Optional[str]:
        """Write a checkpoint of the current step (rank 0 only; parameters are replicated, and
        every tensor is saved on the CPU); returns its path."""
        if not self.is_root:
            return None
        state = _state_on_cpu({
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": capture_rng(self.generators),
            "loader": self.batches.state_dict(),
            "step": self.step,
        })
        meta = {
            "spec": self.spec,
            "normalization": self.normalization.to_dict() if self.normalization is not None else None,
            "data": self.data_info,
            "run": dict(self.run_info, precision=self.precision.name, grid=list(self.strategy.grid),
                        device=str(self.device)),
            "loss_name": self.loss_name,
            "last_train_loss": self.last_train_loss,
            "last_val_loss": self.last_val_loss,
            "steps_planned": self.steps,
        }
        self.last_checkpoint = save_checkpoint(self.checkpoint_dir, self.step, self.network.state_dict(), state, meta,
                                               self.keep_last)
        return self.last_checkpoint

    def resume(self, checkpoint: Optional[str | Checkpoint] = None) -> bool:
        """Restore the latest checkpoint of this run (or ``checkpoint``, a path or one already
        read) onto this trainer's device. Returns False when there is none; raises ``ValueError``
        when it does not fit."""
        if checkpoint is None:
            checkpoint = latest_checkpoint(self.checkpoint_dir)
            if checkpoint is None:
                return False
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
        try:
            missing, unexpected = self.network.load_state_dict(ckpt.weights, strict=False)
            if missing or unexpected:
                raise ValueError(f"missing {missing}, unexpected {unexpected}")
            self.optimizer.load_state_dict(ckpt.state["optimizer"])  # moves the state onto the parameters' device
            if self.scheduler is not None and ckpt.state["scheduler"] is not None:
                self.scheduler.load_state_dict(ckpt.state["scheduler"])
            if self.scaler is not None and ckpt.state.get("scaler") is not None:
                self.scaler.load_state_dict(ckpt.state["scaler"])
            restore_rng(ckpt.state["rng"], self.generators)
            self.batches.load_state_dict(ckpt.state["loader"])
            self.step = int(ckpt.state["step"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:  # a network or optimizer of another shape
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise ValueError(f"checkpoint {ckpt.path} does not fit this network/optimizer: {reason}") from None
        meta = ckpt.meta  # (checkpoints before the run stack named the loss "bpd" only)
        self.last_train_loss = meta.get("last_train_loss", meta.get("last_train_bpd"))
        self.last_val_loss = meta.get("last_val_loss", meta.get("last_val_bpd"))
        self.last_checkpoint = ckpt.path
        if self.is_root:
            self.metrics.truncate_after(self.step)
        return True

    # ------------------------------------------------------------------ steps
    def _losses(self, batch: Any) -> Tensor:
        with self.precision.autocast(self.device):
            per_sample = self.loss_fn(self.model, batch)
        if not isinstance(per_sample, Tensor) or per_sample.dim() != 1:
            raise ValueError(f"loss_fn must return one loss per sample (a tensor of shape (batch,)), got "
                             f"{getattr(per_sample, 'shape', type(per_sample).__name__)}")
        return per_sample

    def validate(self) -> Optional[float]:
        """Mean validation loss over every validation sample of every rank."""
        if self.validation is None:
            return None
        total = torch.zeros(2, dtype=torch.float64)
        self.model.eval()
        with torch.no_grad():
            for batch in self.validation():
                per_sample = self._losses(to_device(batch, self.device))
                total += torch.stack([per_sample.double().sum().cpu(), torch.tensor(float(per_sample.numel()))])
        total = self.strategy.sum_over_ranks(total)
        return float(total[0] / total[1]) if float(total[1]) > 0 else None

    def check_drift(self, batch: Any) -> dict:
        """Measure the reconstruction drift on ``batch`` (global over ranks), warn or raise as the
        thresholds say; returns the metrics (``reconstruction_error``, per scale, worst block)."""
        from ..core import reconstruction_drift

        flow, x, c = self.drift_inputs(self.model, batch)
        with self.precision.autocast(self.device):
            report = reconstruction_drift(flow, x, c, sum_reduce=self.strategy.sum_over_ranks)
        warn, fail = self.drift_thresholds
        with warnings.catch_warnings():
            if not self.is_root:  # every rank measured the same global numbers: one warning
                warnings.simplefilter("ignore")
            report.check(warn, fail)  # raises ReconstructionDriftError above `fail`, on every rank
        return report.as_metrics()

    def _nonfinite(self, what: str, value: float, advice: str = "") -> NonFiniteLossError:
        return NonFiniteLossError(
            f"the {what} became {value} at step {self.step + 1}; training stopped before the update. "
            f"Last good checkpoint: {self.last_checkpoint or 'none written yet'}.{advice}")

    def _train_step(self) -> dict:
        t0 = time.perf_counter()
        batch = to_device(self.batches.next_batch(), self.device)
        self.model.train()
        per_sample = self._losses(batch)
        value = self.strategy.global_mean(per_sample)
        if not math.isfinite(value):
            raise self._nonfinite("training loss", value, " Try a lower learning rate, gradient clipping, or check "
                                  "the data and normalisation.")
        self.optimizer.zero_grad(set_to_none=True)
        loss = per_sample.float().mean() if per_sample.dtype in (torch.float16, torch.bfloat16) else per_sample.mean()
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        del loss, per_sample
        self.strategy.reduce_gradients(self.model)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.clip_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm))
        else:
            norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))) if params else 0.0
        if not math.isfinite(norm) and self.scaler is None:
            raise self._nonfinite("gradient norm", norm)
        record: dict = {}
        if self.drift_check_every is not None and (self.step + 1) % self.drift_check_every == 0:
            record.update(self.check_drift(batch))  # before the update: a failure keeps the last checkpoint
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
            self.scaler.update()
            record["loss_scale"] = float(self.scaler.get_scale())
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        self.last_train_loss = value
        return {"step": self.step, "epoch": getattr(self.batches, "epoch", None), f"train_{self.loss_name}": value,
                "lr": float(self.optimizer.param_groups[0]["lr"]), "grad_norm": norm,
                "step_time_s": time.perf_counter() - t0, "peak_memory_mb": peak_memory_mb(self.device), **record}

    def fit(self) -> TrainResult:
        """Train up to ``steps`` (continuing from the current step after :meth:`resume`)."""
        from tqdm import tqdm

        status, at_once, received = "finished", False, None
        last_save = time.monotonic()
        bar = tqdm(total=self.steps, initial=self.step, disable=not (self.progress and self.is_root),
                   desc="train", dynamic_ncols=True)
        try:
            with PreemptionFlag() as flag:
                while self.step < self.steps:
                    record = self._train_step()
                    due_val = self.validate_every is not None and self.step % self.validate_every == 0
                    if due_val or (self.validation is not None and self.step == self.steps):
                        self.last_val_loss = self.validate()
                        record[f"val_{self.loss_name}"] = self.last_val_loss
                    rare = f"val_{self.loss_name}" in record or "reconstruction_error" in record
                    if self.is_root and (self.step % self.log_every == 0 or rare or self.step == self.steps):
                        self.metrics.append(record)
                    bar.update(1)
                    bar.set_postfix({self.loss_name: f"{self.last_train_loss:.3f}"})
                    received = self._agree_on_signal(flag.received)  # a signal on any rank stops all
                    stop = received is not None
                    due = self.checkpoint_every_steps is not None and self.step % self.checkpoint_every_steps == 0
                    if self.checkpoint_every_minutes is not None:
                        minutes_due = time.monotonic() - last_save >= 60 * self.checkpoint_every_minutes
                        due = due or self.strategy.agree(minutes_due)
                    if stop or due or self.step == self.steps:
                        self.save()
                        last_save = time.monotonic()
                    if stop:
                        status = "interrupted" if received == "SIGINT" else "preempted"
                        if self.is_root:
                            bar.write(f"received {received}: wrote checkpoint {self.last_checkpoint} at step "
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
                    plot_metrics(records, os.path.join(self.out_dir, "metrics.png"), loss_name=self.loss_name)
        return TrainResult(status, self.step, self.last_checkpoint, self.metrics.path, self.last_train_loss,
                           self.last_val_loss, None if status == "finished" else received, self.loss_name)

    def _agree_on_signal(self, received: Optional[str]) -> Optional[str]:
        """The signal that stops every rank after this step, if any rank received one: SIGINT
        if any rank got Ctrl-C (exit 130 everywhere), else this rank's own or SIGTERM (exit 75)."""
        if self.strategy.comm.size == 1:
            return received
        votes = torch.tensor([float(received is not None), float(received == "SIGINT")], dtype=torch.float64)
        votes = self.strategy.sum_over_ranks(votes)
        if float(votes[0]) == 0:
            return None
        return "SIGINT" if float(votes[1]) > 0 else (received or "SIGTERM")
