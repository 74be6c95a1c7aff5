"""Argument types of the command line: a value no run can use is refused while the arguments
are parsed, and argparse names the flag (``argument --meta-batch: must be an integer >= 1, got '0'``)."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["count", "number", "int_list", "seed"]


def count(minimum: int) -> Callable[[str], int]:
    """An integer ``>= minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def seed(text: str) -> int:
    """A seed: an integer in ``[0, 2**63)``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text!r}")
    return value


def number(minimum: float = 0.0, *, strict: bool = True) -> Callable[[str], float]:
    """A finite float ``> minimum`` (``>= minimum`` when not ``strict``)."""
    relation = ">" if strict else ">="

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {relation} {minimum:g}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be a finite number {relation} {minimum:g}, got {text!r}")
        return value
    parse.__name__ = f"number {relation} {minimum:g}"
    return parse


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated integers ``>= 0`` (``0,1,5,10``), at least one."""
    items = [item.strip() for item in text.split(",")]
    try:
        values = tuple(int(item) for item in items if item)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 0 such as 0,1,5,10, got {text!r}") from None
    if not values or any(v < 0 for v in values) or any(not item for item in items):
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 0 such as 0,1,5,10, got {text!r}")
    return values
