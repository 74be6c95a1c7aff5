"""``diffopt train``: meta-train an algorithm on a task family and print a JSON summary (standard JSON:
non-finite numbers, a diverged test task's mean and interval, print as ``null``).

The run itself is :mod:`diffopt.training.experiment` (:class:`TrainSettings`,
:func:`~diffopt.training.experiment.train`); with ``--nproc N`` this process
starts N ranks of itself (:func:`diffopt.distributed.launch`).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._measure import _standard_json
from ..errors import DistributedError, PeerFailure
from ..recipes import ALGORITHMS
from ..tasks import OmniglotLayoutError
from ..training import experiment
from ._signals import interrupt_on
from ._types import count, int_list, number, seed

__all__ = ["add_parser", "run", "settings_from_args"]


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``train`` command to ``commands`` (from ``parser.add_subparsers()``)."""
    train = commands.add_parser("train", help="meta-train an algorithm on a task family")
    train.add_argument("--task", choices=experiment.TASKS, default="sinusoid")
    train.add_argument("--algo", choices=ALGORITHMS, default="maml")
    train.add_argument("--mode", default=None, help="engine mode for gradient-based algorithms")
    train.add_argument("--iterations", type=count(0), default=1000)
    train.add_argument("--meta-batch", type=count(1), default=None, help="tasks per meta-batch (default: protocol's)")
    train.add_argument("--inner-steps", type=count(0), default=None, help="inner steps (default 5 for mamlpp, 1 otherwise)")
    train.add_argument("--inner-lr", type=number(0), default=None)
    train.add_argument("--outer-lr", type=number(0), default=None,
                       help="outer learning rate (default 1e-3 for Adam; Reptile's step size ε, default 1.0)")
    train.add_argument("--ways", type=count(1), default=None, help="classes per task (default 5; not for sinusoid)")
    train.add_argument("--shots", type=count(1), default=None)
    train.add_argument("--query", type=count(1), default=None)
    train.add_argument("--test-tasks", type=count(1), default=600)
    train.add_argument("--eval-every", type=count(0), default=0)
    train.add_argument("--eval-steps", type=int_list, default=None,
                       help="test-time inner steps, comma-separated (default 0,1,5,10; not for the metric learners)")
    train.add_argument("--seed", type=seed, default=0)
    train.add_argument("--data-root", default=None, help="Omniglot folder (images_background/, images_evaluation/)")
    train.add_argument("--omniglot-train-classes", type=count(1), default=None,
                       help="characters used for meta-training (default: the protocol's 1200); the rest are test classes")
    train.add_argument("--checkpoint", default=None, help="checkpoint path (written atomically)")
    train.add_argument("--checkpoint-every", type=count(1), default=1000)
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an existing --checkpoint and --metrics (without it, or --resume, they are kept)")
    train.add_argument("--metrics", default=None, help="JSON-lines metrics path")
    train.add_argument("--threads", type=count(1), default=None, help="torch threads (default: torch's)")
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--nproc", type=count(1), default=1, help="processes to shard the meta-batch over (gloo on CPU)")
    train.add_argument("--backend", default="auto", help="torch.distributed backend: gloo, nccl or auto")
    train.add_argument("--timeout", type=number(0), default=300.0,
                       help="seconds before the other ranks give up on a dead or hung rank")
    return train


def settings_from_args(args: argparse.Namespace) -> experiment.TrainSettings:
    """The run the parsed arguments describe."""
    return experiment.TrainSettings(
        task=args.task, algo=args.algo, mode=args.mode, iterations=args.iterations, meta_batch=args.meta_batch,
        inner_steps=args.inner_steps, inner_lr=args.inner_lr, outer_lr=args.outer_lr, ways=args.ways,
        shots=args.shots, query=args.query, test_tasks=args.test_tasks, eval_every=args.eval_every,
        eval_steps=None if args.eval_steps is None else tuple(args.eval_steps), seed=args.seed,
        data_root=args.data_root, omniglot_train_classes=args.omniglot_train_classes, checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every, resume=args.resume, overwrite=args.overwrite, metrics=args.metrics, threads=args.threads,
        progress=not args.no_progress, backend=args.backend, timeout=args.timeout,
    )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Run ``diffopt train``; errors in the settings, data or checkpoint, a divergence, a failed
    write and a failed rank end with one line and status 2, never a traceback."""
    if args.nproc > 1:
        from ..distributed import launch

        try:
            settings = settings_from_args(args)
            settings.validate()
            experiment.check_outputs(settings)
        except ValueError as error:
            parser.exit(2, f"diffopt train: error: {error}\n")
        raw = list(sys.argv[1:] if argv is None else argv)
        return launch(_without_nproc(raw), args.nproc, args.timeout)
    stopped: list[int] = []
    try:
        with interrupt_on(signal.SIGTERM, stopped):
            summary = experiment.train(settings_from_args(args))
    except KeyboardInterrupt:  # SIGINT, or SIGTERM (kill, timeout, a scheduler, the --nproc launcher)
        name = signal.Signals(stopped[0]).name if stopped else "SIGINT"
        if args.checkpoint is None:
            kept = "no --checkpoint was given, nothing was saved"
        elif Path(args.checkpoint).is_file():
            kept = f"the last checkpoint {args.checkpoint} is kept; continue with --resume"
        else:
            kept = f"no checkpoint was written yet (every {args.checkpoint_every} iterations, and at the end)"
        print(f"diffopt train: stopped by {name}; {kept}", file=sys.stderr)
        return 128 + (stopped[0] if stopped else signal.SIGINT)
    except (ValueError, OmniglotLayoutError) as error:  # settings, data or checkpoint: say what, no traceback
        parser.exit(2, f"diffopt train: error: {error}\n")
    except FloatingPointError as error:  # divergence: the meta-iteration, task, step and likely cause
        parser.exit(2, f"diffopt train: error: {error}\n")
    except (OSError, PeerFailure, DistributedError) as error:  # a full disk, a dead or hung rank: one line
        parser.exit(2, f"diffopt train: error: {error}\n")
    if summary is not None:
        # standard JSON: a diverged test task's inf / nan mean and interval print as null (not Infinity / NaN)
        print(json.dumps(_standard_json(summary), indent=2, allow_nan=False))
    return 0


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
