"""The ``invnet`` command. Subcommands register themselves in ``_COMMANDS``."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps, seed=args.seed)
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="invnet", description="Memory-efficient invertible networks.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small flow on a built-in problem and report what it learned")
    demo.add_argument("--steps", type=int, default=1500)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
