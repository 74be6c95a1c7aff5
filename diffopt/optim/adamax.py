r"""Adamax, as ``torch.optim.Adamax`` (Kingma & Ba, 2015, section 7).

.. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
    u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon),\quad
    \theta_t = \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\frac{m_t}{u_t}
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._rule import Hyper, State, UpdateRule, addcdiv_all
from ._shared import add_weight_decay, signed_with_weight_decay
from .optimizer import DifferentiableOptimizer


class AdamaxRule(UpdateRule):
    name = "adamax"
    defaults = {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "maximize": False}
    group_lr_may_be_tensor = True

    def init_state(self, param: Tensor, hp: Hyper) -> State:
        return {"step": 0, "exp_avg": torch.zeros_like(param), "exp_inf": torch.zeros_like(param)}

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        beta1, beta2 = hp["betas"]
        step = state["step"] + 1
        g = -grad if hp["maximize"] else grad
        param, g = add_weight_decay(param, g, hp)
        exp_avg = torch.lerp(state["exp_avg"], g, 1 - beta1)
        exp_inf = torch.maximum(state["exp_inf"] * beta2, g.abs() + hp["eps"])
        step_size = hp["lr"] / (1 - beta1**step)
        return param - step_size * (exp_avg / exp_inf), {"step": step, "exp_avg": exp_avg, "exp_inf": exp_inf}

    def update_group(
        self, params: list[Tensor], grads: list[Tensor], states: list[State], hp: Hyper
    ) -> tuple[list[Tensor], list[State]] | None:
        step = states[0]["step"] + 1
        beta1, beta2 = hp["betas"]
        params, g = signed_with_weight_decay(params, grads, hp)
        exp_avg = torch._foreach_lerp([s["exp_avg"] for s in states], g, 1 - beta1)
        exp_inf = torch._foreach_maximum(
            torch._foreach_mul([s["exp_inf"] for s in states], beta2),
            torch._foreach_add(torch._foreach_abs(g), hp["eps"]),
        )
        new_params = addcdiv_all(params, exp_avg, exp_inf, value=-(hp["lr"] / (1 - beta1**step)))
        return new_params, [{"step": step, "exp_avg": m, "exp_inf": u} for m, u in zip(exp_avg, exp_inf)]


class Adamax(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adamax``."""

    rule_class = AdamaxRule

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 2e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float | Tensor = 1e-8,
        weight_decay: float | Tensor = 0.0,
        *,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, **options)
