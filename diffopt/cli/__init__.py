"""The ``diffopt`` command line: one module per command, each with ``add_parser(commands)``
and ``run(args)``; they parse arguments, call the library and print what it returns.

=================== ============================================= ==============================
command             module                                        library underneath
=================== ============================================= ==============================
``demo``            :mod:`diffopt.cli.demo`                       :mod:`diffopt.training.demo`
``train``           :mod:`diffopt.cli.train`                      :mod:`diffopt.training.experiment`
``check``           :mod:`diffopt.cli.check`                      :mod:`diffopt.testing.runner`
``diagnose``        :mod:`diffopt.cli.diagnose`                   :mod:`diffopt.diagnostics`
``train-optimizer`` :mod:`diffopt.cli.train_optimizer`            :mod:`diffopt.training.learned_optimizers`
``bench``           :mod:`diffopt.cli.bench`                      :mod:`diffopt.bench`
=================== ============================================= ==============================

Entry points: ``diffopt`` (``pyproject.toml``: ``diffopt.cli:main``) and ``python -m diffopt``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .._version import __version__
from . import bench, check, demo, diagnose, train, train_optimizer

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffopt",
        description="Differentiable optimization for PyTorch: meta-gradients through optimizer steps.",
    )
    parser.add_argument("--version", action="version", version=f"diffopt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (demo, train, check, diagnose, train_optimizer, bench):
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "train":
        return train.run(args, parser, argv)
    runners = {"demo": demo.run, "check": check.run, "diagnose": diagnose.run,
               "train-optimizer": train_optimizer.run, "bench": bench.run}
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
