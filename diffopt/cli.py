"""The ``diffopt`` command line."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffopt",
        description="Differentiable optimization for PyTorch: meta-gradients through optimizer steps.",
    )
    parser.add_argument("--version", action="version", version=f"diffopt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="run the main demonstration (about a minute on a laptop CPU)")
    demo.add_argument("--steps", type=int, default=50, help="inner Adam steps to differentiate through")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        from .demo import run

        run(steps=args.steps)
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
