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
    r"""Mean and 95% confidence half-width :math:`t_{0.975,\,n-1}\cdot s/\sqrt n` over ``n`` tasks.

    ``s`` is the sample standard deviation (``ddof=1``, as the diagnostics' intervals) and
    :math:`t_{0.975,\,n-1}` Student's t quantile (``scipy.stats.t.ppf(0.975, n - 1)``): the
    exact interval for normally distributed per-task values, which covers the mean 95% of the
    time at any ``n`` (``1.96·sd/√n`` with the population sd, MAML's official evaluation, covered
    it 60% of the time at ``n = 2`` and 91% at ``n = 10``). At MAML's 600 test tasks the two agree
    within 0.3%. One value gives no interval: the half-width is ``nan``. Returns
    ``(mean, half_width)``.
    """
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    n = t.numel()
    if n == 0:
        raise ValueError("values is empty: pass one number per evaluated task")
    mean = float(t.mean())
    if n == 1:
        return mean, math.nan
    import scipy.stats  # here, not at import: ``import diffopt`` does not load scipy.stats
    return mean, float(scipy.stats.t.ppf(0.975, n - 1)) * float(t.std(correction=1)) / math.sqrt(n)
