"""Argument checks shared by the task modules (errors name the argument and the fix)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["check_count", "derive_seed", "mean_ci95"]


def check_count(name: str, value: int, minimum: int) -> int:
    """``value`` as an int, or a ``TypeError``/``ValueError`` naming ``name`` and the minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    return int(value)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (for per-task and per-split generators)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def mean_ci95(values: Tensor | Sequence[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width ``1.96·sd/√n`` over tasks, as MAML's official evaluation.

    ``sd`` is the population standard deviation (``np.std``, ddof 0), as in the
    official code; MAML reports 600 test tasks. Returns ``(mean, half_width)``.
    """
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError("values is empty: pass one number per evaluated task")
    mean = float(t.mean())
    sd = float(t.std(correction=0)) if t.numel() > 1 else 0.0
    return mean, 1.96 * sd / math.sqrt(t.numel())
