"""The command line every application shares: a TOML config read by invnet's config machinery,
overrides, training through the library trainer, and the documented exit codes.

An application's ``__main__`` builds its parser with :func:`app_parser` (``--config``, ``--out``,
``--steps``, ``--set SECTION.KEY=VALUE``, ``--restart``), reads the config with
:func:`load_app_config` and trains with :func:`train`; a run stopped by SIGTERM/SIGUSR1 or Ctrl-C
has written a checkpoint and exits with 75 or 130 (rerun the same command to resume), as
``invnet train`` does (:mod:`invnet.training.signals`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Iterable, Optional

from invnet.training import EXIT_USAGE, TrainResult, train_from_config, validate_config
from invnet.training.signals import exit_code_for_signal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["app_parser", "load_app_config", "train", "parse_assignment", "run_main", "require_source"]


def app_parser(prog: str, doc: str, default_config: str) -> argparse.ArgumentParser:
    """The shared options of ``python -m applications.NAME`` (an application adds its own)."""
    parser = argparse.ArgumentParser(prog=f"python -m applications.{prog}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config,
                        help="TOML config read by invnet's config machinery "
                             f"(docs/config.md; default {default_config})")
    parser.add_argument("--out", default=None,
                        help="run folder (checkpoints/, metrics.jsonl, metrics.png, results); overrides "
                             "[training] out_dir, which is relative to the config file")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (overrides [training] steps; a cosine schedule's T_max follows)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override one config value, e.g. --set model.depth=4 (values are read as JSON, else "
                             "as strings); repeatable")
    parser.add_argument("--restart", action="store_true",
                        help="start over: a previous run in the run folder is moved aside to OUT.previous-DATE-TIME")
    return parser


def parse_assignment(text: str) -> tuple[str, str, Any]:
    """``"section.key=value"`` as ``(section, key, value)``, the value read as JSON when it can be.

    >>> parse_assignment("model.depth=4"), parse_assignment("model.summary={\\"type\\": \\"VectorSummary\\"}")[2]
    (('model', 'depth', 4), {'type': 'VectorSummary'})
    >>> parse_assignment("optimizer.name=AdamW")
    ('optimizer', 'name', 'AdamW')
    """
    target, sep, value = text.partition("=")
    section, dot, key = target.partition(".")
    if not sep or not dot or not section or not key:
        raise ValueError(f"--set takes SECTION.KEY=VALUE (e.g. model.depth=4), got {text!r}")
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return section, key, parsed


def load_app_config(args: argparse.Namespace) -> dict:
    """The validated config of ``args.config`` with the command line's overrides (``--steps``,
    ``--out``, ``--set``); relative paths in the file are taken from the file's folder, ``--out``
    from the current one. Raises ``ValueError`` before anything is read or written."""
    path = args.config
    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r} is not a file")
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from None
    for text in args.overrides:
        section, key, value = parse_assignment(text)
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ValueError(f"--set {text!r}: [{section}] is not a table")
        table[key] = value
    if args.steps is not None:
        training = raw.setdefault("training", {})
        scheduler = raw.get("scheduler") or {}
        if scheduler.get("name") == "CosineAnnealingLR" and scheduler.get("T_max") == training.get("steps"):
            scheduler["T_max"] = args.steps  # the schedule spans the run, as the file says it does
        training["steps"] = args.steps
    if args.out is not None:
        raw.setdefault("training", {})["out_dir"] = os.path.abspath(args.out)
    return validate_config(raw, os.path.dirname(os.path.abspath(path)))


def require_source(cfg: dict, source: str) -> dict:
    """The ``[data] arguments`` of ``cfg`` (a dict) after checking that its pairs come from the
    simulator ``source`` (``"package.module:function"``), the one the application evaluates.

    >>> require_source({"data": {"source": "a.b:simulate", "arguments": None}}, "a.b:simulate")
    {}
    >>> require_source({"data": {"source": None, "path": "d.h5"}}, "a.b:simulate")
    Traceback (most recent call last):
    ...
    ValueError: this application's config draws its pairs from [data] source = 'a.b:simulate', got 'd.h5'
    """
    data = cfg["data"]
    if data["source"] != source:
        raise ValueError(f"this application's config draws its pairs from [data] source = {source!r}, "
                         f"got {data['source'] or data['path']!r}")
    return dict(data["arguments"] or {})


def train(cfg: dict, args: argparse.Namespace, comm: Optional[Any] = None,
          validation: Optional[Callable[[], Iterable[Any]]] = None) -> TrainResult:
    """Train (or resume) the run ``cfg`` describes through the library trainer, on every rank of
    ``comm`` (serial when ``None``; only rank 0 prints); a run stopped by a signal (its checkpoint
    written) ends the process with 75 (SIGTERM/SIGUSR1) or 130 (Ctrl-C), on every rank.
    ``validation``: the application's own validation batches (e.g. held-out images), replacing
    the config's (:func:`~invnet.training.trainer_from_config`)."""
    result = train_from_config(cfg, comm=comm, resume=not args.restart, config_path=args.config,
                               validation=validation)
    speaks = comm is None or comm.rank == 0  # under mpiexec, rank 0 speaks for all
    if result.status != "finished":
        if speaks:
            print(f"{result.status} at step {result.step}; checkpoint: {result.checkpoint}; rerun the same command "
                  "to resume", flush=True)
        if comm is not None:
            comm.barrier()  # a non-zero exit ends an MPI job: no rank may end it before rank 0 has spoken
        raise SystemExit(exit_code_for_signal(result.signal or ""))
    if speaks:
        print(f"trained {result.step} steps; checkpoint: {result.checkpoint}; metrics: {result.metrics_path}",
              flush=True)
    if comm is not None:
        comm.barrier()  # rank 0 writes the checkpoints: no rank reads the run before it is complete
    return result


def run_main(main: Any, argv: Optional[list[str]] = None) -> int:
    """Run an application's ``main(argv)``: bad input (a ``ValueError`` or a missing file) is one
    line on stderr and exit 2, as the ``invnet`` command does."""
    try:
        code = main(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return int(code or 0)
