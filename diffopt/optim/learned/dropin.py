"""A learned (or any differentiable) rule as a ``torch.optim.Optimizer`` for plain training loops::

    opt = diffopt.optim.learned.load("rule.pt", model.parameters())
    for x, y in data:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

``step()`` runs, under ``torch.no_grad``, the very same pure function the
engine unrolls (:meth:`DifferentiableOptimizer.update`) on ``p.grad`` and
writes the result into ``p``: a trained rule makes the same updates in a plain
loop as in meta-training. ``state_dict()`` holds the per-parameter rule state
(torch.optim's layout), the step count and the learned rule itself, so
``load_state_dict`` restores a run exactly.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._gradients import check_finite_gradients
from ..optimizer import DifferentiableOptimizer
from .serialization import LearnedRuleError, build, export, from_payload, live_tensors, read, to_payload

__all__ = ["DropInOptimizer", "load"]


def _is_learned(opt: DifferentiableOptimizer) -> bool:
    try:
        live_tensors(opt)
    except TypeError:
        return False
    return True


class DropInOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` front end of a :class:`~diffopt.optim.DifferentiableOptimizer`.

    Args:
        functional: the differentiable optimizer whose rule to apply; its parameters
            must be leaf tensors (``model.parameters()``). Its gradient transforms
            (clipping) and ``check_finite`` apply as in its own ``step``.
    """

    def __init__(self, functional: DifferentiableOptimizer) -> None:
        if not isinstance(functional, DifferentiableOptimizer):
            raise TypeError(f"DropInOptimizer needs a diffopt DifferentiableOptimizer, got {type(functional).__name__}")
        self._building = True
        self._params = list(functional.params)
        groups = [{"params": [self._params[i] for i in g["params"]]} for g in functional.param_groups]
        super().__init__(groups, {})
        self._building = False
        self.functional = functional
        self.step_count = 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_building", False):
            raise TypeError(
                "DropInOptimizer.add_param_group: the learned rule is built for a fixed set of parameters; "
                "create the optimizer with all of them"
            )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One update of every parameter that has a gradient (as the functional rule)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads: list[Tensor | None] = []
        for p in self._params:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError("DropInOptimizer does not support sparse gradients")
            # a copy: rules may keep the gradient in their state (momentum, the last direction)
            grads.append(None if p.grad is None else p.grad.detach().clone())
        grads = self.functional.transforms(grads, self.step_count)
        if self.functional.check_finite:
            check_finite_gradients(grads, self.functional.param_names, self.step_count)
        states = [self.state[p] if self.state.get(p) else None for p in self._params]
        new_params, new_states = self.functional.update([p.detach() for p in self._params], grads, states,
                                                        self.step_count)
        for p, g, new, state, old in zip(self._params, grads, new_params, new_states, states):
            if g is None and state is old:  # no gradient, no step (torch.optim's rule); a rule that steps
                continue                    # without one (hypergradient descent's global α) moved it: kept
            p.copy_(new)
            self.state[p] = state
        self.step_count += 1
        return loss

    # -- persistence -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["step_count"] = self.step_count
        out["learned"] = to_payload(self.functional) if _is_learned(self.functional) else None
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.step_count = int(state_dict.pop("step_count", 0))
        payload = state_dict.pop("learned", None)
        if payload is not None:
            saved = from_payload(payload, "the state dict's learned rule")
            mine = export(self.functional)
            if (saved.kind, saved.config) != (mine.kind, mine.config):
                raise LearnedRuleError(
                    f"load_state_dict: the state dict is for a {saved.kind} rule with config {saved.config}; this "
                    f"optimizer runs a {mine.kind} rule with config {mine.config}"
                )
            with torch.no_grad():
                for name, tensor in live_tensors(self.functional).items():
                    tensor.copy_(saved.tensors[name])
        super().load_state_dict(state_dict)
        for p in self._params:
            state = self.state.get(p)
            if state and "step" in state and isinstance(state["step"], Tensor):
                state["step"] = int(state["step"])

    def __repr__(self) -> str:
        return f"DropInOptimizer({type(self.functional).__name__}, {len(self._params)} parameters)"


def load(path: str | os.PathLike[str], params: Iterable[Any], *, features: Sequence[str] | None = None,
         **overrides: Any) -> DropInOptimizer:
    """A saved learned rule as a ``torch.optim`` optimizer over ``params`` (see the module docstring).

    Args:
        path: a file written by :func:`diffopt.optim.learned.save`.
        params: the parameters to optimise (``model.parameters()``).
        features: the feature set the caller expects; a file with another one is refused.
        **overrides: options of the rule to change (e.g. ``nonfinite="skip"``).
    """
    return DropInOptimizer(build(read(path, features=features), params, **overrides))
