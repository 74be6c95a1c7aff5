"""The ``diffopt`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffopt",
        description="Differentiable optimization for PyTorch: meta-gradients through optimizer steps.",
    )
    parser.add_argument("--version", action="version", version=f"diffopt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser("demo", help="meta-train MAML on sinusoid and compare with pretraining (~2 min)")
    demo.add_argument("--iterations", type=int, default=10000, help="meta-iterations (the paper uses 70,000)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--plot", default="diffopt-demo.png", help="where to save the plot ('' for none)")
    demo.add_argument("--no-progress", action="store_true")

    from .recipes import ALGORITHMS

    train = commands.add_parser("train", help="meta-train an algorithm on a task family")
    train.add_argument("--task", choices=("sinusoid", "synthetic", "glyphs", "omniglot"), default="sinusoid")
    train.add_argument("--algo", choices=ALGORITHMS, default="maml")
    train.add_argument("--mode", default=None, help="engine mode for gradient-based algorithms")
    train.add_argument("--iterations", type=int, default=1000)
    train.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-batch (default: protocol's)")
    train.add_argument("--inner-steps", type=int, default=1)
    train.add_argument("--inner-lr", type=float, default=None)
    train.add_argument("--outer-lr", type=float, default=1e-3)
    train.add_argument("--ways", type=int, default=5)
    train.add_argument("--shots", type=int, default=None)
    train.add_argument("--query", type=int, default=None)
    train.add_argument("--test-tasks", type=int, default=600)
    train.add_argument("--eval-every", type=int, default=0)
    train.add_argument("--eval-steps", default="0,1,5,10", help="test-time inner steps, comma-separated")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--data-root", default=None, help="Omniglot folder (images_background/, images_evaluation/)")
    train.add_argument("--omniglot-train-classes", type=int, default=1200,
                       help="characters used for meta-training (the protocol's 1200); the rest are test classes")
    train.add_argument("--checkpoint", default=None, help="checkpoint path (written atomically)")
    train.add_argument("--checkpoint-every", type=int, default=1000)
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    train.add_argument("--metrics", default=None, help="JSON-lines metrics path")
    train.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    train.add_argument("--no-progress", action="store_true")
    from .bench_cli import add_parser as add_bench
    from .diagnostics.cli import add_parser as add_diagnose
    from .optim.learned.cli import add_parser as add_train_optimizer
    from .testing.runner import add_parser as add_check

    add_check(commands)
    add_diagnose(commands)
    add_train_optimizer(commands)
    add_bench(commands)
    train.add_argument("--nproc", type=int, default=1, help="processes to shard the meta-batch over (gloo on CPU)")
    train.add_argument("--backend", default="auto", help="torch.distributed backend: gloo, nccl or auto")
    train.add_argument("--timeout", type=float, default=300.0,
                       help="seconds before the other ranks give up on a dead or hung rank")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        from .demo import run

        run(iterations=args.iterations, seed=args.seed, plot=args.plot or None, progress=not args.no_progress)
        return 0
    if args.command == "bench":
        from .bench_cli import run as run_bench

        return run_bench(args)
    if args.command == "train-optimizer":
        from .optim.learned.cli import run as run_train_optimizer

        return run_train_optimizer(args)
    if args.command == "diagnose":
        from .diagnostics.cli import run as run_diagnose

        return run_diagnose(args)
    if args.command == "check":
        from .testing.runner import run as run_check

        return run_check(args)
    if args.command == "train":
        if args.nproc > 1:
            from .distributed import launch

            raw = list(sys.argv[1:] if argv is None else argv)
            return launch(_without_nproc(raw), args.nproc, args.timeout)
        from .run import train_from_args
        from .tasks import OmniglotLayoutError

        try:
            summary = train_from_args(args)
        except (ValueError, OmniglotLayoutError) as error:  # settings, data or checkpoint: say what, no traceback
            parser.exit(2, f"diffopt train: error: {error}\n")
        if summary is not None:
            print(json.dumps(summary, indent=2, default=_plain))
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--nproc":
            skip = True
            continue
        if item.startswith("--nproc="):
            continue
        out.append(item)
    return out


def _plain(value: Any) -> Any:
    return float(value)


if __name__ == "__main__":
    sys.exit(main())
