"""Inner steps by an optimizer that needs the objective, not only a gradient: L-BFGS.

:class:`diffopt.optim.LBFGS` evaluates the inner objective at trial points (its first
iteration, every later iteration, the strong-Wolfe line search) and takes per-problem
decisions (which curvature pairs to keep, when to stop, the line search's brackets).
Tasks are independent problems, so each task runs its own L-BFGS on its own slice of the
fast weights and keeps its own history: one engine step is one ``LBFGS.step(closure)``
(up to ``max_iter`` iterations) per task, in a task loop. The steps are differentiable as
the mode asks: ``"full"`` unrolls through the recursion and step sizes (the decisions are
constants, see :mod:`diffopt.optim.lbfgs`), ``"first_order"`` takes gradients without a
graph through them, ``"none"`` keeps no graph (``implicit`` mode then differentiates the
solution by the implicit function theorem, exactly, whatever solver found it).
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..optim.lbfgs import LBFGS
from .carry import Carry

if TYPE_CHECKING:  # pragma: no cover
    from .engine import InnerLoop

#: the modes whose unroll is a sequence of engine steps a per-task L-BFGS can take
CLOSURE_MODES = ("second_order", "first_order", "truncated", "implicit")


def check_closure_optimizer(loop: InnerLoop, vectorize: bool | str) -> tuple[bool, str]:
    """Refuse what a per-task L-BFGS cannot do; the task loop, with its reason."""
    if loop.mode.name not in CLOSURE_MODES:
        raise ValueError(f"an L-BFGS inner optimizer runs in modes {', '.join(CLOSURE_MODES)}, not "
                         f"{loop.mode.name!r}: its history and line search are Python-level per-task state that "
                         "checkpointed, forward and zero-order modes cannot carry; use implicit mode for long "
                         "inner solves")
    if vectorize is True:
        raise ValueError("vectorize=True: an L-BFGS inner optimizer runs task by task (its line search and "
                         "curvature-pair decisions are per task); use vectorize=False or 'auto'")
    return False, "task loop: the L-BFGS inner optimizer takes per-task decisions"


def initial_states(tasks: int) -> list[Any]:
    """One fresh L-BFGS state per task (``None``: the first step starts the history)."""
    return [None] * tasks


def lbfgs_step(loop: InnerLoop, carry: Carry, x: Tensor, y: Tensor, graph: str,
               theta: list[Tensor] | None = None) -> Carry:
    """One ``LBFGS.step(closure)`` for every task; the closure is that task's inner objective."""
    template: LBFGS = loop.optimizer  # type: ignore[assignment]
    tasks = x.shape[0]
    per_task: list[list[Tensor]] = []
    states = []
    for t in range(tasks):
        start = [carry.params[j][t] for j in loop.positions]
        if graph == "none":
            start = [p.detach() for p in start]
        solver = copy.copy(template)
        solver.params = start
        solver.first_order = template.first_order or graph == "first_order"
        solver.state = {"func_evals": 0, "n_iter": 0} if carry.states[t] is None else dict(carry.states[t])

        def closure(params: list[Tensor], t: int = t) -> Tensor:
            fast = list(carry.params)
            for j, p in zip(loop.positions, params):
                fast[j] = p.unsqueeze(0)
            one = Carry(fast, [None], [b[t:t + 1] for b in carry.buffers], carry.step)
            losses, _ = loop.inner_objective(one, x[t:t + 1], y[t:t + 1], theta)
            loop._check_finite_losses(losses, carry.step)
            return losses[0]

        with torch.set_grad_enabled(graph != "none"):
            per_task.append(solver.step(closure))
        states.append(solver.state)
    params = list(carry.params)
    for k, j in enumerate(loop.positions):
        params[j] = torch.stack([task[k] for task in per_task])
    return Carry(params, states, carry.buffers, carry.step + 1)
