"""Central finite differences in float64, with a guard against non-smooth points.

The directional derivative of f at x along a unit direction d is estimated by
Richardson-extrapolated central differences: with ``D(h) = (f(x + h d) − f(x − h d)) / 2h``
(error O(h²)), ``(4·D(h/2) − D(h)) / 3`` has error O(h⁴), which keeps the
truncation error far below 1e-6 relative even on the strongly curved losses of
long unrolls, with h large enough (1e-5) that rounding stays near 1e-11. A
ReLU kink (or any non-differentiable point) between x − h d and x + h d shows up
as a disagreement between the one-sided differences that is far larger than
the O(h) curvature term; such directions are reported and redrawn rather than
compared, so the check neither fails on kinks nor silently accepts them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DirectionalCheck:
    direction: int
    analytic: float
    numeric: float
    relative_error: float
    tensor: str  # where the direction is supported ("all" for a joint direction)


def relative_error(a: float, b: float, floor: float = 1e-12) -> float:
    """``|a − b| / max(|a|, |b|, floor)``: symmetric, and absolute for values near zero."""
    return abs(a - b) / max(abs(a), abs(b), floor)


def set_values(tensors: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for t, v in zip(tensors, values):
            t.copy_(v)


def central_difference(
    f: Callable[[], float], tensors: Sequence[Tensor], direction: Sequence[Tensor], step: float
) -> tuple[float, bool]:
    """The Richardson-extrapolated directional derivative, and whether f looks smooth along d.

    ``tensors`` are modified in place during the evaluations and restored exactly.
    """
    saved = [t.detach().clone() for t in tensors]
    values = {}
    try:
        for k in (-1.0, -0.5, 0.0, 0.5, 1.0):
            set_values(tensors, [s + k * step * d for s, d in zip(saved, direction)])
            values[k] = f()
    finally:
        set_values(tensors, saved)
    coarse = (values[1.0] - values[-1.0]) / (2 * step)
    fine = (values[0.5] - values[-0.5]) / step
    extrapolated = (4 * fine - coarse) / 3
    forward = (values[1.0] - values[0.0]) / step
    backward = (values[0.0] - values[-1.0]) / step
    scale = max(abs(forward), abs(backward), abs(values[0.0]), 1e-8)
    smooth = abs(forward - backward) <= 1e-2 * scale + 1e-10 or not math.isfinite(forward - backward)
    return extrapolated, smooth


def random_direction(tensors: Sequence[Tensor], generator: torch.Generator, support: int | None = None) -> list[Tensor]:
    """A unit direction over all ``tensors`` (or only ``tensors[support]``)."""
    parts = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t) for t in tensors]
    if support is not None:
        parts = [p if i == support else torch.zeros_like(p) for i, p in enumerate(parts)]
    norm = math.sqrt(sum(float((p * p).sum()) for p in parts))
    return [p / norm for p in parts]


def best_agreement(
    f: Callable[[], float], tensors: Sequence[Tensor], direction: Sequence[Tensor], analytic: float,
    step: float, tolerance: float,
) -> tuple[float, float, bool]:
    """Compare ``analytic`` with finite differences at ``step``, then at 10x and 0.1x ``step``
    if they disagree: ``(numeric, relative error, smooth)`` of the best agreement.

    No single step size suits every loss: long unrolls are strongly curved (truncation
    error wants a small h) while weak hyperparameters move the loss little (rounding
    error wants a large h). A correct gradient agrees at some h; a wrong one at none.
    Strong curvature also makes the one-sided differences disagree at a large h, like a
    kink does: a point counts as non-smooth only if it looks so at every h tried.
    """
    numeric, smooth = central_difference(f, tensors, direction, step)
    best = (numeric, relative_error(analytic, numeric), smooth)
    if best[1] <= tolerance and smooth:
        return best
    for h in (step / 10, step * 10):
        numeric, smooth_h = central_difference(f, tensors, direction, h)
        error = relative_error(analytic, numeric)
        # prefer a smooth estimate; among those, the best agreement
        if (smooth_h, -error) > (best[2], -best[1]):
            best = (numeric, error, smooth_h)
    return best
