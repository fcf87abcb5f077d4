"""Assemble a training job from a validated config: data, normalisation, network, optimizer."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from .. import host_allocator, host_memory
from ..data import BatchLoader, Normalization, PairDataset, Shard, data_moments, open_pairs, train_validation_split
from ..data.atomic import atomic_file, move_aside
from ..data.quality import warn_about_data
from ..data.simulated import SimulatedPairs, load_entry_point, simulated_set
from ..distributed.comm import Communicator, SerialComm, agree_on_errors
from ..distributed.strategy import ParallelStrategy
from ..networks.base import FlowNetwork
from .checkpoint import latest_readable_checkpoint, set_aside
from .device import device_assignment, resolve_device
from .network_spec import build_network, resolve_network_spec
from .precision import Precision
from .run_folder import check_out_dir, check_restart, check_resume, check_same_data, holds_run
from .signals import PreemptedError, PreemptionFlag
from .trainer import Trainer, TrainResult

__all__ = ["trainer_from_config", "train_from_config", "strategy_from_config"]


def _validation_batches(
    dataset: PairDataset,
    indices: Sequence[int],
    batch_size: int,
    normalization: Normalization,
    dtype: torch.dtype,
    seed: int,
    shard: Shard,
    pin_memory: bool = False,
) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """This rank's validation batches: its batch group's part of ``indices`` (its subdomain of
    each sample), with fixed patch corners (drawn for all of ``indices``, so that every grid sees
    the same patches and the global validation loss does not depend on the grid)."""
    corners = None
    if dataset.patch is not None:  # fixed patches, so every validation sees the same data
        rng = np.random.default_rng([seed, 2**31 - 1])
        space = dataset.x.shape[2:]
        corners = [[int(rng.integers(0, s - p + 1)) for s, p in zip(space, dataset.patch)] for _ in indices]
    mine = shard.samples(np.arange(len(indices)))  # positions in `indices` of this group's samples

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for k in range(0, len(mine), batch_size):
            pos = mine[k:k + batch_size]
            cs = None if corners is None else [corners[int(p)] for p in pos]
            x, y = dataset.read(np.asarray(indices)[pos], cs, shard)
            x, y = torch.from_numpy(x).to(dtype), torch.from_numpy(y).to(dtype)
            x, y = normalization.x_to_normal(x), normalization.y_to_normal(y)
            yield (x.pin_memory(), y.pin_memory()) if pin_memory else (x, y)

    return batches


#: a batch of this many unknowns or more has conditioner activations past glibc's 32 MiB mmap threshold
#: (8 or more hidden channels in float32): where the allocator shows in the step time (invnet/host_allocator.py)
_LARGE_BATCH_ELEMENTS = 1 << 20


def _say(comm: Communicator, message: str) -> None:
    if comm.rank == 0:
        print(message, flush=True)


def validation_schedule(t: dict, n_train: Optional[int], n_val: int,
                        batch_ranks: int) -> tuple[Optional[int], Optional[int]]:
    """``(validate_every, patience)`` for the Trainer from ``[training]``: ``validate_every`` unset
    means once per epoch (``n_train`` pairs in global batches of ``batch_size x batch_ranks``); a
    simulator has no epochs, and then every ten validation sets' worth of fresh pairs (so the
    validation, a forward pass, costs a few percent of the training). Without validation pairs
    there is nothing to stop on (patience ``None``); ``patience = 0`` also means never stop.

    >>> validation_schedule({"validate_every": None, "patience": 20, "batch_size": 16}, 900, 100, 1)
    (56, 20)
    >>> validation_schedule({"validate_every": None, "patience": 0, "batch_size": 16}, None, 100, 2)
    (32, None)
    """
    if not n_val:
        return t["validate_every"], None
    every = t["validate_every"]
    if every is None:
        global_batch = t["batch_size"] * batch_ranks
        every = max(1, n_train // global_batch) if n_train is not None else max(1, math.ceil(10 * n_val / global_batch))
    return every, (t["patience"] or None)


def strategy_from_config(cfg: dict, space_shape: tuple[int, ...], comm: Communicator) -> ParallelStrategy:
    """The parallel strategy a config's ``[distributed] grid`` describes for samples of
    ``space_shape`` (absent: data parallel over all ranks); checked before any message."""
    grid = (cfg.get("distributed") or {}).get("grid")
    try:
        return ParallelStrategy(space_shape, grid, comm)
    except ValueError as err:
        raise ValueError(f"[distributed] grid: {err}") from None


def trainer_from_config(cfg: dict, comm: Optional[Communicator] = None, resume: bool = True,
                        config_path: Optional[str] = None,
                        validation: Optional[Callable[[], Iterable[Any]]] = None) -> Trainer:
    """Build the :class:`Trainer` a validated config describes (see
    :func:`~invnet.training.config.validate_config`), on every rank of ``comm``.

    Everything is checked before anything is written (and the data are read only after the
    checks that need no data): ``out_dir``; on resume, that the config agrees with the run's
    stored ``config.json`` (:func:`~invnet.training.config.resume_differences`) and that a
    readable checkpoint exists (newer unreadable ones are skipped, said, and set aside as
    ``step-*.unreadable-*``); the parallel grid against the world, the data and the network
    (:class:`~invnet.distributed.ParallelStrategy`); the device; then the data (names, shapes,
    dtypes, finite values: each rank checks its own part and a bad value found by one rank stops
    every rank with its message) and the normalisation statistics (merged over ranks; on resume
    the stored ones are reused).

    ``resume=False`` (``--restart``) starts over: a previous run in ``out_dir`` is first moved aside
    as a whole to ``OUT_DIR.previous-DATE-TIME`` (one atomic rename, so two runs never mix; refused
    when ``out_dir`` also holds the data, ``config_path`` or the current folder).

    ``validation``: this rank's validation batches from the caller (a callable returning an
    iterable of batches in the run's dtype), used instead of the config's held-out pairs; e.g. an
    application whose simulator draws training pairs validates on fixed held-out images."""
    comm = comm or SerialComm()
    d, t = cfg["data"], cfg["training"]
    out_dir = t["out_dir"]
    check_out_dir(out_dir)
    ckpt, unreadable = None, []
    if resume:
        ckpt, unreadable = latest_readable_checkpoint(os.path.join(out_dir, "checkpoints"))
        if ckpt is None and unreadable:
            raise ValueError(f"no readable checkpoint in {os.path.join(out_dir, 'checkpoints')}: "
                             + "; ".join(reason for _, reason in unreadable)
                             + ". Start over with --restart (the previous run is moved aside)")
        if ckpt is not None:
            check_resume(cfg, out_dir)
    restart = not resume and holds_run(out_dir)
    if restart:
        check_restart(cfg, config_path)
    precision = Precision(t["precision"])
    dtype = precision.parameter_dtype
    simulated = d["source"] is not None
    if simulated:  # one pair drawn apart from the stream tells the shapes
        x_shape, y_shape = (tuple(a.shape[1:]) for a in agree_on_errors(comm, lambda: SimulatedPairs(
            d["source"], 1, t["seed"], d["arguments"], dtype=dtype).probe()))
    else:
        max_bytes = None if d["max_read_mb"] is None else int(d["max_read_mb"] * 2**20)
        dataset = open_pairs(d["path"], d["x"], d["y"], d["patch"], max_bytes)  # names, shapes, dtypes: no data read
        x_shape, y_shape = dataset.x_shape, dataset.y_shape
        train_idx, val_idx = train_validation_split(len(dataset), d["validation_fraction"], d["seed"])
    strategy = strategy_from_config(cfg, x_shape[1:], comm)
    strategy.check_data(x_shape, y_shape)
    device = resolve_device(t["device"], comm)
    torch.manual_seed(t["seed"])
    spec = resolve_network_spec(cfg["model"], x_shape, y_shape)
    model = build_network(spec).to(dtype)
    strategy.check_network(model)  # squeeze levels and decomposability on this grid
    if isinstance(model, FlowNetwork):  # shapes fit? (through the summary network, if any, on a dummy observation)
        with torch.no_grad():
            c = model.condition(torch.zeros((1,) + tuple(y_shape), dtype=dtype))
            model.check_shape((1,) + tuple(x_shape), None if c is None else tuple(c.shape))
    shard = strategy.shard()
    if simulated:
        n_train, n_val = None, d["validation_size"]
    else:
        n_train, n_val = int(len(train_idx)), int(len(val_idx))
    data_info = {"path": d["path"], "x": d["x"], "y": d["y"], "x_shape": list(x_shape), "y_shape": list(y_shape),
                 "n_train": n_train, "n_validation": n_val, "validation_fraction": d["validation_fraction"],
                 "split_seed": d["seed"], "patch": d["patch"]}
    if simulated:
        data_info.update(source=d["source"], arguments=d["arguments"] or {}, validation_fraction=None)
    if ckpt is not None:
        check_same_data(ckpt, data_info, d["path"] or d["source"])
        normalization = Normalization.from_dict(ckpt.meta["normalization"])
    elif simulated:  # the simulator chooses the scale
        normalization = Normalization.identity(int(x_shape[0]), int(y_shape[0]))
    else:  # each rank reads its part; a NaN found by one rank stops all with its message
        moments = agree_on_errors(comm, lambda: data_moments(dataset, train_idx, shard=shard))
        moments.sum_over_ranks(strategy.sum_over_ranks)
        normalization = moments.normalization()
        if len(val_idx):  # the finite-value check of the validation part
            agree_on_errors(comm, lambda: data_moments(dataset, val_idx, shard=shard))
    if comm.rank == 0 and not simulated:
        warn_about_data(dataset, normalization)
    opt_kwargs = {k: v for k, v in cfg["optimizer"].items() if k != "name"}
    optimizer = getattr(torch.optim, cfg["optimizer"]["name"])(model.parameters(), **opt_kwargs)
    scheduler = None
    if cfg["scheduler"] is not None:
        s_kwargs = {k: v for k, v in cfg["scheduler"].items() if k != "name"}
        scheduler = getattr(torch.optim.lr_scheduler, cfg["scheduler"]["name"])(optimizer, **s_kwargs)
    pin = device.type == "cuda"
    held_out = None
    if simulated:
        loader = SimulatedPairs(d["source"], t["batch_size"], t["seed"], d["arguments"], shard, dtype, pin)
        if n_val:
            fixed = agree_on_errors(comm, lambda: simulated_set(d["source"], n_val, t["batch_size"], d["seed"],
                                                                  d["arguments"], shard, dtype))

            def held_out() -> list:  # the same fixed pairs at every validation
                return fixed
    else:
        loader = BatchLoader(dataset, train_idx, t["batch_size"], t["seed"], normalization, dtype, shard, pin)
        if len(val_idx):
            held_out = _validation_batches(dataset, val_idx, t["batch_size"], normalization, dtype, t["seed"], shard,
                                           pin)
    if validation is not None:  # the caller's held-out set replaces the config's
        held_out = validation
    loss_fn = load_entry_point(t["loss"], "[training] loss") if t["loss"] is not None else None
    # a caller's held-out set counts as validation pairs (its size: the caller's business)
    n_held_out = 0 if held_out is None else max(n_val or 0, 1)
    validate_every, patience = validation_schedule(t, n_train, n_held_out, strategy.batch_ranks)
    if held_out is None and not simulated and (cfg["scheduler"] or {}).get("name") == "ReduceLROnPlateau":
        raise ValueError(f"[scheduler] ReduceLROnPlateau is stepped with the validation loss, but the "
                         f"{len(dataset)} pairs leave none for validation at validation_fraction "
                         f"{d['validation_fraction']}; raise it or give more pairs")
    # ---- everything checked: from here on files are written
    if restart:
        if comm.rank == 0:
            moved = move_aside(out_dir)
            _say(comm, f"--restart: moved the previous run aside to {moved}")
        comm.barrier()
    trainer = Trainer(
        model, optimizer, loader, out_dir, t["steps"], loss_fn=loss_fn, strategy=strategy, device=device,
        precision=precision, memory_budget=t["memory_budget"],
        scheduler=scheduler, validation=held_out, validate_every=validate_every, patience=patience,
        min_delta=t["min_delta"],
        drift_check_every=t["drift_check_every"], drift_warn_above=t["drift_warn_above"],
        drift_fail_above=t["drift_fail_above"], normalization=normalization, spec=spec, data_info=data_info,
        clip_grad_norm=t["clip_grad_norm"], log_every=t["log_every"],
        checkpoint_every_steps=t["checkpoint_every_steps"], checkpoint_every_minutes=t["checkpoint_every_minutes"],
        keep_last=t["keep_last"], progress=t["progress"],
    )
    if ckpt is not None:
        trainer.resume(ckpt)  # loads first (a misfit raises before anything is written), then trims the metrics
    if comm.rank == 0:
        for path, reason in unreadable:
            _say(comm, f"skipping an unreadable checkpoint: {reason}; set aside as {set_aside(path)}")
        with atomic_file(os.path.join(out_dir, "config.json")) as f:
            json.dump(cfg, f, indent=1)
        if ckpt is None and os.path.exists(trainer.metrics.path):
            trainer.metrics.truncate_after(0)  # records of an attempt that never wrote a checkpoint
    if comm.size > 1 or strategy.decomposed:
        _say(comm, strategy.describe())
    if comm.size > 1 or device.type != "cpu":
        assignment = device_assignment(device, comm)
        _say(comm, assignment)
    if device.type == "cpu" and host_memory.kernel_mode() == "madvise" and not host_memory.huge_pages_in_use():
        _say(comm, host_memory.describe(in_use=False) + ": large 3D steps slow down (invnet/host_memory.py)")
    if device.type == "cpu" and (host_allocator.allocator_in_use() != "system"
                                 or math.prod(x_shape) * t["batch_size"] >= _LARGE_BATCH_ELEMENTS):
        _say(comm, host_allocator.describe())  # (glibc's cost only shows on batches whose activations pass 32 MiB)
    if held_out is None:  # (`validation` is only the caller's set; a config's or a simulator's fixed set counts)
        _say(comm, "no validation pairs: no early stopping and no best checkpoint (invnet sample and info will use "
                   "the last checkpoint)")
    if ckpt is not None:
        _say(comm, f"resuming from step {trainer.step} (checkpoint {ckpt.path})"
             + (", the newest readable one" if unreadable else ""))
    return trainer


def train_from_config(cfg: dict, comm: Optional[Communicator] = None, resume: bool = True,
                      config_path: Optional[str] = None,
                      validation: Optional[Callable[[], Iterable[Any]]] = None) -> TrainResult:
    """Build the trainer (resuming from the run's latest checkpoint when there is one) and fit.

    A SIGTERM/SIGUSR1/SIGINT during the setup (checking the data and computing the normalisation
    can take minutes on a large file) stops it at once: status ``"preempted"`` (``"interrupted"``
    for SIGINT), nothing new written, and rerunning the command starts (or resumes) as if the
    interrupted attempt had not happened. ``validation``: as in :func:`trainer_from_config`."""
    comm = comm or SerialComm()
    try:
        with PreemptionFlag(raise_on_signal=True):
            trainer = trainer_from_config(cfg, comm, resume, config_path, validation)
    except PreemptedError as err:
        previous = latest_readable_checkpoint(os.path.join(cfg["training"]["out_dir"], "checkpoints"))[0] \
            if resume else None
        status = "interrupted" if err.signal == "SIGINT" else "preempted"
        return TrainResult(status, previous.step if previous else 0, previous.path if previous else None,
                           os.path.join(cfg["training"]["out_dir"], "metrics.jsonl"), None, None, err.signal)
    return trainer.fit()
