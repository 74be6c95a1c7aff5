"""``diffopt diagnose CHECKPOINT``: the diagnostics of a meta-learner saved by ``diffopt train``.

The checkpoint is loaded safely (``torch.load(weights_only=True)``: no pickled
code runs); the learner and the task source are rebuilt from the configuration
stored in it (the arguments ``diffopt train`` was given), the weights loaded,
``--tasks`` held-out test tasks drawn and the table printed. ``--json`` and
``--plot`` save the report.

    diffopt diagnose run.pt --sigma 0.5 --tasks 50 --json diag.json --plot diag.png

Wiring (``diffopt/cli.py``)::

    from .diagnostics.cli import add_parser as add_diagnose
    add_diagnose(commands)
    ...
    if args.command == "diagnose":
        from .diagnostics.cli import run as run_diagnose
        return run_diagnose(args)
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, Optional, Tuple

__all__ = ["add_parser", "run", "rebuild"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``diagnose`` subcommand to ``subparsers`` (from ``parser.add_subparsers``)."""
    from .report import DIAGNOSTICS

    p = subparsers.add_parser(
        "diagnose", help="information-theoretic diagnostics of a saved meta-learner's adaptation",
        description="Rebuild the learner and task source of a checkpoint written by 'diffopt train', draw "
        "held-out test tasks and print the diagnostics of adaptation (mean and 95%% CI across tasks).")
    p.add_argument("checkpoint", help="a checkpoint written by 'diffopt train --checkpoint PATH'")
    p.add_argument("--tasks", type=int, default=25, help="held-out test tasks to diagnose (default 25)")
    p.add_argument("--sigma", type=float, default=None,
                   help="observation noise σ of the regression likelihood N(f(x), σ²); required for regression")
    p.add_argument("--which", nargs="+", choices=DIAGNOSTICS, default=None, metavar="NAME",
                   help=f"diagnostics to compute (default: all that apply): {', '.join(DIAGNOSTICS)}")
    p.add_argument("--steps", type=int, default=None, help="inner steps at test time (default: the learner's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the diagnostics' own generator")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="also save a plot (needs matplotlib)")
    p.add_argument("--data-root", default=None, help="the Omniglot folder, for checkpoints trained on Omniglot")
    return p


def _namespace(config: Dict[str, Any], tasks: int, data_root: Optional[str]) -> argparse.Namespace:
    """The ``diffopt train`` arguments that rebuild a checkpoint's learner and task source."""
    if "algo" not in config or "tasks" not in config or "task" not in config.get("tasks", {}):
        raise ValueError("the checkpoint was not written by 'diffopt train' (its configuration has no algorithm "
                         "and task family); rebuild the learner in Python, load its weights and call "
                         "diffopt.diagnostics.diagnose(learner, tasks, ...)")
    source, learner = config["tasks"], config.get("learner", {})
    return argparse.Namespace(
        task=source["task"], algo=config["algo"], meta_batch=source.get("meta_batch"), shots=source.get("shots"),
        query=source.get("query"), inner_lr=config.get("inner_lr"), inner_steps=learner.get("inner_steps", 1),
        mode=learner.get("mode"), ways=source.get("ways", 5), test_tasks=tasks, seed=config.get("seed", 0),
        data_root=data_root, outer_lr=config.get("outer_lr", 1e-3),
    )


def rebuild(path: str, tasks: int = 25, data_root: Optional[str] = None) -> Tuple[Any, Any, Dict[str, Any]]:
    """``(learner, task source, payload)`` from a ``diffopt train`` checkpoint, weights loaded.

    The checkpoint is read with ``weights_only=True``; the learner's configuration
    is checked against the rebuilt one. The global RNG state is restored after
    the rebuild (building a model draws its initial weights from it).
    """
    import torch

    from .. import run as train_run
    from ..training import config_differences, load_checkpoint

    payload = load_checkpoint(path)
    config = payload.get("config", {})
    args = _namespace(config, tasks, data_root)
    with torch.random.fork_rng(devices=[]):
        try:
            source, learner, _ = train_run.build(args)
        except SystemExit as exc:  # build() exits with a message for a missing --data-root
            raise ValueError(str(exc)) from None
    saved = config.get("learner")
    if saved is not None:
        diff = config_differences(saved, learner.config())
        if diff:
            raise ValueError(f"{path}: the rebuilt learner does not match the checkpoint's: " + "; ".join(diff))
    learner.load_state_dict(payload["learner"])
    learner.eval()
    return learner, source, payload


def run(args: argparse.Namespace) -> int:
    """Run ``diffopt diagnose`` with parsed arguments; 0 on success, 2 with a one-line error otherwise."""
    from ..training import CheckpointError
    from ._functional import SecondOrderUnavailable
    from .learner import diagnose

    try:
        if args.tasks < 1:
            raise ValueError(f"--tasks must be >= 1, got {args.tasks}")
        learner, source, payload = rebuild(args.checkpoint, args.tasks, getattr(args, "data_root", None))
        report = diagnose(learner, source, which=args.which, steps=args.steps, sigma=args.sigma,
                          max_tasks=args.tasks, seed=args.seed)
    except (ValueError, TypeError, OSError, CheckpointError, SecondOrderUnavailable) as error:
        print(f"diffopt diagnose: error: {error}", file=sys.stderr)
        return 2
    print(f"diffopt diagnose {args.checkpoint}: {report.settings['learner']} after {payload.get('iteration')} "
          f"meta-iterations, {report.settings['tasks']} test tasks of {payload['config']['tasks']['task']}, "
          f"{report.settings['inner_steps']} inner step(s)\n")
    print(report.to_table())
    if args.json:
        report.to_json(args.json)
        print(f"\nJSON: {args.json}")
    if args.plot:
        try:
            report.plot(args.plot)
        except ImportError as error:
            print(f"diffopt diagnose: error: {error}", file=sys.stderr)
            return 2
        print(f"plot: {args.plot}")
    return 0
