"""``diffopt bench``: time, memory and accuracy of every inner-loop mode against PyTorch baselines.

Parses the command line into :class:`diffopt.bench.Settings` and problems, runs
:func:`diffopt.bench.run` and prints or writes what :mod:`diffopt.bench.reporting`
makes of the results. ``benchmarks/modes.py`` and ``python -m diffopt.bench``
use :func:`main`.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import bench
from .._io import check_writable
from ..implicit.linear_solve import SOLVERS
from ..bench import BASELINES, MODES, PROBLEMS, TASKS, Settings, build_problem, problem_spec
from ._types import count, number, seed

DESCRIPTION = (
    f"Benchmark every inner-loop mode ({', '.join(MODES)}) against a plain PyTorch loop, a higher innerloop_ctx "
    "loop, torch.func vmap(grad) and torchopt (when "
    "installed): median time per meta-step with IQR, peak tensor memory, meta-gradient agreement and the first- "
    "vs second-order discrepancy for K inner steps, and meta-test loss or accuracy (95% CI) after a fixed budget "
    "of meta-training time and of meta-iterations. Writes JSON, markdown and PNG plots (matplotlib optional)."
)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to benchmark")
    what.add_argument("--benchmarks", nargs="*", choices=PROBLEMS, default=None,
                      help="built-in problems (default: sinusoid conv4; none when --model is given)")
    what.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                      help="your model: FACTORY() returns an nn.Module (seeded with --seed before the call)")
    what.add_argument("--task", choices=TASKS, default=None,
                      help="data for --model: sinusoid (1 in, 1 out), regression (--input-shape, --output-dim) or "
                           "classification (--input-shape D: Gaussian classes; 1,S,S: glyph images; --ways)")
    what.add_argument("--input-shape", default=None, help="input shape of one example for --model, e.g. 8 or 1,28,28")
    what.add_argument("--output-dim", type=count(1), default=None, help="regression outputs for --model (default 1)")
    what.add_argument("--ways", type=count(2), default=None, help="classes per task for --task classification (default 5)")
    what.add_argument("--shots", type=count(1), default=None, help="support examples (per class) for --model")
    what.add_argument("--query", type=count(1), default=None, help="query examples (per class) for --model")
    what.add_argument("--meta-batch", type=count(1), default=None, help="tasks per meta-batch for --model")
    what.add_argument("--inner-lr", type=number(0), default=None, help="inner SGD learning rate for --model")
    what.add_argument("--steps", type=_ints, default=None, metavar="K,K,...",
                      help="inner steps K (default 1,2,5,10,20,50,100; quick: 1,5)")
    what.add_argument("--conv4-steps", type=_ints, default=None, metavar="K,K,...",
                      help="K for the Conv-4 problem (default: --steps; quick: 1)")
    what.add_argument("--modes", nargs="*", choices=MODES, default=None, help="engine modes (default: all)")
    what.add_argument("--baselines", nargs="*", choices=BASELINES, default=None,
                      help="baselines (default: all; --baselines with no names: none)")
    how = parser.add_argument_group("budgets")
    how.add_argument("--quick", action="store_true", help="about a minute: fewer K, fewer repeats, tiny budgets")
    how.add_argument("--repeats", type=count(1), default=None, help="interleaved timing rounds per K (default 5; quick 2)")
    how.add_argument("--block-budget", type=number(0), default=None, help="seconds of timing rounds per K (default 15)")
    how.add_argument("--min-sample-ms", type=number(0, strict=False), default=None,
                     help="each time sample the mean of as many back-to-back meta-steps as last this long "
                          "(default 20; 0: one meta-step per sample)")
    how.add_argument("--max-call-seconds", type=number(0), default=None,
                     help="skip implementations whose meta-step is predicted to take longer (default 4; quick 1)")
    how.add_argument("--memory", choices=("profiler", "subprocess", "off"), default="profiler",
                     help="peak memory: profiler allocation peak in process (default), a fresh process per "
                          "configuration (adds the RSS peak), or off")
    how.add_argument("--no-discrepancy", action="store_true", help="skip the first- vs second-order discrepancy")
    how.add_argument("--no-accuracy", action="store_true", help="skip the meta-training runs")
    how.add_argument("--train-steps", type=_ints, default=None, metavar="K,K,...",
                     help="K of the meta-training runs (default 1,5 where timed; quick: 5 sinusoid, 1 Conv-4)")
    how.add_argument("--train-time", type=number(0), default=None,
                     help="seconds of meta-steps per training run (default 6 sinusoid, 20 Conv-4; quick 1-1.5)")
    how.add_argument("--train-iterations", type=count(1), default=None,
                     help="meta-iteration budget per training run (default 100 sinusoid, 20 Conv-4; quick 10)")
    how.add_argument("--snapshots", type=count(1), default=None,
                     help="evaluations along the time budget (default 4 sinusoid, 2 Conv-4; quick 2)")
    how.add_argument("--test-tasks", type=count(1), default=None, help="meta-test tasks (default 600 sinusoid, 100 Conv-4)")
    how.add_argument("--accuracy-baselines", nargs="*", choices=("plain loop", "higher loop"), default=None,
                     help="baselines also meta-trained (default: plain loop)")
    opts = parser.add_argument_group("mode settings")
    opts.add_argument("--truncate", type=count(1), default=None, help="truncated mode's window k (default max(1, K//2))")
    opts.add_argument("--segment", type=count(1), default=None, help="checkpointed mode's segment (default ⌈√K⌉)")
    opts.add_argument("--proximal", type=number(0), default=1.0,
                      help="implicit mode's proximal λ > 0 (iMAML; default 1; without it θ gets no meta-gradient)")
    opts.add_argument("--solver", choices=tuple(SOLVERS), default="minres",
                      help="implicit mode's linear solver (default minres: after a few inner steps the inner loss's "
                           "Hessian plus λI is often indefinite, where cg diverges)")
    opts.add_argument("--solver-iterations", type=count(1), default=20,
                      help="implicit mode's linear-solver iterations (default 20)")
    opts.add_argument("--es-samples", type=count(1), default=4, help="es/pes antithetic pairs (default 4)")
    opts.add_argument("--es-sigma", type=number(0), default=1e-3, help="es/pes perturbation scale (default 1e-3)")
    opts.add_argument("--pes-truncation", type=count(1), default=10, help="pes truncation length (default min(10, K))")
    out = parser.add_argument_group("output")
    out.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    out.add_argument("--markdown", default=None, metavar="PATH", help="write the markdown tables (also printed)")
    out.add_argument("--plots", default=None, metavar="DIR",
                     help="write modes_time_memory_<problem>.png and modes_accuracy_<problem>.png to DIR")
    out.add_argument("--threads", type=count(1), default=1, help="torch threads (default 1)")
    out.add_argument("--seed", type=seed, default=0)
    out.add_argument("--no-progress", action="store_true")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``diffopt`` command's subparsers."""
    parser = subparsers.add_parser("bench", help="benchmark every inner-loop mode against PyTorch baselines",
                                   description=DESCRIPTION)
    add_arguments(parser)
    return parser


MODEL_OPTIONS = ("task", "input_shape", "output_dim", "ways", "shots", "query", "meta_batch", "inner_lr")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, before any measurement, what the run would ignore or could not write."""
    if args.modes is not None and not args.modes:
        raise ValueError(f"--modes needs one or more of {', '.join(MODES)} (leave it out for all)")
    ignored = [f"--{name.replace('_', '-')}" for name in MODEL_OPTIONS if getattr(args, name) is not None]
    if ignored and not args.model:
        verb, them = ("describes", "it") if len(ignored) == 1 else ("describe", "them")
        raise ValueError(f"{', '.join(ignored)} {verb} the data of --model MODULE:FACTORY; give --model, or leave "
                         f"{them} out for the built-in problems")
    for path, flag, example in ((args.json, "--json", "bench.json"), (args.markdown, "--markdown", "bench.md")):
        if path:
            check_writable(path, f"{flag} file", example)
    if args.plots:
        folder = Path(args.plots)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--plots {folder} is a file; give a folder for the PNG files")
        check_writable(folder / "modes_time_memory.png", "--plots folder")


def input_shape(text: str) -> list[int]:
    """``8``, ``1,28,28`` or ``1x28x28``."""
    parts = re.split(r"[x,]", text.strip())
    if not parts or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--input-shape {text!r}: give positive integers such as 8, 1,28,28 or 1x28x28")
    return [int(p) for p in parts]


def settings_from_args(args: argparse.Namespace) -> Any:
    def given(**pairs: Any) -> dict[str, Any]:
        return {k: v for k, v in pairs.items() if v is not None}

    overrides: dict[str, Any] = given(
        repeats=args.repeats, block_budget_s=args.block_budget, max_call_s=args.max_call_seconds,
        min_sample_s=None if args.min_sample_ms is None else args.min_sample_ms / 1e3, truncate=args.truncate, segment=args.segment, snapshots=args.snapshots,
    )
    overrides.update(memory=args.memory, discrepancy=not args.no_discrepancy, accuracy=not args.no_accuracy,
                     modes=tuple(args.modes) if args.modes else MODES,
                     baselines=tuple(args.baselines) if args.baselines is not None else BASELINES,
                     proximal=args.proximal, solver=args.solver, solver_iterations=args.solver_iterations, es_samples=args.es_samples,
                     es_sigma=args.es_sigma, pes_truncation=args.pes_truncation, threads=args.threads, seed=args.seed)
    if args.accuracy_baselines is not None:
        overrides["accuracy_baselines"] = tuple(args.accuracy_baselines)
    if args.quick:
        settings = Settings.quick_settings(**overrides)
    else:
        settings = Settings(**{"train_time_s": {"default": 6.0, "conv4": 20.0},
                               "train_iterations": {"default": 100, "conv4": 20},
                               "snapshots": {"default": 4, "conv4": 2},
                               "steps_by_problem": {"conv4": (1, 2, 5)}, "train_steps": {"conv4": (1,)},
                               **overrides})
    if args.steps:
        settings.steps = args.steps
        settings.steps_by_problem = {k: v for k, v in settings.steps_by_problem.items() if k != "conv4"}
        settings.train_steps = {}
    if args.conv4_steps:
        settings.steps_by_problem["conv4"] = args.conv4_steps
    if args.train_steps:
        settings.train_steps = {kind: args.train_steps for kind in ("sinusoid", "conv4", "custom")}
    if args.train_time is not None:
        settings.train_time_s = args.train_time
    if args.train_iterations is not None:
        settings.train_iterations = args.train_iterations
    return settings


def problems_from_args(args: argparse.Namespace) -> list[Any]:
    kinds = args.benchmarks if args.benchmarks is not None else ([] if args.model else ["sinusoid", "conv4"])
    specs = []
    for kind in kinds:
        overrides: dict[str, Any] = {"seed": args.seed}
        if args.test_tasks:
            overrides["test_tasks"] = args.test_tasks
        elif args.quick:
            overrides["test_tasks"] = {"sinusoid": 200, "conv4": 10}[kind]
        if args.quick and kind == "conv4":  # a smaller episode and network: indicative numbers only
            overrides.update(classes=40, examples=20, filters=32, meta_batch=2, query=5)
        specs.append(problem_spec(kind, **overrides))
    if args.model:
        shape = input_shape(args.input_shape) if args.input_shape else None
        task = args.task or "sinusoid"
        test_tasks = args.test_tasks or (20 if args.quick and task == "classification" else
                                         200 if args.quick else None)
        specs.append(problem_spec(
            "custom", factory=args.model, task=task, input_shape=shape, output_dim=args.output_dim or 1,
            ways=args.ways or 5, shots=args.shots, query=args.query, meta_batch=args.meta_batch, inner_lr=args.inner_lr,
            test_tasks=test_tasks, seed=args.seed, sys_path=_import_roots(args.model),
            **({"classes": 40, "examples": 20} if args.quick else {}),
        ))
    if not specs:
        raise ValueError("nothing to benchmark: name --benchmarks or give --model")
    return [build_problem(spec) for spec in specs]


def _import_roots(spec: str) -> list[str]:
    """Folders a fresh process (``--memory subprocess``) needs on sys.path to import ``module:factory``:
    the working folder and the one holding the module's top-level package."""
    roots = [os.getcwd()]
    module = spec.split(":", 1)[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is not None and found.origin and found.origin not in ("built-in", "frozen"):
        origin = Path(found.origin).resolve()
        depth = module.count(".") + (2 if origin.name == "__init__.py" else 1)
        roots.append(str(origin.parents[depth - 1]))
    return list(dict.fromkeys(roots))


def run(args: argparse.Namespace) -> int:
    """Run ``diffopt bench`` for parsed arguments; 0 on success, 2 on bad settings."""
    try:
        check_arguments(args)
        settings = settings_from_args(args)
        problems = problems_from_args(args)
    except ValueError as error:
        print(f"diffopt bench: error: {error}", file=sys.stderr)
        return 2
    results = bench.run(problems, settings, progress=not args.no_progress)
    text = bench.markdown(results)
    print(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
    if args.json:
        bench.write_json(args.json, results)
    if args.plots:
        with warnings.catch_warnings(record=True) as caught:  # matplotlib missing: said on stderr, as before
            warnings.simplefilter("always")
            written = bench.plot(results, args.plots)
        for warning in caught:
            print(warning.message, file=sys.stderr)
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "diffopt bench") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
