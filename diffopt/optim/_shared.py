"""Pieces the update rules share: weight decay (coupled or decoupled), ``maximize``
and a power that keeps tensors on the graph."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._rule import Hyper, nonzero, scale_all


def power(base: Any, exponent: int) -> Any:
    """``base ** exponent`` for a number or a tensor (a tensor stays on the graph)."""
    return base**exponent


def add_weight_decay(param: Tensor, grad: Tensor, hp: Hyper) -> tuple[Tensor, Tensor]:
    """Coupled (L2 in the gradient) or decoupled (shrink the weights) weight decay."""
    wd = hp["weight_decay"]
    if not nonzero(wd):
        return param, grad
    if hp.get("decoupled_weight_decay", False):
        return param * (1 - hp["lr"] * wd), grad
    return param, grad + wd * param


def signed_with_weight_decay(
    params: list[Tensor], grads: list[Tensor], hp: Hyper
) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`add_weight_decay` and ``maximize`` for a whole group, with multi-tensor operations."""
    g = torch._foreach_neg(grads) if hp["maximize"] else grads
    wd = hp["weight_decay"]
    if wd == 0:
        return params, g
    if hp.get("decoupled_weight_decay", False):
        return scale_all(params, 1 - hp["lr"] * wd), g
    return params, torch._foreach_add(g, params, alpha=wd)
