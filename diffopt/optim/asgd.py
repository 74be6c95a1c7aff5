r"""Averaged SGD, as ``torch.optim.ASGD`` (Polyak & Juditsky, 1992).

.. math::
    \theta_t &= \theta_{t-1}(1 - \lambda\eta_{t-1}) - \eta_{t-1} g_t \\
    \bar\theta_t &= \bar\theta_{t-1} + \mu_{t-1}(\theta_t - \bar\theta_{t-1}) \\
    \eta_t &= \gamma / (1 + \lambda\gamma t)^{\alpha},\qquad \mu_t = 1/\max(1, t - t_0)

with :math:`\eta_0 = \gamma`. The average :math:`\bar\theta` is kept in the state
as ``ax``. When the hyperparameters are numbers, ``eta`` and ``mu`` are rounded
through torch's scalar-state dtype exactly as torch stores them (float32 unless
the default dtype is float64). A tensor learning rate keeps ``eta`` in full
precision so that it stays differentiable (rounding is piecewise constant); with
float32 as the default dtype the trajectory then differs from torch's by the
float32 rounding of ``eta`` (about 1e-9 relative), and is exact under float64.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._rule import (
    Hyper, State, UpdateRule, add_scaled_all, check_range, common_value, round_like_torch_state, scale_all,
)
from ._shared import add_weight_decay, signed_with_weight_decay
from .optimizer import DifferentiableOptimizer


class ASGDRule(UpdateRule):
    name = "asgd"
    defaults = {"lr": 1e-2, "lambd": 1e-4, "alpha": 0.75, "t0": 1e6, "weight_decay": 0.0, "maximize": False}
    group_lr_may_be_tensor = True  # then eta is a tensor on the graph too

    @staticmethod
    def _stored(value: Any) -> Any:
        return value if isinstance(value, Tensor) else round_like_torch_state(float(value))

    def init_state(self, param: Tensor, hp: Hyper) -> State:
        return {"step": 0, "eta": self._stored(hp["lr"]), "mu": 1.0, "ax": torch.zeros_like(param)}

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        lr, lambd, alpha = hp["lr"], hp["lambd"], hp["alpha"]
        step = state["step"] + 1
        g = -grad if hp["maximize"] else grad
        param, g = add_weight_decay(param, g, hp)
        eta, mu = state["eta"], state["mu"]
        param = param * (1 - lambd * eta) - eta * g
        ax = state["ax"] + (param - state["ax"]) * mu if mu != 1 else param
        new_state = {
            "step": step,
            "eta": self._stored(lr / ((1 + lambd * lr * step) ** alpha)),
            "mu": round_like_torch_state(1 / max(1, step - float(hp["t0"]))),
            "ax": ax,
        }
        return param, new_state

    def update_group(
        self, params: list[Tensor], grads: list[Tensor], states: list[State], hp: Hyper
    ) -> tuple[list[Tensor], list[State]] | None:
        eta, mu = common_value(states, "eta"), common_value(states, "mu")
        if eta is None or mu is None:  # equal at equal step counts unless lr changed in between
            return None
        step = states[0]["step"] + 1
        lr, lambd = hp["lr"], hp["lambd"]
        params, g = signed_with_weight_decay(params, grads, hp)
        new_params = add_scaled_all(scale_all(params, 1 - lambd * eta), g, -eta)
        if mu != 1:
            ax = [s["ax"] for s in states]
            ax = torch._foreach_add(ax, torch._foreach_mul(torch._foreach_sub(new_params, ax), mu))
        else:
            ax = new_params
        next_eta = self._stored(lr / ((1 + lambd * lr * step) ** hp["alpha"]))
        next_mu = round_like_torch_state(1 / max(1, step - float(hp["t0"])))
        return new_params, [{"step": step, "eta": next_eta, "mu": next_mu, "ax": a} for a in ax]

    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        super().validate_group(group, where)
        check_range(group["lambd"], "lambd", where, low=0.0)
        check_range(group["alpha"], "alpha", where, low=0.0)
        check_range(group["t0"], "t0", where, low=0.0, finite=False)  # inf: never average
        if isinstance(group["t0"], Tensor):
            raise TypeError(f"{where}: t0 is a step count and must be a number, not a tensor")

    def state_from_torch(self, state: Mapping[str, Any], param: Tensor) -> State:
        return {
            "step": int(float(state["step"])),
            "eta": float(state["eta"]),
            "mu": float(state["mu"]),
            "ax": state["ax"].detach().clone(),
        }


class ASGD(DifferentiableOptimizer):
    """Differentiable ``torch.optim.ASGD``; the running average is ``state[i]["ax"]``."""

    rule_class = ASGDRule

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        lambd: float | Tensor = 1e-4,
        alpha: float | Tensor = 0.75,
        t0: float = 1e6,
        weight_decay: float | Tensor = 0.0,
        *,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            params, lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay, maximize=maximize,
            **options,
        )
