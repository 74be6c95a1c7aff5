"""``diffopt demo``: meta-train MAML on sinusoid regression, compare it with pretraining, print the table.

The experiment is :func:`diffopt.training.demo.run`; this module parses its
options and prints what it returns.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..training import demo, summary_text
from ._types import count, seed

__all__ = ["add_parser", "format_table", "run"]


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` command to ``commands`` (from ``parser.add_subparsers()``)."""
    p = commands.add_parser("demo", help="meta-train MAML on sinusoid and compare with pretraining (~2 min)")
    p.add_argument("--iterations", type=count(1), default=10000, help="meta-iterations (the paper uses 70,000)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--plot", default="diffopt-demo.png", help="where to save the plot ('' for none)")
    p.add_argument("--no-progress", action="store_true")
    return p


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per method, mean ± 95% CI of the query MSE after each of the demo's steps."""
    steps = demo.EVAL_STEPS
    header = "| method | " + " | ".join(f"{k} step{'s' if k != 1 else ''}" for k in steps) + " |"
    lines = [header, "|---" * (len(steps) + 1) + "|"]
    for name, summary in results.items():
        cells = [summary_text(summary[str(k)]) for k in steps]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(f"diffopt demo: MAML on sinusoid regression, {args.iterations} meta-iterations ({demo.PROTOCOL})")
    result = demo.run(iterations=args.iterations, seed=args.seed, plot=args.plot or None,
                      progress=not args.no_progress)
    print("\nQuery MSE on 600 test tasks, 5 support points, after k steps of SGD (lr 0.01); mean ± 95% CI\n")
    print(format_table(result.results))
    print(f"\nPaper (70,000 iterations): {demo.PAPER}")
    print("\nWhat adaptation did (50 test tasks, Gaussian likelihood with sigma 0.5):\n")
    print(result.headline)
    if args.plot:
        if result.plot:
            print(f"\nplot of adapted fits: {result.plot}")
        else:
            print("\n(matplotlib is not installed: no plot; pip install 'diffopt[plot]')")
    print(f"\nmeta-training {result.maml_seconds:.0f} s, total {result.seconds:.0f} s")
    return 0
