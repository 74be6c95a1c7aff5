"""``diffopt train-optimizer``: meta-train a learned update rule and save it.

Parses the command line into a :class:`diffopt.training.TrainConfig`, runs
:class:`diffopt.training.OptimizerTrainer` and prints a JSON summary.

Example (≈1–2 minutes on 2 CPU cores)::

    diffopt train-optimizer --rule mlp --task sinusoid --unroll 40 --truncation 10 \\
        --meta-iterations 80 --output mlp-sinusoid.pt --checkpoint run.ckpt --resume

The saved file is used in a plain training loop with
``diffopt.optim.learned.load(path, model.parameters())``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from typing import Any

import torch

from ..optim import learned
from ..optim.learned import RULES, LearnedRuleError
from ..training import FAMILIES, OBJECTIVES, CheckpointError, OptimizerTrainer, TrainConfig
from ..training.learned_optimizers import MODES
from ._types import count, number, seed

__all__ = ["add_parser", "run"]


def _parse_options(pairs: list[str], what: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"{what} {pair!r}: expected KEY=VALUE (VALUE in JSON, e.g. hidden=[16,16] lr=0.01)")
        key, value = pair.split("=", 1)
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


_RULE_BUILDERS = {"lstm": learned.LSTMOptimizer, "mlp": learned.MLPOptimizer, "meta_curvature": learned.MetaCurvature,
                  "meta_sgd": learned.meta_sgd, "per_layer_per_step": learned.per_layer_per_step,
                  "hypergradient_sgd": learned.HypergradientSGD, "hypergradient_adam": learned.HypergradientAdam}
_NUMERIC = ("lr", "hyper_lr", "init", "momentum", "weight_decay", "eps")


def _check_rule_options(rule: str, options: dict[str, Any]) -> None:
    """Refuse a text value for an option that takes a number, naming the flag (``--rule-option lr=abc``)."""
    signature = inspect.signature(_RULE_BUILDERS[rule])
    for key, value in options.items():
        if not isinstance(value, str):
            continue
        parameter = signature.parameters.get(key)
        default = parameter.default if parameter is not None else inspect.Parameter.empty
        numeric = key in _NUMERIC or (isinstance(default, (int, float)) and not isinstance(default, bool))
        if numeric:
            raise ValueError(f"--rule-option {key}={value}: {key} takes a number (for example {key}=0.01), "
                             f"not {value!r}")


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
    p.add_argument("--metrics", default=None, help="JSON-lines metrics path")
    p.add_argument("--threads", type=count(1), default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``train-optimizer``; returns the exit status (0, or 2 with a message on stderr)."""
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
        _check_rule_options(args.rule, config.rule_options)
        if args.resume and args.checkpoint is None:
            raise ValueError("--resume needs --checkpoint PATH")
        trainer = OptimizerTrainer(config, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                                   resume=args.resume, progress=not args.no_progress, metrics=args.metrics)
        trainer.fit()
        trainer.save_rule(args.output)
    except (ValueError, TypeError, CheckpointError, LearnedRuleError, FloatingPointError) as error:
        print(f"diffopt train-optimizer: error: {error}", file=sys.stderr)
        return 2
    last = trainer.history[-1] if trainer.history else {}
    summary = {"output": str(args.output), "rule": config.rule, "task": config.task,
               "meta_iterations": trainer.iteration, "last_objective": last.get("objective"),
               "last_final_loss": last.get("final_loss")}
    print(json.dumps(summary, indent=2))
    return 0
