"""``diffopt diagnose CHECKPOINT``: the diagnostics of a meta-learner saved by ``diffopt train``.

The checkpoint is loaded safely (``torch.load(weights_only=True)``: no pickled
code runs); the learner and the task source are rebuilt from the configuration
stored in it (the arguments ``diffopt train`` was given), the weights loaded,
``--tasks`` held-out test tasks drawn and the table printed. ``--json`` and
``--plot`` save the report.

    diffopt diagnose run.pt --sigma 0.5 --tasks 50 --json diag.json --plot diag.png

The rebuild is :func:`diffopt.training.experiment.rebuild`, the report
:func:`diffopt.diagnostics.diagnose`; this module parses and prints.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

from .._io import check_writable, describe_os_error
from ..diagnostics import DIAGNOSTICS, SecondOrderUnavailable, diagnose
from ..training import CheckpointError
from ..training.experiment import rebuild
from ._types import count, number, seed

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``diagnose`` subcommand to ``subparsers`` (from ``parser.add_subparsers``)."""
    p = subparsers.add_parser(
        "diagnose", help="information-theoretic diagnostics of a saved meta-learner's adaptation",
        description="Rebuild the learner and task source of a checkpoint written by 'diffopt train', draw "
        "held-out test tasks and print the diagnostics of adaptation (mean and 95% CI across tasks).")
    p.add_argument("checkpoint", help="a checkpoint written by 'diffopt train --checkpoint PATH'")
    p.add_argument("--tasks", type=count(1), default=25, help="held-out test tasks to diagnose (default 25)")
    p.add_argument("--sigma", type=number(0), default=None,
                   help="observation noise σ of the regression likelihood N(f(x), σ²); required for regression")
    p.add_argument("--which", nargs="+", choices=DIAGNOSTICS, default=None, metavar="NAME",
                   help=f"diagnostics to compute (default: all that apply): {', '.join(DIAGNOSTICS)}")
    p.add_argument("--steps", type=count(0), default=None, help="inner steps at test time (default: the learner's)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the diagnostics' own generator")
    p.add_argument("--power-iters", type=count(1), default=None, metavar="N",
                   help="at most N Lanczos iterations (Hessian-vector products) per task for the curvature's "
                   "lambda_max and rho (default 20); a value that does not converge is flagged in the report")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="also save a plot (needs matplotlib)")
    p.add_argument("--data-root", default=None, help="the Omniglot folder, for checkpoints trained on Omniglot")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``diffopt diagnose`` with parsed arguments; 0 on success, 2 with a one-line error otherwise."""
    try:
        if args.tasks < 1:
            raise ValueError(f"--tasks must be >= 1, got {args.tasks}")
        _check_outputs(args)
        learner, source, payload = rebuild(args.checkpoint, args.tasks, args.data_root)
        extra = {} if args.power_iters is None else {"power_iters": args.power_iters}
        report = diagnose(learner, source, which=args.which, steps=args.steps, sigma=args.sigma,
                          max_tasks=args.tasks, seed=args.seed, **extra)
    except (ValueError, TypeError, OSError, CheckpointError, SecondOrderUnavailable) as error:
        print(f"diffopt diagnose: error: {error}", file=sys.stderr)
        return 2
    print(f"diffopt diagnose {args.checkpoint}: {report.settings['learner']} after {payload.get('iteration')} "
          f"meta-iterations, {report.settings['tasks']} test tasks of {payload['config']['tasks']['task']}, "
          f"{report.settings['inner_steps']} inner step(s)\n")
    print(report.to_table())
    try:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            report.to_json(args.json)
            print(f"\nJSON: {args.json}")
        if args.plot:
            Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
            report.plot(args.plot)
            print(f"plot: {args.plot}")
    except (ImportError, ValueError, RuntimeError) as error:  # no matplotlib, a NaN for JSON, a LaTeX-less .pgf
        print(f"diffopt diagnose: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a folder removed meanwhile: one line
        print(f"diffopt diagnose: error: could not write {error.filename or 'the report'}: "
              f"{describe_os_error(error)}", file=sys.stderr)
        return 2
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """Before the diagnostics run: --json and --plot can be written, --plot names a format matplotlib
    writes (without a suffix matplotlib would add .png and save elsewhere than the path given)."""
    for path, flag, example in ((args.json, "--json", "diagnostics.json"), (args.plot, "--plot", "diagnostics.png")):
        if path:
            check_writable(path, flag, example)
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib: pip install matplotlib (or leave out --plot)")
        from matplotlib.figure import Figure

        formats = sorted(Figure().canvas.get_supported_filetypes())
        suffix = Path(args.plot).suffix.lower().lstrip(".")
        if suffix not in formats:
            stem = Path(args.plot).with_suffix("") if suffix else Path(args.plot)
            raise ValueError(f"--plot {args.plot}: give a file name ending in a format matplotlib writes "
                             f"({', '.join('.' + f for f in formats)}), e.g. {stem}.png")
