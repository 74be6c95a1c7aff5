r"""RMSprop, as ``torch.optim.RMSprop`` (Hinton's lecture 6e; centered form of Graves, 2013).

.. math::
    v_t &= \alpha v_{t-1} + (1-\alpha) g_t^2,\qquad
    \bar g_t = \alpha\bar g_{t-1} + (1-\alpha) g_t \ \text{(centered)} \\
    d_t &= \sqrt{v_t - \bar g_t^2} + \epsilon \ \text{(centered) or } \sqrt{v_t}+\epsilon \\
    b_t &= \mu b_{t-1} + g_t/d_t,\qquad \theta_t = \theta_{t-1} - \gamma b_t
    \quad(\text{or } \theta_{t-1} - \gamma g_t/d_t \text{ without momentum})
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._rule import (
    Hyper, State, UpdateRule, add_scaled_all, addcdiv_all, check_range, minimum_of, moving_average_of_squares, nonzero,
    safe_sqrt, safe_sqrt_all,
)
from ._shared import add_weight_decay, signed_with_weight_decay
from .optimizer import DifferentiableOptimizer


class RMSpropRule(UpdateRule):
    name = "rmsprop"
    defaults = {
        "lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0, "centered": False,
        "maximize": False,
    }
    flags = frozenset({"centered", "maximize"})
    group_lr_may_be_tensor = True

    def init_state(self, param: Tensor, hp: Hyper) -> State:
        state: State = {"step": 0, "square_avg": torch.zeros_like(param)}
        if nonzero(hp["momentum"]):
            state["momentum_buffer"] = torch.zeros_like(param)
        if hp["centered"]:
            state["grad_avg"] = torch.zeros_like(param)
        return state

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        alpha = hp["alpha"]
        g = -grad if hp["maximize"] else grad
        param, g = add_weight_decay(param, g, hp)
        square_avg = state["square_avg"] * alpha + (1 - alpha) * (g * g)
        new_state: State = {"step": state["step"] + 1, "square_avg": square_avg}
        if hp["centered"]:
            grad_avg = torch.lerp(state["grad_avg"], g, 1 - alpha)
            new_state["grad_avg"] = grad_avg
            avg = safe_sqrt(square_avg - grad_avg * grad_avg)
        else:
            avg = safe_sqrt(square_avg)
        avg = avg + hp["eps"]
        if nonzero(hp["momentum"]):
            buf = state["momentum_buffer"] * hp["momentum"] + g / avg
            new_state["momentum_buffer"] = buf
            return param - hp["lr"] * buf, new_state
        return param - hp["lr"] * (g / avg), new_state

    def update_group(
        self, params: list[Tensor], grads: list[Tensor], states: list[State], hp: Hyper
    ) -> tuple[list[Tensor], list[State]] | None:
        alpha, momentum = hp["alpha"], hp["momentum"]
        params, g = signed_with_weight_decay(params, grads, hp)
        square_avg = moving_average_of_squares([s["square_avg"] for s in states], g, alpha)
        new_states: list[State] = [{"step": s["step"] + 1, "square_avg": v} for s, v in zip(states, square_avg)]
        if hp["centered"]:
            grad_avg = torch._foreach_lerp([s["grad_avg"] for s in states], g, 1 - alpha)
            for state, m in zip(new_states, grad_avg):
                state["grad_avg"] = m
            avg = safe_sqrt_all(torch._foreach_addcmul(square_avg, grad_avg, grad_avg, value=-1))
        else:
            avg = safe_sqrt_all(square_avg)
        avg = torch._foreach_add(avg, hp["eps"])
        if momentum != 0:
            buffers = addcdiv_all(torch._foreach_mul([s["momentum_buffer"] for s in states], momentum), g, avg)
            for state, b in zip(new_states, buffers):
                state["momentum_buffer"] = b
            return add_scaled_all(params, buffers, -hp["lr"]), new_states
        return addcdiv_all(params, g, avg, value=-hp["lr"]), new_states

    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        super().validate_group(group, where)
        check_range(group["alpha"], "alpha", where, low=0.0, high=1.0, high_inclusive=True,
                    why=" (above 1 the average of squares alpha v + (1 - alpha) g^2 turns negative and its root NaN, "
                        "in torch.optim too)")
        check_range(group["momentum"], "momentum", where, low=0.0)
        if group["centered"] and minimum_of(group["alpha"]) == 0:
            raise ValueError(f"{where}: centered=True with alpha=0: the centred variance g² − g² is zero up to "
                             "rounding, so its square root is NaN or the step g/eps enormous (in torch.optim too); "
                             "use alpha > 0 or centered=False")


class RMSprop(DifferentiableOptimizer):
    """Differentiable ``torch.optim.RMSprop``."""

    rule_class = RMSpropRule

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        alpha: float | Tensor = 0.99,
        eps: float | Tensor = 1e-8,
        weight_decay: float | Tensor = 0.0,
        momentum: float | Tensor = 0.0,
        centered: bool = False,
        *,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
            centered=centered, maximize=maximize, **options,
        )
