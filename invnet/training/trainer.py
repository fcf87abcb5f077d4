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

from ..core.budget import memory_budget, parse_bytes
from ..data.atomic import move_aside
from ..data.normalization import Normalization
from ..data.source import BatchSource
from ..distributed.strategy import ParallelStrategy
from ..plotting import plot_metrics
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    best_checkpoint,
    capture_rng,
    latest_checkpoint,
    read_checkpoint,
    read_meta,
    restore_rng,
    save_best,
    save_checkpoint,
)
from .device import resolve_device, to_device
from .early_stopping import EarlyStopping
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
    (``"bpd"``: bits per dimension, the default maximum-likelihood loss). ``stopped_early``: the
    run ended (``"finished"``) because the validation loss stopped improving; ``best_step``,
    ``best_val_loss`` and ``best_checkpoint`` (``checkpoints/best``) describe the best-by-validation
    weights (``None`` without validation)."""

    status: str
    step: int
    checkpoint: Optional[str]
    metrics_path: str
    last_train_loss: Optional[float]
    last_val_loss: Optional[float]
    signal: Optional[str] = None
    loss_name: str = "bpd"
    stopped_early: bool = False
    best_step: Optional[int] = None
    best_val_loss: Optional[float] = None
    best_checkpoint: Optional[str] = None

    @property
    def sampling_checkpoint(self) -> Optional[str]:
        """The weights to sample with, as ``invnet sample`` chooses by default: the best by
        validation when the run has them, else the last checkpoint."""
        return self.best_checkpoint or self.checkpoint


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
    * the best weights: whenever a validation loss is the lowest so far (see
      :class:`~invnet.training.early_stopping.EarlyStopping`, ``min_delta``), the weights are kept
      (a copy on the CPU, rank 0) and written to ``checkpoints/best`` together with the next
      checkpoint (so the best folder always belongs to the newest checkpoint a resume starts from);
      ``keep_last`` never deletes it;
    * early stopping: after ``patience`` validations in a row without a better loss, a checkpoint
      is written and ``fit`` returns ``"finished"`` with ``stopped_early`` (rank 0 prints why);
      the counts are in every checkpoint, so a resumed run stops at the same step;
    * a scheduler that keys on validation (:class:`torch.optim.lr_scheduler.ReduceLROnPlateau`)
      is stepped with the validation loss at each validation instead of once per step;
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
            scheduler stepped once per step (``ReduceLROnPlateau``: once per validation, with its
            loss; it needs ``validation`` and ``validate_every``).
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
        memory_budget: activation bytes the training step may keep instead of recomputing
            (:func:`invnet.memory_budget`: bytes or ``"2GB"``, ``"unlimited"``; ``None``: the
            memory-free backward; the first step measures the blocks, later steps follow the plan).
        validation: a callable returning an iterable of this rank's validation batches; the
            validation loss is the global mean over every rank's samples.
        patience: validations without a better validation loss before stopping (``None``: never
            stop; the best weights are kept all the same). Needs ``validation`` and ``validate_every``.
        min_delta: how much lower (in the loss's units) a validation loss must be to count as better.
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
        memory_budget: Union[str, float, None] = None,
        scheduler: Optional[Any] = None,
        validation: Optional[Callable[[], Iterable[Any]]] = None,
        validate_every: Optional[int] = None,
        patience: Optional[int] = None,
        min_delta: float = 0.0,
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
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        for what, wanted in (("patience", patience is not None), ("a ReduceLROnPlateau scheduler", plateau)):
            if wanted and (validation is None or validate_every is None):
                raise ValueError(f"{what} keys on the validation loss: give validation (batches) and validate_every")
        if plateau and scheduler.mode != "min":
            raise ValueError("ReduceLROnPlateau must have mode='min': it is stepped with the validation loss")
        self.early_stopping = EarlyStopping(patience, min_delta)  # checks its arguments
        parse_bytes(memory_budget)  # a bad budget is refused before anything moves
        self.memory_budget = memory_budget
        self.strategy = strategy if strategy is not None else ParallelStrategy(())
        if parse_bytes(memory_budget) and self.strategy.decomposed:
            raise ValueError("memory_budget cannot be used with a domain-decomposed network (every rank must walk "
                             "the same backward); leave it unset for this grid")
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
        self._best_weights: Optional[tuple] = None  # (CPU copy, train loss, data position) for the next save
        self.best_checkpoint: Optional[str] = None
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
        every tensor is saved on the CPU); returns its path. A new best (by validation) since the
        last checkpoint is written first, to ``checkpoints/best``."""
        if not self.is_root:
            return None
        meta = self._meta()
        if self._best_weights is not None:
            weights, train_loss, loader = self._best_weights
            at_best = dict(meta, last_train_loss=train_loss, last_val_loss=self.early_stopping.best_loss)
            self.best_checkpoint = save_best(self.checkpoint_dir, self.early_stopping.best_step, weights, at_best,
                                             {"loader": loader})
            self._best_weights = None
        state = _state_on_cpu({
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": capture_rng(self.generators),
            "loader": self.batches.state_dict(),
            "step": self.step,
            "early_stopping": self.early_stopping.state_dict(),
        })
        self.last_checkpoint = save_checkpoint(self.checkpoint_dir, self.step, self.network.state_dict(), state, meta,
                                               self.keep_last)
        return self.last_checkpoint

    def _meta(self) -> dict:
        """What every checkpoint says about the run (JSON)."""
        best = self.early_stopping
        return {
            "spec": self.spec,
            "normalization": self.normalization.to_dict() if self.normalization is not None else None,
            "data": self.data_info,
            "run": dict(self.run_info, precision=self.precision.name, grid=list(self.strategy.grid),
                        device=str(self.device)),
            "loss_name": self.loss_name,
            "last_train_loss": self.last_train_loss,
            "last_val_loss": self.last_val_loss,
            "steps_planned": self.steps,
            "best": None if best.best_step is None else {"step": best.best_step, "val_loss": best.best_loss},
        }

    def resume(self, checkpoint: Optional[str | Checkpoint] = None) -> bool:
        """Restore the latest checkpoint of this run (or ``checkpoint``, a path or one already
        read) onto this trainer's device. Returns False when there is none; raises ``ValueError``
        when it does not fit."""
        if checkpoint is None:
            checkpoint = latest_checkpoint(self.checkpoint_dir)
            if checkpoint is None:
                return False
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
        if "optimizer" not in ckpt.state:
            raise ValueError(f"checkpoint {ckpt.path} holds weights only (the best-by-validation ones); resume from a "
                             "step checkpoint (checkpoints/step-*)")
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
            self.early_stopping.load_state_dict(ckpt.state.get("early_stopping") or {})  # (older: none)
        except (RuntimeError, ValueError, KeyError, TypeError) as err:  # a network or optimizer of another shape
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise ValueError(f"checkpoint {ckpt.path} does not fit this network/optimizer: {reason}") from None
        meta = ckpt.meta  # (checkpoints before the run stack named the loss "bpd" only)
        self.last_train_loss = meta.get("last_train_loss", meta.get("last_train_bpd"))
        self.last_val_loss = meta.get("last_val_loss", meta.get("last_val_bpd"))
        self.last_checkpoint = ckpt.path
        self._best_weights = None
        if self.is_root:
            self.metrics.truncate_after(self.step)
            self.best_checkpoint = self._reconcile_best()
        return True

    def _reconcile_best(self) -> Optional[str]:
        """The best folder, if it belongs to the checkpoint just resumed (its step is the recorded
        best step). One written with a newer checkpoint that is not being resumed (unreadable, set
        aside) holds weights of a trajectory this run will not repeat: it is set aside, said, and
        the next better validation writes a new one."""
        best = best_checkpoint(self.checkpoint_dir)
        if best is None:
            return None
        try:
            step = read_meta(best)["step"]
        except CheckpointError:  # damaged: as if it belonged to another trajectory
            step = None
        recorded = self.early_stopping.best_step
        if step is not None and step == recorded:
            return best
        moved = move_aside(best, tag="stale")
        record = "no best yet" if recorded is None else f"best at step {recorded}"
        warnings.warn(f"the best checkpoint (step {step}) does not belong to the checkpoint resumed from ({record}); "
                      f"set aside as {moved}. The next better validation loss writes a new one", stacklevel=2)
        return None

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
        with memory_budget(self.memory_budget):  # the forward decides what the backward keeps
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
        if self.scheduler is not None and not self._plateau:
            self.scheduler.step()
        self.step += 1
        self.last_train_loss = value
        return {"step": self.step, "epoch": getattr(self.batches, "epoch", None), f"train_{self.loss_name}": value,
                "lr": float(self.optimizer.param_groups[0]["lr"]), "grad_norm": norm,
                "step_time_s": time.perf_counter() - t0, "peak_memory_mb": peak_memory_mb(self.device), **record}

    @property
    def _plateau(self) -> bool:
        return isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

    def _after_validation(self, value: Optional[float]) -> bool:
        """Keep the weights if ``value`` is the best validation loss so far, step a plateau
        scheduler; returns whether to stop early (the same answer on every rank)."""
        if self.early_stopping.update(self.step, value) and self.is_root:
            self._best_weights = ({k: v.detach().to("cpu", copy=True) for k, v in self.network.state_dict().items()},
                                  self.last_train_loss, _state_on_cpu(self.batches.state_dict()))
        if self._plateau and value is not None:
            self.scheduler.step(value)
        return self.strategy.agree(self.early_stopping.should_stop)

    def fit(self) -> TrainResult:
        """Train up to ``steps`` (continuing from the current step after :meth:`resume`), or until
        ``patience`` validations in a row bring no better validation loss."""
        from tqdm import tqdm

        status, at_once, received = "finished", False, None
        stopped_early = self.early_stopping.should_stop  # a run resumed after it stopped early stays stopped
        if stopped_early and self.is_root:
            print(f"already {self.early_stopping.message(self.step)}; give a larger patience to go on", flush=True)
        last_save = time.monotonic()
        bar = tqdm(total=self.steps, initial=self.step, disable=not (self.progress and self.is_root),
                   desc="train", dynamic_ncols=True)
        try:
            with PreemptionFlag() as flag:
                while self.step < self.steps and not stopped_early:
                    record = self._train_step()
                    due_val = self.validate_every is not None and self.step % self.validate_every == 0
                    if due_val or (self.validation is not None and self.step == self.steps):
                        self.last_val_loss = self.validate()
                        record[f"val_{self.loss_name}"] = self.last_val_loss
                        stopped_early = self._after_validation(self.last_val_loss)
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
                    if stop or due or stopped_early or self.step == self.steps:
                        self.save()
                        last_save = time.monotonic()
                    if stopped_early and self.is_root:
                        bar.write(self.early_stopping.message(self.step))
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
        best = self.early_stopping
        return TrainResult(status, self.step, self.last_checkpoint, self.metrics.path, self.last_train_loss,
                           self.last_val_loss, None if status == "finished" else received, self.loss_name,
                           stopped_early=stopped_early and status == "finished", best_step=best.best_step,
                           best_val_loss=best.best_loss,
                           best_checkpoint=self.best_checkpoint or best_checkpoint(self.checkpoint_dir))

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
