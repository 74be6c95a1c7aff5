"""The state an inner loop carries from step to step, and its flattening to tensors.

``Carry`` holds the fast weights (adapted ones with a leading task dimension,
shared ones as the model's tensors), the optimizer state of the adapted
weights, the per-task BatchNorm statistics and the step count. Checkpointed
and implicit modes pass it through ``torch.autograd.Function`` objects, which take
tensors only: :func:`flatten` splits it into tensors and a static skeleton.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

_TENSOR = object()


@dataclass
class Carry:
    params: list[Tensor]
    states: list[dict[str, Any] | None]
    buffers: list[Tensor] = field(default_factory=list)
    step: int = 0


def flatten(carry: Carry) -> tuple[list[Tensor], Any]:
    """``(tensors, skeleton)``; :func:`unflatten` inverts it."""
    tensors: list[Tensor] = list(carry.params)
    state_skeleton: list[Any] = []
    for state in carry.states:
        if state is None:
            state_skeleton.append(None)
            continue
        entry = {}
        for key in sorted(state):
            value = state[key]
            if isinstance(value, Tensor):
                tensors.append(value)
                entry[key] = _TENSOR
            else:
                entry[key] = value
        state_skeleton.append(entry)
    tensors.extend(carry.buffers)
    skeleton = (len(carry.params), state_skeleton, len(carry.buffers), carry.step)
    return tensors, skeleton


def unflatten(tensors: list[Tensor] | tuple[Tensor, ...], skeleton: Any) -> Carry:
    n_params, state_skeleton, n_buffers, step = skeleton
    it = iter(tensors)
    params = [next(it) for _ in range(n_params)]
    states: list[dict[str, Any] | None] = []
    for entry in state_skeleton:
        if entry is None:
            states.append(None)
            continue
        states.append({k: (next(it) if v is _TENSOR else v) for k, v in entry.items()})
    buffers = [next(it) for _ in range(n_buffers)]
    return Carry(params, states, buffers, step)


def detached(carry: Carry, requires_grad: bool = False) -> Carry:
    """A copy cut from the graph (optionally with fresh leaves that require grad)."""
    tensors, skeleton = flatten(carry)
    n_differentiable = len(tensors) - len(carry.buffers)  # statistics never require grad
    cut = [
        t.detach().requires_grad_(requires_grad and k < n_differentiable and t.is_floating_point())
        for k, t in enumerate(tensors)
    ]
    return unflatten(cut, skeleton)


class Adapted:
    """Adapted fast weights: ``params`` in ``model.parameters()`` order.

    Adapted parameters carry a leading task dimension; parameters the inner
    optimizer does not update are the model's own tensors (``adapted[j]`` False).
    ``info`` says how they were computed (mode, steps, vectorisation, solver, ...).
    """

    def __init__(self, params: list[Tensor], adapted: list[bool], buffers: list[Tensor], info: dict[str, Any]):
        self.params = params
        self.adapted = adapted
        self.buffers = buffers
        self.info = info

    def task(self, t: int) -> list[Tensor]:
        """Task ``t``'s weights (no task dimension)."""
        return [p[t] if a else p for p, a in zip(self.params, self.adapted)]


def unique(tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` without repeats (by identity), in first-seen order."""
    seen: dict[int, Tensor] = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return list(seen.values())
