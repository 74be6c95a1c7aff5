"""Deliberately wrong optimizers: the kit must flag each of them.

Each is a bug seen in real differentiable-optimization code:

* :class:`AdamWithoutBiasCorrection` — Adam's ``1 − β^t`` corrections dropped;
* :class:`SGDDetachedMomentum` — the momentum buffer cut from the graph (right
  trajectory, wrong hypergradient: only finite differences catch it);
* :class:`SGDWrongSignWeightDecay` — weight decay added with the wrong sign;
* :class:`AdamTaskMeanSecondMoment` — the second moment built from the squared
  mean gradient over the task batch where per-task squares belong (tasks leak
  into each other: only a per-task independence check catches it).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..optim import SGD, Adam
from ..optim._rule import Hyper, State, safe_sqrt
from ..optim.adam import AdamRule
from ..optim.sgd import SGDRule


class _NoBiasCorrectionRule(AdamRule):
    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        beta1, beta2 = hp["betas"]
        exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad
        new = param - hp["lr"] * exp_avg / (safe_sqrt(exp_avg_sq) + hp["eps"])
        return new, {"step": state["step"] + 1, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class AdamWithoutBiasCorrection(Adam):
    rule_class = _NoBiasCorrectionRule


class _DetachedMomentumRule(SGDRule):
    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        new, new_state = super().update_one(param, grad, state, hp)
        buffer = new_state.get("momentum_buffer")
        if buffer is not None:
            new_state = {"momentum_buffer": buffer.detach()}
        return new, new_state


class SGDDetachedMomentum(SGD):
    rule_class = _DetachedMomentumRule


class _WrongSignRule(SGDRule):
    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        return super().update_one(param, grad, state, dict(hp, weight_decay=-hp["weight_decay"]))


class SGDWrongSignWeightDecay(SGD):
    rule_class = _WrongSignRule


class _TaskMeanRule(AdamRule):
    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        pooled = grad.mean(0, keepdim=True).expand_as(grad) if grad.dim() > 1 else grad
        beta1, beta2 = hp["betas"]
        step = state["step"] + 1
        exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"] * beta2 + (1 - beta2) * pooled * pooled
        denom = safe_sqrt(exp_avg_sq) / (1 - beta2**step) ** 0.5 + hp["eps"]
        new = param - hp["lr"] / (1 - beta1**step) * exp_avg / denom
        return new, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class AdamTaskMeanSecondMoment(Adam):
    rule_class = _TaskMeanRule


FAULTY: dict[str, tuple[type, Any, dict[str, Any]]] = {
    # name: (class, torch reference, options)
    "Adam without bias correction": (AdamWithoutBiasCorrection, torch.optim.Adam, {"lr": 0.05}),
    "SGD with a detached momentum buffer": (SGDDetachedMomentum, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "SGD with the wrong sign of weight decay": (SGDWrongSignWeightDecay, torch.optim.SGD,
                                                {"lr": 0.05, "weight_decay": 0.1}),
    "Adam with a squared task-mean second moment": (AdamTaskMeanSecondMoment, torch.optim.Adam, {"lr": 0.05}),
}
