r"""Hypergradient descent (Baydin et al., 2018, "Online learning rate adaptation with
hypergradient descent"): the learning rate follows its own gradient, online.

With :math:`\theta_t = \theta_{t-1} - \alpha_t u_t` and :math:`u` the update
direction, :math:`\partial f(\theta_{t-1}) / \partial \alpha_{t-1} = -\nabla f(\theta_{t-1}) \cdot u_{t-1}`, so

.. math::
    \alpha_t = \alpha_{t-1} + \beta\, \nabla f(\theta_{t-1}) \cdot u_{t-1},
    \qquad \theta_t = \theta_{t-1} - \alpha_t\, u_t

with :math:`u_{-1} = 0` (the first step uses :math:`\alpha_0`), and

* SGD-HD: :math:`u_t = \nabla f(\theta_{t-1})`;
* Adam-HD: :math:`u_t = \hat m_t / (\sqrt{\hat v_t} + \epsilon)` (Adam's bias-corrected direction).

The learning rate :math:`\alpha` is *state* of the rule (``state["lr"]``), so it
is carried across steps (and across truncations in meta-training) and saved
by ``state_dict``. ``scope="global"`` (the paper's) shares one α over all
parameters of a parameter group — the dot product sums over the group (each group keeps its own
α, from its own α₀ and β, as ``torch.optim`` keeps one lr per group); ``scope="tensor"``
adapts one α per parameter tensor. On task-batched weights every task has its
own α (the dot products never mix tasks). :math:`\alpha_0` (``lr``) and
:math:`\beta` (``hyper_lr``) may be tensors and then receive meta-gradients.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._rule import Hyper, State, check_range, safe_sqrt
from ._base import LearnedOptimizer, LearnedRule, batch_shape

__all__ = ["HypergradientAdam", "HypergradientAdamRule", "HypergradientSGD", "HypergradientSGDRule"]

SCOPES = ("global", "tensor")


def _per_task(x: Tensor, batch_dims: int) -> Tensor:
    """Sum over the parameter's own dimensions: shape = the task-batch shape."""
    return x.reshape(*x.shape[:batch_dims], -1).sum(-1)


def _expand(lr: Tensor, param: Tensor) -> Tensor:
    return lr.reshape(lr.shape + (1,) * (param.dim() - lr.dim()))


class HypergradientSGDRule(LearnedRule):
    name = "hypergradient_sgd"
    defaults = {"lr": 1e-2, "hyper_lr": 1e-3, "scope": "global", "maximize": False}
    flags = frozenset({"maximize"})

    def init_state(self, param: Tensor, hp: Hyper) -> State:
        shape = batch_shape(param, hp)
        ones = torch.ones(shape, dtype=param.dtype, device=param.device)
        return {"step": 0, "lr": (ones * hp["lr"]).to(param.dtype), "direction": None}

    def direction(self, g: Tensor, state: State, hp: Hyper, step: int) -> tuple[Tensor, State]:
        return g, {}

    def hypergradient(self, grad: Tensor, state: State, hp: Hyper) -> Tensor | None:
        """``∇f(θ_{t−1}) · u_{t−1}`` per task (None on the first step)."""
        if state.get("direction") is None:
            return None
        g = -grad if hp["maximize"] else grad
        return _per_task(g * state["direction"], hp["batch_dims"])

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        g = -grad if hp["maximize"] else grad
        if state.get("direction") is None:
            h = None  # the first step: no previous direction
        elif "shared_hypergradient" in hp:  # scope "global": one sum over all the group's tensors
            h = hp["shared_hypergradient"]
        else:
            h = self.hypergradient(grad, state, hp)
        lr = state["lr"] if h is None else state["lr"] + hp["hyper_lr"] * h
        lr = lr.to(param.dtype)  # (a float64 lr tensor, or the global sum over float32 and float64 tensors)
        step = state["step"] + 1
        u, extra = self.direction(g, state, hp, step)
        return param - _expand(lr, param) * u, {"step": step, "lr": lr, "direction": u, **extra}

    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        super().validate_group(group, where)
        check_range(group["hyper_lr"], "hyper_lr", where, low=0.0)
        if group["scope"] not in SCOPES:
            raise ValueError(f"{where}: scope must be one of {SCOPES}, got {group['scope']!r}")


class HypergradientAdamRule(HypergradientSGDRule):
    name = "hypergradient_adam"
    defaults = {"lr": 1e-3, "hyper_lr": 1e-7, "betas": (0.9, 0.999), "eps": 1e-8, "scope": "global",
                "maximize": False}

    def init_state(self, param: Tensor, hp: Hyper) -> State:
        state = super().init_state(param, hp)
        state.update(exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
        return state

    def direction(self, g: Tensor, state: State, hp: Hyper, step: int) -> tuple[Tensor, State]:
        beta1, beta2 = hp["betas"]
        exp_avg = torch.lerp(state["exp_avg"], g, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"] * beta2 + (1 - beta2) * (g * g)
        u = (exp_avg / (1 - beta1**step)) / (safe_sqrt(exp_avg_sq / (1 - beta2**step)) + hp["eps"])
        return u, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class _Hypergradient(LearnedOptimizer):
    supports_complex = False  # (its state is built for real tensors)
    #: during :meth:`update`, per "global" group (by id), the hypergradient summed over its tensors
    _shared_hypergradient: dict[int, Tensor] | None = None

    def update(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        states: Sequence[State | None],
        step: int,
    ) -> tuple[list[Tensor], list[State | None]]:
        global_groups = [g for g in self.param_groups if g["scope"] == "global"]
        if not global_groups:
            return super().update(params, grads, states, step)
        # One α for the whole group, as Baydin et al.'s reference treats the group as one flat vector: a
        # tensor without a gradient this step counts with a zero gradient, so its α and direction move
        # with the others' instead of going stale.
        grads = list(grads)
        for group in global_groups:
            for i in group["params"]:
                if grads[i] is None:
                    grads[i] = torch.zeros_like(params[i])
        # One α per "global" group: ∂f/∂α_g = −∇_g f · u_g sums the group's own per-tensor dot products (a
        # sum over every group would move one group's rate by another's gradients).
        totals: dict[int, Tensor] = {}
        for group in global_groups:
            for position, i in enumerate(group["params"]):
                if grads[i] is None or states[i] is None:
                    continue
                h = self.rule.hypergradient(
                    grads[i], states[i], self.tensor_hyperparameters(group, position, i, params[i], step)
                )
                if h is not None:
                    totals[id(group)] = h if id(group) not in totals else totals[id(group)] + h
        self._shared_hypergradient = totals
        try:
            return super().update(params, grads, states, step)
        finally:
            self._shared_hypergradient = None

    def tensor_hyperparameters(
        self, group: Mapping[str, Any], position: int, index: int, param: Tensor, step: int,
        shared: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        hp = super().tensor_hyperparameters(group, position, index, param, step, shared)
        if group["scope"] == "global" and self._shared_hypergradient is not None:
            total = self._shared_hypergradient.get(id(group))
            if total is not None:
                hp["shared_hypergradient"] = total
        return hp

    def config(self) -> dict[str, Any]:
        group = self.param_groups[0]
        out = {}
        for key in self.rule.defaults:
            value = group[key]
            if isinstance(value, Tensor):
                continue  # learned: saved as a tensor
            out[key] = list(value) if isinstance(value, tuple) else value
        return out


class HypergradientSGD(_Hypergradient):
    """SGD whose learning rate adapts by hypergradient descent (SGD-HD; module docstring).

    Args:
        params: parameters or groups.
        lr: α₀ (a number or a tensor).
        hyper_lr: β, the learning rate of the learning rate.
        scope: ``"global"`` (one α for all parameters of a group, the paper's) or ``"tensor"``.
    """

    rule_class = HypergradientSGDRule
    kind = "hypergradient_sgd"

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-2, hyper_lr: float | Tensor = 1e-3, *,
                 scope: str = "global", maximize: bool = False, **options: Any) -> None:
        super().__init__(params, lr=lr, hyper_lr=hyper_lr, scope=scope, maximize=maximize, **options)


class HypergradientAdam(_Hypergradient):
    """Adam whose learning rate adapts by hypergradient descent (Adam-HD; module docstring)."""

    rule_class = HypergradientAdamRule
    kind = "hypergradient_adam"

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, hyper_lr: float | Tensor = 1e-7, *,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, scope: str = "global",
                 maximize: bool = False, **options: Any) -> None:
        super().__init__(params, lr=lr, hyper_lr=hyper_lr, betas=betas, eps=eps, scope=scope, maximize=maximize,
                         **options)
