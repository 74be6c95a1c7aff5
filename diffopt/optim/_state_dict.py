"""Saving and loading a differentiable optimizer's state in torch.optim's layout."""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._groups import IGNORED_TORCH_OPTIONS, PAIR_KEYS
from ._hyper import PerParameter, Schedule
from ._rule import State, UpdateRule


class StateDict:
    """Mixin of :class:`~diffopt.optim.DifferentiableOptimizer`: ``state_dict`` and
    ``load_state_dict``, interchangeable with the torch.optim namesake's."""

    rule: UpdateRule
    params: list[Tensor]
    param_groups: list[dict[str, Any]]
    state: list[State | None]
    step_count: int

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: ``state`` keyed by parameter index, plus ``param_groups``.

        Tensors are detached, so the result can be saved and loaded with
        ``torch.load(..., weights_only=True)``.
        """
        def plain(value: Any) -> Any:
            if isinstance(value, Tensor):
                return value.detach().clone()
            if isinstance(value, tuple):
                return tuple(plain(v) for v in value)
            if isinstance(value, (PerParameter, Schedule)):
                raise TypeError(
                    "state_dict: PerParameter and Schedule hyperparameters are not saved; "
                    "store their tensors yourself"
                )
            return value

        state = {
            i: {k: plain(v) for k, v in s.items()} for i, s in enumerate(self.state) if s is not None
        }
        groups = []
        for g in self.param_groups:
            groups.append({k: (list(v) if k == "params" else plain(v)) for k, v in g.items()})
        return {"state": state, "param_groups": groups, "step_count": self.step_count}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` or from the torch.optim namesake."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"load_state_dict: the state dict has {len(groups)} parameter groups, this "
                f"optimizer has {len(self.param_groups)}"
            )
        mapping: dict[int, int] = {}
        for k, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(
                    f"load_state_dict: group {k} has {len(saved['params'])} parameters in the "
                    f"state dict and {len(mine['params'])} here"
                )
            mapping.update(zip(saved["params"], mine["params"]))
            for key, value in saved.items():
                if key == "params" or key in IGNORED_TORCH_OPTIONS:
                    continue
                value = own_copy(tuple(value) if key in PAIR_KEYS else value)
                if key in mine:
                    mine[key] = _keep_learnable(mine[key], value, f"load_state_dict: group {k}'s {key!r}")
                else:  # a scheduler's key (initial_lr, max_lr, ...): kept, as torch.optim keeps it, for its resume
                    mine[key] = value
        self.state = [None] * len(self.params)
        for saved_index, s in state_dict["state"].items():
            i = mapping[int(saved_index)]
            self.state[i] = self.rule.state_from_torch(dict(s), self.params[i])
        self.step_count = int(state_dict.get("step_count", 0))


def own_copy(value: Any) -> Any:
    """``value`` with its plain tensors copied, also inside tuples and lists: a group converted or loaded
    from a live torch optimizer must not share a tensor lr the torch scheduler changes in place. A
    learnable tensor (one that requires grad) is kept: differentiating with respect to it is the point."""
    if isinstance(value, Tensor):
        return value if value.requires_grad else value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(own_copy(v) for v in value)
    return value


def _keep_learnable(live: Any, saved: Any, what: str) -> Any:
    """The value a loaded group sets: the saved one, except that a learnable tensor (one that requires
    grad) the saved value equals is kept, so later steps still differentiate with respect to it (a
    restored checkpoint of the same run); a learnable tensor the saved value differs from is replaced,
    with a warning that the meta-gradient no longer reaches it."""
    if isinstance(live, tuple) and isinstance(saved, tuple) and len(live) == len(saved):
        return tuple(_keep_learnable(a, b, f"{what}[{i}]") for i, (a, b) in enumerate(zip(live, saved)))
    if not (isinstance(live, torch.Tensor) and live.requires_grad):
        return saved
    same = (torch.equal(live.detach(), saved.detach().to(live)) if isinstance(saved, torch.Tensor)
            and saved.shape == live.shape else live.numel() == 1 and isinstance(saved, (int, float))
            and float(live.detach()) == float(saved))
    if same:
        return live
    warnings.warn(f"{what}: a tensor that requires grad was replaced by the saved value {saved!r}; later steps "
                  "no longer differentiate with respect to it (set it again, e.g. with apply_override)",
                  UserWarning, stacklevel=3)
    return saved
