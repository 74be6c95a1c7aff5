r"""Adam and AdamW, as ``torch.optim.Adam`` / ``torch.optim.AdamW`` (Kingma & Ba, 2015;
Loshchilov & Hutter, 2019).

.. math::
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
    \theta_t &= \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
        \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

with :math:`\hat v_t = \max(\hat v_{t-1}, v_t)` under ``amsgrad``. Weight decay is
added to the gradient, or with ``decoupled_weight_decay`` (AdamW) applied as
:math:`\theta \leftarrow \theta(1-\gamma\lambda)` first.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._rule import Hyper, State, UpdateRule, addcdiv_all, moving_average_of_squares, safe_sqrt, safe_sqrt_all
from ._shared import add_weight_decay, power, signed_with_weight_decay
from .optimizer import DifferentiableOptimizer


class AdamRule(UpdateRule):
    name = "adam"
    defaults = {
        "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
        "maximize": False, "decoupled_weight_decay": False,
    }
    flags = frozenset({"amsgrad", "maximize", "decoupled_weight_decay"})
    group_lr_may_be_tensor = True

    def init_state(self, param: Tensor, hp: Hyper) -> State:
        state: State = {"step": 0, "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}
        if hp["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(param)
        return state

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        beta1, beta2 = hp["betas"]
        step = state["step"] + 1
        g = -grad if hp["maximize"] else grad
        param, g = add_weight_decay(param, g, hp)
        exp_avg = torch.lerp(state["exp_avg"], g, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"] * beta2 + (1 - beta2) * (g * g)
        new_state: State = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        bias_correction1 = 1 - power(beta1, step)
        bias_correction2_sqrt = (1 - power(beta2, step)) ** 0.5
        second_moment = exp_avg_sq
        if hp["amsgrad"]:
            second_moment = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
            new_state["max_exp_avg_sq"] = second_moment
        denom = safe_sqrt(second_moment) / bias_correction2_sqrt + hp["eps"]
        return param - (hp["lr"] / bias_correction1) * (exp_avg / denom), new_state

    def update_group(
        self, params: list[Tensor], grads: list[Tensor], states: list[State], hp: Hyper
    ) -> tuple[list[Tensor], list[State]] | None:
        step = states[0]["step"] + 1
        beta1, beta2 = hp["betas"]
        params, g = signed_with_weight_decay(params, grads, hp)
        exp_avg = torch._foreach_lerp([s["exp_avg"] for s in states], g, 1 - beta1)
        exp_avg_sq = moving_average_of_squares([s["exp_avg_sq"] for s in states], g, beta2)
        second_moment = exp_avg_sq
        if hp["amsgrad"]:
            second_moment = torch._foreach_maximum([s["max_exp_avg_sq"] for s in states], exp_avg_sq)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = torch._foreach_add(torch._foreach_div(safe_sqrt_all(second_moment), bias_correction2_sqrt), hp["eps"])
        new_params = addcdiv_all(params, exp_avg, denom, value=-(hp["lr"] / bias_correction1))
        new_states: list[State] = []
        for k in range(len(params)):
            state: State = {"step": step, "exp_avg": exp_avg[k], "exp_avg_sq": exp_avg_sq[k]}
            if hp["amsgrad"]:
                state["max_exp_avg_sq"] = second_moment[k]
            new_states.append(state)
        return new_params, new_states


class Adam(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adam``; see :class:`DifferentiableOptimizer` for the extra options."""

    rule_class = AdamRule

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float | Tensor = 1e-8,
        weight_decay: float | Tensor = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, decoupled_weight_decay=decoupled_weight_decay, **options,
        )


class AdamW(DifferentiableOptimizer):
    """Differentiable ``torch.optim.AdamW`` (Adam with decoupled weight decay, default 1e-2)."""

    rule_class = AdamRule
    fixed_options = {"decoupled_weight_decay": True}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float | Tensor = 1e-8,
        weight_decay: float | Tensor = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, **options,
        )
