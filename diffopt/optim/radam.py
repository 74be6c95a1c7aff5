r"""RAdam, as ``torch.optim.RAdam`` (Liu et al., 2020): Adam with variance rectification.

.. math::
    \rho_\infty = \frac{2}{1-\beta_2} - 1,\qquad
    \rho_t = \rho_\infty - \frac{2t\beta_2^t}{1-\beta_2^t},\qquad
    r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}

The step is :math:`-\gamma\,\hat m_t\, r_t\sqrt{1-\beta_2^t}/(\sqrt{v_t}+\epsilon)` when
:math:`\rho_t > 5` and the SGD-with-momentum step :math:`-\gamma\hat m_t` otherwise.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._rule import Hyper, State, UpdateRule, moving_average_of_squares, safe_sqrt, safe_sqrt_all, scale_all
from ._shared import add_weight_decay, signed_with_weight_decay
from .optimizer import DifferentiableOptimizer


class RAdamRule(UpdateRule):
    name = "radam"
    defaults = {
        "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
        "decoupled_weight_decay": False, "maximize": False,
    }
    flags = frozenset({"maximize", "decoupled_weight_decay"})
    group_lr_may_be_tensor = True

    def init_state(self, param: Tensor, hp: Hyper) -> State:
        return {"step": 0, "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        beta1, beta2 = hp["betas"]
        lr = hp["lr"]
        step = state["step"] + 1
        g = -grad if hp["maximize"] else grad
        param, g = add_weight_decay(param, g, hp)
        exp_avg = torch.lerp(state["exp_avg"], g, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"] * beta2 + (1 - beta2) * (g * g)
        new_state = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        bias_correction2 = 1 - beta2**step
        corrected_exp_avg = exp_avg / (1 - beta1**step)
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2

        def rectified_step(rho: Any) -> Tensor:
            rect = ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5
            adaptive_lr = (bias_correction2**0.5) / (safe_sqrt(exp_avg_sq) + hp["eps"])
            return corrected_exp_avg * lr * adaptive_lr * rect

        if isinstance(rho_t, Tensor) and rho_t.numel() > 1:
            # Per-element beta2: choose per element; the unused branch sees a safe rho.
            rectify = rho_t > 5.0
            safe_rho = torch.where(rectify, rho_t, torch.full_like(rho_t, 6.0))
            update = torch.where(rectify, rectified_step(safe_rho), corrected_exp_avg * lr)
        elif rho_t > 5.0:
            update = rectified_step(rho_t)
        else:
            update = corrected_exp_avg * lr
        return param - update, new_state

    def update_group(
        self, params: list[Tensor], grads: list[Tensor], states: list[State], hp: Hyper
    ) -> tuple[list[Tensor], list[State]] | None:
        step = states[0]["step"] + 1
        beta1, beta2 = hp["betas"]
        lr = hp["lr"]
        params, g = signed_with_weight_decay(params, grads, hp)
        exp_avg = torch._foreach_lerp([s["exp_avg"] for s in states], g, 1 - beta1)
        exp_avg_sq = moving_average_of_squares([s["exp_avg_sq"] for s in states], g, beta2)
        bias_correction2 = 1 - beta2**step
        update = scale_all(torch._foreach_div(exp_avg, 1 - beta1**step), lr)
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
        if rho_t > 5.0:
            rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
            denom = torch._foreach_add(safe_sqrt_all(exp_avg_sq), hp["eps"])
            # ``c / tensor`` is ``tensor.reciprocal() * c`` in torch, here for the whole list.
            adaptive_lr = torch._foreach_mul(torch._foreach_reciprocal(denom), bias_correction2**0.5)
            update = torch._foreach_mul(torch._foreach_mul(update, adaptive_lr), rect)
        new_states: list[State] = [{"step": step, "exp_avg": m, "exp_avg_sq": v} for m, v in zip(exp_avg, exp_avg_sq)]
        return torch._foreach_sub(params, update), new_states


class RAdam(DifferentiableOptimizer):
    """Differentiable ``torch.optim.RAdam``."""

    rule_class = RAdamRule

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float | Tensor = 1e-8,
        weight_decay: float | Tensor = 0.0,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, **options,
        )
