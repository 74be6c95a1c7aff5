"""``diffopt check``: run the gradient-correctness kit (:func:`diffopt.testing.runner.run_checks`) over
every built-in optimizer and mode, or over a user's optimizer given as ``module:Class``, and print the
verdicts as markdown tables. Exit status 1 when a check fails or a known bug goes unflagged."""
from __future__ import annotations

import argparse
import ast
from typing import Any

import torch

from ..optim import DifferentiableOptimizer
from ..testing.checks import Report
from ..testing.runner import load_object, run_checks
from ._types import number

__all__ = ["add_parser", "format_row", "run"]


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``check`` command to ``commands`` (from ``parser.add_subparsers()``)."""
    check = commands.add_parser("check", help="run the gradient-correctness kit (built-ins or your optimizer)")
    check.add_argument("--thorough", action="store_true", help="more option sets, steps, directions and gradcheck")
    check.add_argument("--optimizer", default=None, help="your optimizer as module:Class (same signature as torch.optim)")
    check.add_argument("--reference", default=None, help="torch.optim reference as module:Class, e.g. torch.optim:Adam")
    check.add_argument("--lr", type=number(0), default=0.05, help="learning rate for --optimizer (checked as a tensor)")
    check.add_argument("--option", action="append", type=option, default=[], metavar="KEY=VALUE",
                       help="a constructor argument of --optimizer and --reference alike, as a Python literal "
                            "(repeatable): --option momentum=0.9 --option dampening=0.1")
    check.add_argument("--no-self-test", action="store_true", help="skip checking that known bugs are flagged")
    check.add_argument("--skip-modes", action="store_true", help="check the optimizer only, not the engine modes")
    return check


def option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE a Python literal (``0.9``, ``True``, ``(0.9, 0.99)``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r}: give KEY=VALUE, e.g. momentum=0.9")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError) as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a Python literal (a number, True/False, a "
                                         "tuple such as (0.9, 0.99), or a quoted string)") from error


def _check_buildable(cls: Any, flag: str, spec: str, kind: type, lr: float, options: dict[str, Any]) -> None:
    """Build ``cls`` on one parameter as the checks will; a failure or another kind of object is one line."""
    settings = ", ".join(f"{k}={v!r}" for k, v in {"lr": lr, **options}.items())
    try:
        built = cls([torch.zeros(2, dtype=torch.float64, requires_grad=True)], lr=lr, **options)
    except Exception as error:  # noqa: BLE001 (the user's constructor: any error is reported the same way)
        raise SystemExit(f"{flag} {spec}: building it as {spec.split(':')[-1]}(params, {settings}) failed: "
                         f"{type(error).__name__}: {error}") from error
    if not isinstance(built, kind):
        need = ("a diffopt optimizer (a diffopt.optim.DifferentiableOptimizer subclass, whose steps can be "
                "differentiated); give torch.optim's class as --reference" if kind is DifferentiableOptimizer
                else "a torch.optim optimizer")
        raise SystemExit(f"{flag} {spec} built a {type(built).__module__}.{type(built).__name__}; it must be {need}")


def format_row(subject: str, report: Report) -> str:
    return f"| {subject} | {report.name} | {report.worst_error:.2e} | {report.tolerance:.0e} | {report.verdict} |"


def run(args: argparse.Namespace) -> int:
    try:
        optimizer = load_object(args.optimizer) if args.optimizer else None
        reference = load_object(args.reference) if args.reference else None
    except ValueError as error:  # an optimizer or reference that cannot be loaded: the message, status 1
        raise SystemExit(str(error)) from error
    options = dict(args.option)
    if options and optimizer is None:
        raise SystemExit("--option sets constructor arguments of --optimizer; give --optimizer module:Class")
    if optimizer is not None:
        _check_buildable(optimizer, "--optimizer", args.optimizer, DifferentiableOptimizer, args.lr, options)
    if reference is not None:
        _check_buildable(reference, "--reference", args.reference, torch.optim.Optimizer, args.lr, options)
    outcome = run_checks(optimizer, reference, args.lr, thorough=args.thorough, self_test_run=not args.no_self_test,
                         skip_modes=args.skip_modes, options=options)
    print("| subject | check | worst error | tolerance | verdict |")
    print("|---|---|---|---|---|")
    for subject, report in outcome.rows:
        print(format_row(subject, report))
    if outcome.self_test:
        print("\nSelf-test: deliberately wrong optimizers must be flagged\n")
        print("| wrong implementation | flagged by | error | verdict |")
        print("|---|---|---|---|")
        for name, report, flagged in outcome.self_test:
            print(f"| {name} | {report.name} | {report.worst_error:.2e} | {'FLAGGED' if flagged else 'MISSED'} |")
    for subject, report in outcome.failures + outcome.inconclusive:
        print(f"\n{subject}: {report}")
    total, failed, unknown = len(outcome.rows), len(outcome.failures), len(outcome.inconclusive)
    print(f"\n{total - failed - unknown} passed, {failed} failed" + (f", {unknown} inconclusive" if unknown else "")
          + f" ({outcome.seconds:.0f} s)")
    return 0 if outcome.passed else 1
