r"""Adadelta, as ``torch.optim.Adadelta`` (Zeiler, 2012).

.. math::
    v_t &= \rho v_{t-1} + (1-\rho) g_t^2,\qquad
    \Delta_t = \frac{\sqrt{u_{t-1}+\epsilon}}{\sqrt{v_t+\epsilon}}\, g_t \\
    u_t &= \rho u_{t-1} + (1-\rho)\Delta_t^2,\qquad \theta_t = \theta_{t-1} - \gamma\Delta_t
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._rule import (
    Hyper, State, UpdateRule, add_scaled_all, check_range, moving_average_of_squares, safe_sqrt, safe_sqrt_all,
)
from ._shared import add_weight_decay, signed_with_weight_decay
from .optimizer import DifferentiableOptimizer


class AdadeltaRule(UpdateRule):
    name = "adadelta"
    defaults = {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0, "maximize": False}
    group_lr_may_be_tensor = True

    def init_state(self, param: Tensor, hp: Hyper) -> State:
        return {"step": 0, "square_avg": torch.zeros_like(param), "acc_delta": torch.zeros_like(param)}

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        rho, eps = hp["rho"], hp["eps"]
        g = -grad if hp["maximize"] else grad
        param, g = add_weight_decay(param, g, hp)
        square_avg = state["square_avg"] * rho + (1 - rho) * (g * g)
        std = safe_sqrt(square_avg + eps)
        delta = safe_sqrt(state["acc_delta"] + eps) / std * g
        acc_delta = state["acc_delta"] * rho + (1 - rho) * (delta * delta)
        new_state = {"step": state["step"] + 1, "square_avg": square_avg, "acc_delta": acc_delta}
        return param - hp["lr"] * delta, new_state

    def update_group(
        self, params: list[Tensor], grads: list[Tensor], states: list[State], hp: Hyper
    ) -> tuple[list[Tensor], list[State]] | None:
        rho, eps = hp["rho"], hp["eps"]
        # With eps > 0 both radicands are positive, where a plain square root is safe.
        sqrt = (lambda xs: list(torch._foreach_sqrt(xs))) if eps > 0 else safe_sqrt_all
        params, g = signed_with_weight_decay(params, grads, hp)
        acc_delta = [s["acc_delta"] for s in states]
        square_avg = moving_average_of_squares([s["square_avg"] for s in states], g, rho)
        std = sqrt(torch._foreach_add(square_avg, eps))
        delta = torch._foreach_mul(torch._foreach_div(sqrt(torch._foreach_add(acc_delta, eps)), std), g)
        acc_delta = moving_average_of_squares(acc_delta, delta, rho)
        new_params = add_scaled_all(params, delta, -hp["lr"])
        return new_params, [
            {"step": s["step"] + 1, "square_avg": sq, "acc_delta": acc}
            for s, sq, acc in zip(states, square_avg, acc_delta)
        ]

    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        super().validate_group(group, where)
        check_range(group["rho"], "rho", where, low=0.0, high=1.0, high_inclusive=True)


class Adadelta(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adadelta``."""

    rule_class = AdadeltaRule

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1.0,
        rho: float | Tensor = 0.9,
        eps: float | Tensor = 1e-6,
        weight_decay: float | Tensor = 0.0,
        *,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(params, lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize, **options)
