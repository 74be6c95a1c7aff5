"""``diffopt check``: run the gradient-correctness kit (:func:`diffopt.testing.runner.run_checks`) over
every built-in optimizer and mode, or over a user's optimizer given as ``module:Class``, and print the
verdicts as markdown tables. Exit status 1 when a check fails or a known bug goes unflagged."""
from __future__ import annotations

import argparse
from typing import Any

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
    check.add_argument("--no-self-test", action="store_true", help="skip checking that known bugs are flagged")
    check.add_argument("--skip-modes", action="store_true", help="check the optimizer only, not the engine modes")
    return check


def format_row(subject: str, report: Report) -> str:
    verdict = "PASS" if report.passed else "FAIL"
    return f"| {subject} | {report.name} | {report.worst_error:.2e} | {report.tolerance:.0e} | {verdict} |"


def run(args: argparse.Namespace) -> int:
    try:
        optimizer = load_object(args.optimizer) if args.optimizer else None
        reference = load_object(args.reference) if args.reference else None
    except ValueError as error:  # an optimizer or reference that cannot be loaded: the message, status 1
        raise SystemExit(str(error)) from error
    outcome = run_checks(optimizer, reference, args.lr, thorough=args.thorough, self_test_run=not args.no_self_test,
                         skip_modes=args.skip_modes)
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
    for subject, report in outcome.failures:
        print(f"\n{subject}: {report}")
    total, failed = len(outcome.rows), len(outcome.failures)
    print(f"\n{total - failed} passed, {failed} failed ({outcome.seconds:.0f} s)")
    return 0 if outcome.passed else 1
