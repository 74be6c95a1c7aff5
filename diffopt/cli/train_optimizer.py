"""``diffopt train-optimizer``: meta-train a learned update rule and save it.

Parses the command line into a :class:`diffopt.training.TrainConfig`, runs
:class:`diffopt.training.OptimizerTrainer` and prints a JSON summary.

Example (≈1–2 minutes on 2 CPU cores)::

    diffopt train-optimizer --rule mlp --task sinusoid --unroll 40 --truncation 10 \\
        --meta-iterations 80 --output mlp-sinusoid.pt --checkpoint run.ckpt --resume

The saved file is used in a plain training loop with
``diffopt.optim.learned.load(path, model.parameters())``.

Every output (``--output``, ``--checkpoint``, ``--metrics``) is checked before any
training: a folder or an unwritable place is refused, and so is an earlier run's
file unless ``--resume`` continues that run or ``--overwrite`` replaces it. Bad
``--rule-option`` / ``--task-option`` values, a divergence and SIGINT/SIGTERM end
in one line on stderr (status 2, or 128 + the signal).
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from .._io import check_writable, describe_os_error
from ..optim import learned
from ..optim.learned import RULES, LearnedRuleError
from ..training import FAMILIES, OBJECTIVES, CheckpointError, OptimizerTrainer, TrainConfig, experiment
from ..training.learned_optimizers import MODES
from ._signals import interrupt_on
from ._types import count, number, seed

__all__ = ["add_parser", "run"]


def _parse_options(pairs: list[str], what: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"{what} {pair!r}: expected KEY=VALUE (VALUE in JSON, e.g. hidden=[16,16] lr=0.01)")
        key, value = pair.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"{what} {pair!r}: the KEY before '=' is empty (expected KEY=VALUE, e.g. lr=0.01)")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


_RULE_BUILDERS = {"lstm": learned.LSTMOptimizer, "mlp": learned.MLPOptimizer, "meta_curvature": learned.MetaCurvature,
                  "meta_sgd": learned.meta_sgd, "per_layer_per_step": learned.per_layer_per_step,
                  "hypergradient_sgd": learned.HypergradientSGD, "hypergradient_adam": learned.HypergradientAdam}
_NUMERIC = ("lr", "hyper_lr", "init", "momentum", "weight_decay", "eps")


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _check_rule_options(rule: str, options: dict[str, Any]) -> None:
    """Refuse a value of the wrong kind for an option that takes a number, a count or a list of counts,
    naming the flag (``--rule-option lr=abc``, ``--rule-option hidden=abc``); the rule checks the rest."""
    signature = inspect.signature(_RULE_BUILDERS[rule])
    for key, value in options.items():
        parameter = signature.parameters.get(key)
        default = parameter.default if parameter is not None else inspect.Parameter.empty
        counts = (isinstance(default, int) and not isinstance(default, bool)) or (
            isinstance(default, (tuple, list)) and default and all(isinstance(d, int) for d in default))
        if counts and not _fits(value, default):
            example = _json(list(default) if isinstance(default, tuple) else default)
            kind = "an integer >= 1" if isinstance(default, int) else "a list of integers >= 1"
            raise ValueError(f"--rule-option {key}={_json(value)}: {key} takes {kind} such as "
                             f"{key}={example} (VALUE in JSON)")
        if isinstance(default, tuple) and default and all(isinstance(d, float) for d in default):
            if not (_fits(value, 0.0) or _fits(value, default)):  # a number, or one per entry (meta_sgd's init)
                raise ValueError(f"--rule-option {key}={_json(value)}: {key} takes a number or a list of "
                                 f"{len(default)} numbers such as {key}={_json(list(default))}")
        if not isinstance(value, str):
            continue
        numeric = key in _NUMERIC or (isinstance(default, (int, float)) and not isinstance(default, bool))
        if numeric:
            raise ValueError(f"--rule-option {key}={value}: {key} takes a number (for example {key}=0.01), "
                             f"not {value!r}")


def _fits(value: Any, default: Any, minimum: int = 1) -> bool:
    """Whether a JSON value can stand where ``default`` stands: an integer ``>= minimum`` for an int (a count),
    a finite number for a float, a list of such for a tuple (as long as the default when it holds floats, a
    range; any length when it holds ints, layer widths)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(default, (tuple, list)):
        if not isinstance(value, list) or not default:
            return isinstance(value, list)
        if not all(isinstance(item, int) for item in default) and len(value) != len(default):
            return False
        return all(_fits(item, default[0]) for item in value)
    return True


def _check_task_options(task: str, options: dict[str, Any]) -> None:
    """Refuse an option the task family does not have, or a value of the wrong kind, naming the flag
    (``--task-option hidden="abc": hidden takes a list like hidden=[20,20]``)."""
    parameters = {name: p for name, p in inspect.signature(FAMILIES[task]).parameters.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key, value in options.items():
        if key not in parameters:
            raise ValueError(f"--task-option {key}=...: the {task} family has no option {key!r}; "
                             f"its options are {', '.join(parameters)}")
        default = parameters[key].default
        minimum = 0 if key == "seed" else 1
        if default is not inspect.Parameter.empty and not _fits(value, default, minimum):
            example = _json(list(default) if isinstance(default, tuple) else default)
            if isinstance(default, (tuple, list)):
                kind = ("a list of integers >= 1 like" if all(isinstance(d, int) for d in default)
                        else f"a list of {len(default)} numbers like")
            else:
                kind = f"an integer >= {minimum} such as" if isinstance(default, int) else "a number such as"
            raise ValueError(f"--task-option {key}={_json(value)}: {key} takes {kind} {key}={example} "
                             "(VALUE in JSON)")


def _check_output_paths(args: argparse.Namespace) -> None:
    """Before any work: every output can be written, and none replaces an earlier run's file unless
    --resume (continue it) or --overwrite says so."""
    check_writable(args.output, "--output")
    for path, flag in ((args.checkpoint, "--checkpoint"), (args.metrics, "--metrics")):
        if path is not None:
            check_writable(path, flag)
    experiment.refuse_replacing(args.checkpoint, args.metrics, resume=args.resume, overwrite=args.overwrite)
    if not (args.resume or args.overwrite) and Path(args.output).is_file():
        raise ValueError(f"--output {args.output} already exists: continue that run with --resume (and its "
                         "--checkpoint), write to another --output, or replace it with --overwrite")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train-optimizer`` command to ``subparsers`` (from ``parser.add_subparsers()``)."""
    p = subparsers.add_parser(
        "train-optimizer",
        help="meta-train a learned optimizer (LSTM, MLP, Meta-Curvature, ...) on a task family",
        description="Meta-train a learned update rule with truncated unrolls and save it for "
                    "diffopt.optim.learned.load(path, model.parameters()).",
    )
    p.add_argument("--rule", choices=RULES, default="mlp", help="the learned update rule (default: mlp)")
    p.add_argument("--task", choices=tuple(FAMILIES), default="sinusoid", help="task family (default: sinusoid)")
    p.add_argument("--unroll", type=count(1), default=40, help="unroll length T: optimizee steps per task (default: 40)")
    p.add_argument("--truncation", type=count(1), default=10,
                   help="truncation k: steps per meta-update; state carries across truncations (default: 10)")
    p.add_argument("--meta-iterations", type=count(0), default=100, help="unrolls (fresh task batches) to train on")
    p.add_argument("--meta-batch", type=count(1), default=8, help="tasks per unroll (default: 8)")
    p.add_argument("--meta-lr", type=number(0), default=3e-3, help="Adam learning rate of the rule's weights")
    p.add_argument("--mode", choices=MODES, default="first_order",
                   help="meta-gradient: second_order, first_order (Andrychowicz et al.) or pes")
    p.add_argument("--objective", choices=OBJECTIVES, default="log",
                   help="meta-objective: mean log training loss over the steps (log) or the mean loss")
    p.add_argument("--pes-samples", type=count(1), default=4, help="antithetic pairs for --mode pes")
    p.add_argument("--pes-sigma", type=number(0), default=0.01, help="perturbation scale for --mode pes")
    p.add_argument("--rule-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the rule, VALUE in JSON (repeatable), e.g. lr=0.01 or hidden=[16,16]")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the task family, VALUE in JSON (repeatable), e.g. hidden=[40,40]")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--output", "-o", required=True, help="where to save the trained rule")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--checkpoint", default=None, help="checkpoint path (written atomically)")
    p.add_argument("--checkpoint-every", type=count(1), default=25, help="meta-iterations between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output, --checkpoint and --metrics (without it, or --resume, they "
                        "are kept and the run is refused)")
    p.add_argument("--metrics", default=None, help="JSON-lines metrics path")
    p.add_argument("--threads", type=count(1), default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``train-optimizer``; returns the exit status: 0, 2 with a one-line message on stderr for bad
    input (checked before any training, outputs included) or a divergence, 128 + the signal number when
    stopped by SIGINT or SIGTERM."""
    trainer: OptimizerTrainer | None = None
    stopped: list[int] = []
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        config = TrainConfig(
            rule=args.rule, task=args.task, unroll=args.unroll, truncation=args.truncation,
            iterations=args.meta_iterations, meta_batch=args.meta_batch, meta_lr=args.meta_lr, mode=args.mode,
            objective=args.objective, pes_samples=args.pes_samples, pes_sigma=args.pes_sigma, seed=args.seed,
            dtype=args.dtype, rule_options=_parse_options(args.rule_option, "--rule-option"),
            task_options=_parse_options(args.task_option, "--task-option"),
        )
        config.validate()
        _check_rule_options(args.rule, config.rule_options)
        _check_task_options(args.task, config.task_options)
        if args.resume and args.checkpoint is None:
            raise ValueError("--resume needs --checkpoint PATH")
        if args.resume and args.overwrite:
            raise ValueError("--resume continues the run in --checkpoint, --overwrite replaces it: give one of them")
        _check_output_paths(args)
        try:
            trainer = OptimizerTrainer(config, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                                       resume=args.resume, progress=not args.no_progress, metrics=args.metrics)
        except TypeError as error:  # the task options are checked above: an option the rule does not take
            raise ValueError(f"--rule-option: {error}" if args.rule_option else str(error)) from None
        with interrupt_on(signal.SIGTERM, stopped):
            trainer.fit()
        trainer.save_rule(args.output)
    except KeyboardInterrupt:  # SIGINT, or SIGTERM (kill, timeout, a scheduler)
        print(f"diffopt train-optimizer: {_stopped_message(args, trainer, stopped)}", file=sys.stderr)
        return 128 + (stopped[0] if stopped else signal.SIGINT)
    except (ValueError, TypeError, CheckpointError, LearnedRuleError, FloatingPointError) as error:
        print(f"diffopt train-optimizer: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a folder removed meanwhile: one line
        where = f" ({error.filename})" if error.filename else ""
        print(f"diffopt train-optimizer: error: could not write{where}: {describe_os_error(error)}", file=sys.stderr)
        return 2
    last = trainer.history[-1] if trainer.history else {}
    summary = {"output": str(args.output), "rule": config.rule, "task": config.task,
               "meta_iterations": trainer.iteration, "last_objective": last.get("objective"),
               "last_final_loss": last.get("final_loss")}
    print(json.dumps(summary, indent=2))
    return 0


def _stopped_message(args: argparse.Namespace, trainer: OptimizerTrainer | None, stopped: list[int]) -> str:
    """What an interrupted run left: the checkpoint to resume from, if one was written."""
    name = signal.Signals(stopped[0]).name if stopped else "SIGINT"
    done = trainer.iteration if trainer is not None else 0
    if args.checkpoint is None:
        kept = "no --checkpoint was given, nothing was saved"
    elif trainer is not None and trainer.saved_iteration is not None:
        kept = (f"the checkpoint {args.checkpoint} (meta-iteration {trainer.saved_iteration}) is kept; "
                "continue with --resume")
    elif args.resume and Path(args.checkpoint).is_file():  # stopped while it was being read
        kept = f"the checkpoint {args.checkpoint} is kept; continue with --resume"
    else:
        earlier = (f"; {args.checkpoint} still holds the earlier run's" if Path(args.checkpoint).is_file() else "")
        kept = (f"no checkpoint was written yet (the first comes after {args.checkpoint_every} meta-iterations, "
                f"--checkpoint-every), nothing was saved{earlier}")
    return f"stopped by {name} after {done} meta-iteration(s); {kept}; the rule was not saved to --output"
