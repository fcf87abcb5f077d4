"""Assemble a training job from a validated config: data, normalisation, network, optimizer."""
from __future__ import annotations

import json
import os
from typing import Iterator, Optional

import numpy as np
import torch

from ..data import BatchLoader, Normalization, compute_normalization, open_pairs, train_validation_split
from .checkpoint import latest_checkpoint, read_checkpoint
from .comm import Comm, SerialComm
from .network_spec import build_network, resolve_network_spec
from .signals import PreemptedError, PreemptionFlag
from .trainer import Trainer, TrainResult

__all__ = ["trainer_from_config", "train_from_config"]


def _validation_batches(dataset, indices, batch_size, normalization, dtype, seed) -> "callable":
    corners = None
    if dataset.patch is not None:  # fixed patches, so every validation sees the same data
        rng = np.random.default_rng([seed, 2**31 - 1])
        space = dataset.x.shape[2:]
        corners = [[int(rng.integers(0, s - p + 1)) for s, p in zip(space, dataset.patch)] for _ in indices]

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for k in range(0, len(indices), batch_size):
            cs = None if corners is None else corners[k:k + batch_size]
            x, y = dataset.read(indices[k:k + batch_size], cs)
            x, y = torch.from_numpy(x).to(dtype), torch.from_numpy(y).to(dtype)
            yield normalization.x_to_normal(x), normalization.y_to_normal(y)

    return batches


def trainer_from_config(cfg: dict, comm: Optional[Comm] = None, resume: bool = True) -> Trainer:
    """Build the :class:`Trainer` a validated config describes (see
    :func:`~invnet.training.config.validate_config`). Data are checked (names, shapes, dtypes,
    finite values) and normalisation statistics computed before anything is written; on resume
    the stored normalisation is reused, not recomputed."""
    comm = comm or SerialComm()
    d, t = cfg["data"], cfg["training"]
    max_bytes = None if d["max_read_mb"] is None else int(d["max_read_mb"] * 2**20)
    dataset = open_pairs(d["path"], d["x"], d["y"], d["patch"], max_bytes)
    train_idx, val_idx = train_validation_split(len(dataset), d["validation_fraction"], d["seed"])
    ckpt_path = latest_checkpoint(os.path.join(t["out_dir"], "checkpoints")) if resume else None
    if ckpt_path is not None:
        meta = read_checkpoint(ckpt_path).meta
        normalization = Normalization.from_dict(meta["normalization"])
    else:
        normalization = compute_normalization(dataset, train_idx)  # also rejects NaN/Inf
        if len(val_idx):
            compute_normalization(dataset, val_idx)  # finite-value check of the validation part
    dtype = {"float32": torch.float32, "float64": torch.float64}[t["dtype"]]
    torch.manual_seed(t["seed"])
    spec = resolve_network_spec(cfg["model"], dataset.x_shape, dataset.y_shape)
    model = build_network(spec).to(dtype)
    if comm.size > 1 and hasattr(comm, "broadcast"):  # an invnet.distributed communicator: data parallel
        from ..distributed import broadcast_parameters, use_global_statistics

        use_global_statistics(model, comm)  # ActNorm initialised from the global batch
        broadcast_parameters(model, comm)  # replicas start identical
    with torch.no_grad():  # shapes fit? (through the summary network, if any, on a dummy observation)
        c = model.condition(torch.zeros((1,) + dataset.y_shape, dtype=dtype))
        model.check_shape((1,) + dataset.x_shape, None if c is None else tuple(c.shape))
    opt_kwargs = {k: v for k, v in cfg["optimizer"].items() if k != "name"}
    optimizer = getattr(torch.optim, cfg["optimizer"]["name"])(model.parameters(), **opt_kwargs)
    scheduler = None
    if cfg["scheduler"] is not None:
        s_kwargs = {k: v for k, v in cfg["scheduler"].items() if k != "name"}
        scheduler = getattr(torch.optim.lr_scheduler, cfg["scheduler"]["name"])(optimizer, **s_kwargs)
    loader = BatchLoader(dataset, train_idx, t["batch_size"], t["seed"], normalization, dtype, comm.rank, comm.size)
    validation = None
    if len(val_idx):
        mine = np.array_split(val_idx, comm.size)[comm.rank]
        validation = _validation_batches(dataset, mine, t["batch_size"], normalization, dtype, t["seed"])
    data_info = {"path": d["path"], "x": d["x"], "y": d["y"], "x_shape": list(dataset.x_shape),
                 "y_shape": list(dataset.y_shape), "n_train": int(len(train_idx)), "n_validation": int(len(val_idx)),
                 "validation_fraction": d["validation_fraction"], "split_seed": d["seed"], "patch": d["patch"],
                 "dtype": t["dtype"]}
    trainer = Trainer(
        model, optimizer, loader, t["out_dir"], t["steps"], scheduler=scheduler, validation=validation,
        normalization=normalization, spec=spec, data_info=data_info, clip_grad_norm=t["clip_grad_norm"],
        validate_every=t["validate_every"], log_every=t["log_every"],
        checkpoint_every_steps=t["checkpoint_every_steps"], checkpoint_every_minutes=t["checkpoint_every_minutes"],
        keep_last=t["keep_last"], progress=t["progress"], comm=comm,
    )
    if comm.rank == 0:  # atomically: a signal or crash never leaves half a file
        path = os.path.join(t["out_dir"], "config.json")
        with open(path + ".tmp", "w") as f:
            json.dump(cfg, f, indent=1)
        os.replace(path + ".tmp", path)
    if ckpt_path is not None:
        trainer.resume(ckpt_path)
    return trainer


def train_from_config(cfg: dict, comm: Optional[Comm] = None, resume: bool = True) -> TrainResult:
    """Build the trainer (resuming from the run's latest checkpoint when there is one) and fit.

    A SIGTERM/SIGUSR1 during the setup (checking the data and computing the normalisation can take
    minutes on a large file) stops it at once: status ``"preempted"``, nothing new written, and
    rerunning the command starts (or resumes) as if the interrupted attempt had not happened."""
    try:
        with PreemptionFlag(raise_on_signal=True):
            trainer = trainer_from_config(cfg, comm, resume)
    except PreemptedError:
        previous = latest_checkpoint(os.path.join(cfg["training"]["out_dir"], "checkpoints")) if resume else None
        step = read_checkpoint(previous).step if previous else 0
        return TrainResult("preempted", step, previous, os.path.join(cfg["training"]["out_dir"], "metrics.jsonl"),
                           None, None)
    return trainer.fit()
