r"""Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

.. math::
    g_t &= \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1} \\
    b_t &= \begin{cases} g_t & t = 1 \\ \mu b_{t-1} + (1-\tau) g_t & t > 1\end{cases} \\
    \theta_t &= \theta_{t-1} - \gamma\,(g_t + \mu b_t \text{ if nesterov else } b_t)
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._rule import Hyper, State, UpdateRule, add_scaled_all, check_range, maximum_of, minimum_of, nonzero
from ._shared import signed_with_weight_decay
from .optimizer import DifferentiableOptimizer


def add_scaled(tensor: Tensor, other: Tensor, factor: Any) -> Tensor:
    """``tensor + factor * other`` as torch.optim's SGD computes it: ``add(alpha=factor)`` for a number,
    ``addcmul`` for a tensor (torch's path for a learnable lr or weight decay). The two round alike, bit for
    bit; the written-out ``tensor + factor * other`` rounds the product first and differs in the last bit
    for about 5% of elements."""
    return torch.add(tensor, other, alpha=factor) if isinstance(factor, (int, float)) else torch.addcmul(
        tensor, other, factor)


def momentum_applies(momentum: float | Tensor, dampening: float | Tensor) -> bool:
    """Whether the step keeps a momentum buffer. torch's test is ``momentum != 0``. A tensor momentum
    takes the buffer path even at 0 (``buf = 0·buf + g`` is torch's value there, and the path keeps
    the hypergradient with respect to the momentum), except at 0 with a dampening, where the path
    would scale the gradient by ``1 − dampening`` and torch does not."""
    if not isinstance(momentum, Tensor):
        return momentum != 0
    if momentum.numel() == 1 and float(momentum.detach()) == 0:
        return minimum_of(dampening) == 0 and maximum_of(dampening) == 0
    return True


class SGDRule(UpdateRule):
    name = "sgd"
    defaults = {
        "lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False,
    }
    flags = frozenset({"nesterov", "maximize"})
    group_lr_may_be_tensor = True

    def init_state(self, param: Tensor, hp: Hyper) -> State:
        return {"momentum_buffer": None}

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        g = -grad if hp["maximize"] else grad
        if nonzero(hp["weight_decay"]):
            g = add_scaled(g, param, hp["weight_decay"])
        momentum = hp["momentum"]
        new_state = state
        if momentum_applies(momentum, hp["dampening"]):
            buf = state.get("momentum_buffer")
            dampening = hp["dampening"]
            if isinstance(momentum, Tensor) and momentum.numel() > 1:
                # per element: where the momentum is 0, torch keeps no buffer and ignores the dampening
                dampening = torch.where(momentum == 0, torch.zeros_like(momentum), dampening)
            buf = g if buf is None else add_scaled(buf * momentum, g, 1 - dampening)
            new_state = {"momentum_buffer": buf}
            g = add_scaled(g, buf, momentum) if hp["nesterov"] else buf
        return add_scaled(param, g, -hp["lr"]), new_state

    def update_group(
        self, params: list[Tensor], grads: list[Tensor], states: list[State], hp: Hyper
    ) -> tuple[list[Tensor], list[State]] | None:
        _, g = signed_with_weight_decay(params, grads, hp)  # SGD's weight decay is coupled
        momentum = hp["momentum"]
        new_states = states
        if momentum_applies(momentum, hp["dampening"]):
            previous = [s.get("momentum_buffer") for s in states]
            buffers = list(g)  # the first step's buffer is the gradient, as in torch
            running = [k for k, b in enumerate(previous) if b is not None]
            if running:
                updated = torch._foreach_add(
                    torch._foreach_mul([previous[k] for k in running], momentum), [g[k] for k in running],
                    alpha=1 - hp["dampening"],
                )
                for k, b in zip(running, updated):
                    buffers[k] = b
            new_states = [{"momentum_buffer": b} for b in buffers]
            g = torch._foreach_add(g, buffers, alpha=momentum) if hp["nesterov"] else buffers
        return add_scaled_all(params, g, -hp["lr"]), new_states

    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        super().validate_group(group, where)
        check_range(group["momentum"], "momentum", where, low=0.0)
        check_range(group["dampening"], "dampening", where)
        momentum, dampening = group["momentum"], group["dampening"]
        if group["nesterov"] and (minimum_of(momentum) <= 0 or minimum_of(dampening) != 0
                                  or maximum_of(dampening) != 0):
            raise ValueError(f"{where}: nesterov=True requires momentum > 0 and dampening = 0, got momentum="
                             f"{momentum!r} and dampening={dampening!r}")

    def state_from_torch(self, state: Mapping[str, Any], param: Tensor) -> State:
        buf = state.get("momentum_buffer")
        return {"momentum_buffer": None if buf is None else buf.detach().clone()}


class SGD(DifferentiableOptimizer):
    """Differentiable ``torch.optim.SGD``; see :class:`DifferentiableOptimizer` for the extra options."""

    rule_class = SGDRule

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        momentum: float | Tensor = 0.0,
        dampening: float | Tensor = 0.0,
        weight_decay: float | Tensor = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, **options,
        )
