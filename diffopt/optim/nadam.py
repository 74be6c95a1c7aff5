r"""NAdam, as ``torch.optim.NAdam`` (Dozat, 2016), with its momentum schedule.

.. math::
    \mu_t &= \beta_1\bigl(1 - \tfrac12\,0.96^{t\psi}\bigr),\qquad
    \Pi_t = \textstyle\prod_{i\le t}\mu_i \\
    \theta_t &= \theta_{t-1}
      - \gamma\frac{1-\mu_t}{1-\Pi_t}\frac{g_t}{\sqrt{v_t/(1-\beta_2^t)}+\epsilon}
      - \gamma\frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\frac{m_t}{\sqrt{v_t/(1-\beta_2^t)}+\epsilon}

where :math:`\psi` is ``momentum_decay``. As in torch, :math:`\Pi_t` is kept in
the scalar-state dtype (float32 unless the default dtype is float64) when the
betas are numbers.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._rule import (
    Hyper, State, UpdateRule, addcdiv_all, check_range, moving_average_of_squares, safe_sqrt, safe_sqrt_all,
    scalar_state_dtype,
)
from ._shared import add_weight_decay, signed_with_weight_decay
from .optimizer import DifferentiableOptimizer


class NAdamRule(UpdateRule):
    name = "nadam"
    defaults = {
        "lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "momentum_decay": 4e-3,
        "decoupled_weight_decay": False, "maximize": False,
    }
    flags = frozenset({"maximize", "decoupled_weight_decay"})
    group_lr_may_be_tensor = True

    def init_state(self, param: Tensor, hp: Hyper) -> State:
        return {
            "step": 0,
            "mu_product": torch.tensor(1.0, dtype=scalar_state_dtype()),
            "exp_avg": torch.zeros_like(param),
            "exp_avg_sq": torch.zeros_like(param),
        }

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        beta1, beta2 = hp["betas"]
        lr, psi = hp["lr"], hp["momentum_decay"]
        step = state["step"] + 1
        g = -grad if hp["maximize"] else grad
        param, g = add_weight_decay(param, g, hp)
        mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * psi))
        mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * psi))
        mu_product = state["mu_product"] * mu
        if isinstance(mu, Tensor):  # learnable beta1 or momentum_decay: stay on the graph
            mu_product_value = mu_product
        else:
            mu_product_value = float(mu_product)
        mu_product_next = mu_product_value * mu_next
        exp_avg = torch.lerp(state["exp_avg"], g, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"] * beta2 + (1 - beta2) * (g * g)
        denom = safe_sqrt(exp_avg_sq / (1 - beta2**step)) + hp["eps"]
        new_param = (
            param
            + (-lr * (1.0 - mu) / (1.0 - mu_product_value)) * (g / denom)
            + (-lr * mu_next / (1.0 - mu_product_next)) * (exp_avg / denom)
        )
        new_state = {"step": step, "mu_product": mu_product, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        return new_param, new_state

    def update_group(
        self, params: list[Tensor], grads: list[Tensor], states: list[State], hp: Hyper
    ) -> tuple[list[Tensor], list[State]] | None:
        step = states[0]["step"] + 1
        beta1, beta2 = hp["betas"]
        lr, psi = hp["lr"], hp["momentum_decay"]
        params, g = signed_with_weight_decay(params, grads, hp)
        mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * psi))
        mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * psi))
        # One float32 (or float64) tensor per state, as torch keeps it, and its value per tensor.
        mu_products = torch._foreach_mul([s["mu_product"] for s in states], mu)
        products = [float(m) for m in mu_products]
        exp_avg = torch._foreach_lerp([s["exp_avg"] for s in states], g, 1 - beta1)
        exp_avg_sq = moving_average_of_squares([s["exp_avg_sq"] for s in states], g, beta2)
        denom = torch._foreach_add(safe_sqrt_all(torch._foreach_div(exp_avg_sq, 1 - beta2**step)), hp["eps"])
        # One coefficient for all when the products agree (the usual case: a tensor lr then
        # costs two scalar operations, not two per tensor).
        distinct = [products[0]] if all(p == products[0] for p in products) else products

        def coefficients(rule: Callable[[float], Any]) -> Any:
            values = [rule(p) for p in distinct]
            return values[0] if len(values) == 1 else values

        new_params = addcdiv_all(params, g, denom, value=coefficients(lambda p: -lr * (1.0 - mu) / (1.0 - p)))
        new_params = addcdiv_all(
            new_params, exp_avg, denom, value=coefficients(lambda p: (-lr * mu_next) / (1.0 - p * mu_next))
        )
        return new_params, [
            {"step": step, "mu_product": mp, "exp_avg": m, "exp_avg_sq": v}
            for mp, m, v in zip(mu_products, exp_avg, exp_avg_sq)
        ]

    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        super().validate_group(group, where)
        check_range(group["momentum_decay"], "momentum_decay", where, low=0.0)

    def state_from_torch(self, state: Mapping[str, Any], param: Tensor) -> State:
        converted = super().state_from_torch(state, param)
        converted["mu_product"] = torch.as_tensor(converted["mu_product"], dtype=scalar_state_dtype()).clone()
        return converted


class NAdam(DifferentiableOptimizer):
    """Differentiable ``torch.optim.NAdam``."""

    rule_class = NAdamRule

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 2e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float | Tensor = 1e-8,
        weight_decay: float | Tensor = 0.0,
        momentum_decay: float | Tensor = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
            decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, **options,
        )
