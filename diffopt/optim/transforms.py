"""Differentiable gradient transforms applied before the update rule."""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._rule import safe_sqrt

Grads = list[Tensor | None]
GradTransform = Callable[[Grads, int], Sequence[Tensor | None]]

__all__ = ["GradientTransforms", "clip_grad_norm", "clip_grad_value", "build_transforms"]


def clip_grad_norm(grads: Sequence[Tensor | None], max_norm: float | Tensor) -> Grads:
    """Rescale ``grads`` to global L2 norm at most ``max_norm``, differentiably.

    Same formula as ``torch.nn.utils.clip_grad_norm_``: the coefficient is
    ``min(1, max_norm / (||g|| + 1e-6))``. The norm's square root has a finite
    derivative at zero (all-zero gradients do not produce NaN).
    """
    present = [g for g in grads if g is not None]
    if not present:
        return list(grads)
    total = safe_sqrt(sum((g * g).sum() for g in present))
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return [None if g is None else g * coefficient for g in grads]


def clip_grad_value(grads: Sequence[Tensor | None], clip_value: float) -> Grads:
    """Clamp every gradient element to ``[-clip_value, clip_value]``."""
    return [None if g is None else g.clamp(-clip_value, clip_value) for g in grads]


@dataclass(frozen=True, eq=False)
class GradientTransforms:
    """The configured transforms as one callable ``(grads, step) -> grads``: value clip, then norm
    clip, then ``custom`` (:func:`build_transforms` checks the settings)."""

    max_norm: float | Tensor | None = None
    max_value: float | Tensor | None = None
    custom: GradTransform | None = None

    @property
    def is_identity(self) -> bool:
        """Whether no transform is configured (the gradients pass through unchanged)."""
        return self.max_value is None and self.max_norm is None and self.custom is None

    def __call__(self, grads: Sequence[Tensor | None], step: int) -> Grads:
        out = list(grads)
        if self.max_value is not None:
            out = clip_grad_value(out, self.max_value)
        if self.max_norm is not None:
            out = clip_grad_norm(out, self.max_norm)
        if self.custom is not None:
            transformed = list(self.custom(out, step))
            if len(transformed) != len(out):
                raise ValueError(
                    f"grad_transform returned {len(transformed)} gradients for {len(out)} parameters"
                )
            out = transformed
        return out


def _positive_number(value: float | Tensor) -> bool:
    """A finite number > 0, or a one-element tensor holding one (its value checked here, once)."""
    if isinstance(value, Tensor):
        return value.numel() == 1 and bool(torch.isfinite(value.detach())) and float(value.detach()) > 0
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def build_transforms(
    max_norm: float | Tensor | None, max_value: float | Tensor | None, custom: GradTransform | None
) -> GradientTransforms:
    """Compose the configured transforms: value clip, then norm clip, then ``custom``."""
    for name, value in (("clip_grad_norm", max_norm), ("clip_grad_value", max_value)):
        if value is not None and not _positive_number(value):
            raise ValueError(f"{name} must be positive, got {value!r} (a finite number, or a one-element tensor of one)")
    if custom is not None and not callable(custom):
        raise TypeError("grad_transform must be a callable f(grads, step) -> grads")
    return GradientTransforms(max_norm, max_value, custom)
