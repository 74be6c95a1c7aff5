r"""Rprop, as ``torch.optim.Rprop`` (Riedmiller & Braun, 1993).

Per element, the step size grows by :math:`\eta_+` when the gradient keeps its
sign, shrinks by :math:`\eta_-` when it flips (and that gradient is then treated
as zero), and is clamped to ``step_sizes``; the parameter moves by
:math:`-\mathrm{sign}(g)\cdot\text{step size}`. The initial step size is ``lr``,
which is therefore the differentiable path to the learning rate.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._rule import Hyper, State, UpdateRule, check_pair, check_range
from .optimizer import DifferentiableOptimizer


class RpropRule(UpdateRule):
    name = "rprop"
    defaults = {"lr": 1e-2, "etas": (0.5, 1.2), "step_sizes": (1e-6, 50.0), "maximize": False}
    group_lr_may_be_tensor = True  # lr only sets the initial step sizes

    def init_state(self, param: Tensor, hp: Hyper) -> State:
        # torch: a complex parameter's real and imaginary parts are independent coordinates, each starting at lr
        initial = hp["lr"] * (1 + 1j) if param.is_complex() else hp["lr"]
        return {"step": 0, "prev": torch.zeros_like(param), "step_size": torch.zeros_like(param) + initial}

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        etaminus, etaplus = hp["etas"]
        step_size_min, step_size_max = hp["step_sizes"]
        g = -grad if hp["maximize"] else grad
        agreement = (g * state["prev"]).sign().detach()
        one = torch.ones_like(agreement)
        factor = torch.where(agreement > 0, etaplus * one, torch.where(agreement < 0, etaminus * one, one))
        step_size = state["step_size"] * factor
        if isinstance(step_size_min, Tensor) or isinstance(step_size_max, Tensor):
            # torch.clamp takes two numbers or two tensors, not one of each.
            step_size = torch.clamp(
                step_size, torch.as_tensor(step_size_min, dtype=step_size.dtype, device=step_size.device),
                torch.as_tensor(step_size_max, dtype=step_size.dtype, device=step_size.device),
            )
        else:
            step_size = torch.clamp(step_size, step_size_min, step_size_max)
        g = torch.where(factor == etaminus, torch.zeros_like(g), g)
        new_state = {"step": state["step"] + 1, "prev": g, "step_size": step_size}
        return param - g.sign() * step_size, new_state

    def update_group(
        self, params: list[Tensor], grads: list[Tensor], states: list[State], hp: Hyper
    ) -> tuple[list[Tensor], list[State]] | None:
        etaminus, etaplus = hp["etas"]
        step_size_min, step_size_max = hp["step_sizes"]
        g = torch._foreach_neg(grads) if hp["maximize"] else grads
        with torch.no_grad():  # the sign pattern is piecewise constant
            agreement = torch._foreach_sign(torch._foreach_mul(g, [s["prev"] for s in states]))
            factor = [torch.where(a > 0, etaplus, torch.where(a < 0, etaminus, torch.ones_like(a))) for a in agreement]
        step_size = torch._foreach_clamp_max(
            torch._foreach_clamp_min(torch._foreach_mul([s["step_size"] for s in states], factor), step_size_min),
            step_size_max,
        )
        g = [torch.where(f == etaminus, 0.0, gk) for f, gk in zip(factor, g)]
        new_params = torch._foreach_addcmul(params, torch._foreach_sign(g), step_size, value=-1)
        return new_params, [
            {"step": s["step"] + 1, "prev": gk, "step_size": size} for s, gk, size in zip(states, g, step_size)
        ]

    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        super().validate_group(group, where)
        etaminus, etaplus = check_pair(group["etas"], "etas", where)
        check_range(etaminus, "etas[0]", where, low=0.0, high=1.0, low_inclusive=False)
        check_range(etaplus, "etas[1]", where, low=1.0, low_inclusive=False)
        low, high = check_pair(group["step_sizes"], "step_sizes", where)
        check_range(low, "step_sizes[0]", where, low=0.0)
        check_range(high, "step_sizes[1]", where, low=0.0, finite=False)  # inf: no largest step


class Rprop(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Rprop``."""

    rule_class = RpropRule

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        etas: tuple[float | Tensor, float | Tensor] = (0.5, 1.2),
        step_sizes: tuple[float | Tensor, float | Tensor] = (1e-6, 50.0),
        *,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(params, lr=lr, etas=etas, step_sizes=step_sizes, maximize=maximize, **options)
