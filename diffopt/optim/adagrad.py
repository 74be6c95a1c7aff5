r"""Adagrad, as ``torch.optim.Adagrad`` (Duchi et al., 2011).

.. math::
    s_t = s_{t-1} + g_t^2,\qquad
    \theta_t = \theta_{t-1} - \frac{\gamma}{1 + (t-1)\eta}\,\frac{g_t}{\sqrt{s_t} + \epsilon}

with :math:`\eta` the ``lr_decay`` and :math:`s_0` the ``initial_accumulator_value``.
Like torch, the state is created for every parameter at construction.
"""
from __future__ import annotations

import warnings

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._hyper import resolve
from ._rule import Hyper, State, UpdateRule, addcdiv_all, check_range, safe_sqrt, safe_sqrt_all
from ._shared import add_weight_decay, signed_with_weight_decay
from .optimizer import DifferentiableOptimizer


class AdagradRule(UpdateRule):
    name = "adagrad"
    defaults = {
        "lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10,
        "maximize": False,
    }
    eager_state = True
    group_lr_may_be_tensor = True

    def init_state(self, param: Tensor, hp: Hyper) -> State:
        initial = hp["initial_accumulator_value"]
        if param.is_complex():  # as torch.optim: the real and imaginary parts are two coordinates, each starts there
            initial = torch.complex(initial, initial) if isinstance(initial, Tensor) else complex(initial, initial)
        total = torch.zeros_like(param) + initial
        return {"step": 0, "sum": total}

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        step = state["step"] + 1
        g = -grad if hp["maximize"] else grad
        param, g = add_weight_decay(param, g, hp)
        clr = hp["lr"] / (1 + (step - 1) * hp["lr_decay"])
        total = state["sum"] + g * g
        std = safe_sqrt(total) + hp["eps"]
        return param - clr * (g / std), {"step": step, "sum": total}

    def update_group(
        self, params: list[Tensor], grads: list[Tensor], states: list[State], hp: Hyper
    ) -> tuple[list[Tensor], list[State]] | None:
        step = states[0]["step"] + 1
        params, g = signed_with_weight_decay(params, grads, hp)
        clr = hp["lr"] / (1 + (step - 1) * hp["lr_decay"])
        total = torch._foreach_addcmul([s["sum"] for s in states], g, g, value=1)
        std = torch._foreach_add(safe_sqrt_all(total), hp["eps"])
        new_params = addcdiv_all(params, g, std, value=-clr)
        return new_params, [{"step": step, "sum": t} for t in total]

    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        super().validate_group(group, where)
        check_range(group["lr_decay"], "lr_decay", where, low=0.0)
        check_range(group["initial_accumulator_value"], "initial_accumulator_value", where, low=0.0)


class Adagrad(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adagrad``."""

    rule_class = AdagradRule

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        lr_decay: float | Tensor = 0.0,
        weight_decay: float | Tensor = 0.0,
        initial_accumulator_value: float | Tensor = 0.0,
        eps: float | Tensor = 1e-10,
        *,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize, **options,
        )
        for k, group in enumerate(self.param_groups):
            value = group["initial_accumulator_value"]
            if value is not initial_accumulator_value and (
                    isinstance(value, Tensor) or isinstance(initial_accumulator_value, Tensor)
                    or value != initial_accumulator_value):
                warnings.warn(
                    f"Adagrad: parameter group {k} sets initial_accumulator_value, which is not used: as "
                    "torch.optim.Adagrad, the accumulators start from the constructor's value (so a tensor "
                    "there gets no gradient); pass it to the constructor", UserWarning, stacklevel=2,
                )

    def initial_states(self, params: Sequence[Tensor]) -> list[State | None]:
        """As torch.optim.Adagrad, which fills every accumulator in ``__init__`` from the
        constructor's ``initial_accumulator_value``: a group-level value is not used for it."""
        states: list[State | None] = [None] * len(params)
        for group in self.param_groups:
            group = dict(group, initial_accumulator_value=self.defaults["initial_accumulator_value"])
            for position, i in enumerate(group["params"]):
                hp = {k: resolve(v, k, position, 0) for k, v in group.items() if k != "params"}
                states[i] = self.rule.init_state(params[i], hp)
        return states
