r"""Implicit differentiation at the inner solution (iMAML, Rajeswaran et al. 2019).

With inner objective :math:`G(\phi, \lambda)` stationary at :math:`\phi^*`,
:math:`d\phi^*/d\lambda = -(\partial^2 G/\partial\phi^2)^{-1}\,\partial^2 G/\partial\phi\,\partial\lambda`,
so for an outer gradient :math:`v = \partial L/\partial\phi^*`:
:math:`\partial L/\partial\lambda = -(\partial^2 G/\partial\lambda\,\partial\phi)^\top w` with
:math:`(\partial^2 G/\partial\phi^2 + \text{damping}\cdot I)\,w = v`. For iMAML's proximal term
:math:`\tfrac{\lambda}{2}\|\phi-\theta\|^2` this is :math:`\partial L/\partial\theta = \lambda w = (I + H/\lambda)^{-1} v`.
Parameters the optimizer does not adapt act as hyperparameters of the inner problem.

The stationary point is the optimizer's: an optimizer with a coupled weight decay :math:`\omega`
(SGD, Adam, RMSprop, ... whose update adds :math:`\omega\phi` to the gradient) stops where
:math:`s\nabla\ell + \omega\phi = 0` (:math:`s = -1` when maximising), so
:math:`G = \ell + s\tfrac{\omega}{2}\|\phi\|^2`, and a learnable :math:`\omega` gets its hypergradient
through the same solve. A decoupled weight decay (AdamW; Adafactor's and Muon's) stops at a point
that is stationary for no objective, and is refused.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ...errors import LinearSolveWarning, OptimalityResidualWarning
from ...implicit.ift import implicit_vjp
from ...implicit.linear_solve import SOLVERS, LinearSolver, SolveInfo, as_solver, solver_settings, under_vmap
from ...optim import (AdadeltaRule, AdagradRule, AdamaxRule, AdamRule, ASGDRule, NAdamRule, RAdamRule,
                      RMSpropRule, SGDRule)
from ...optim.optimizer import DifferentiableOptimizer
from ..attention import double_differentiable
from ..carry import Carry, unique
from ._base import Mode

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import InnerLoop

WHAT = "InnerLoop(mode='implicit'): "  # what a solve's message starts with


@dataclass(eq=False)
class Implicit(Mode):
    """Solve the inner problem without a graph (``loop.steps`` steps), then attach the
    implicit hypergradient. ``solver``: one of the linear solvers of
    :mod:`diffopt.implicit.linear_solve` — :class:`~diffopt.implicit.CG`,
    :class:`~diffopt.implicit.NormalCG` (indefinite Hessians; torchopt's iMAML),
    :class:`~diffopt.implicit.MINRES` (symmetric, indefinite), :class:`~diffopt.implicit.GMRES`,
    :class:`~diffopt.implicit.Neumann`, :class:`~diffopt.implicit.Dense` — or its name, with default
    settings; ``damping`` is added to the Hessian's diagonal. A solve that stops above its ``tol``
    warns (or raises, by the solver's ``on_fail``) with its residual.

    The theorem holds at a stationary point of the inner objective. The backward measures each task's
    ``‖∇G‖`` at the returned weights against its value where the steps started (or the tasks' mean
    there, if larger: a task θ already nearly solves is not judged against its own tiny gradient), records the worst
    task's ratio in ``loop.last_info["stationarity"]``, and warns (once per loop) when it is above
    ``stationarity_tol``: the inner loop did not solve its problem (too few steps, or a rate that
    oscillates or diverges) and the implicit gradient may be far from the true one. iMAML's few inner
    steps are an approximation by design; the default 0.5 flags only a loop that barely moved towards
    stationarity, or moved away from it."""

    solver: LinearSolver | str = "cg"
    damping: float = 0.0
    stationarity_tol: float = 0.5
    name: ClassVar[str] = "implicit"
    legacy_options: ClassVar[dict[str, str]] = {
        "solver": "solver", "solver_iterations": "iterations", "solver_tol": "tol", "neumann_alpha": "alpha",
        "damping": "damping",
    }

    def __post_init__(self) -> None:
        self.solver = as_solver(self.solver, "solver")
        if not (self.damping >= 0 and math.isfinite(self.damping)):
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping!r}")
        if not self.stationarity_tol >= 0:
            raise ValueError(f"stationarity_tol must be >= 0 (inf: never warn), got {self.stationarity_tol!r}")

    @classmethod
    def from_legacy(cls, options: dict[str, Any]) -> Implicit:
        """``InnerLoop(mode="implicit", solver=..., solver_iterations=..., solver_tol=...,
        neumann_alpha=..., damping=...)`` as a mode object."""
        name = options.get("solver", "cg")
        if not isinstance(name, str) or name not in SOLVERS:
            return cls(solver=name, damping=options.get("damping", 0.0))  # validated in __post_init__
        accepted = solver_settings(SOLVERS[name])
        settings = {field: options[key] for key, field in cls.legacy_options.items()
                    if key in options and field in accepted}  # neumann_alpha is ignored for CG, as before
        return cls(solver=SOLVERS[name](**settings), damping=options.get("damping", 0.0))

    def adapt(self, loop: InnerLoop, carry: Carry, x: Tensor, y: Tensor, info: dict[str, Any]) -> Carry:
        coupled_weight_decays(loop)  # refuses a decoupled one before any step runs
        loop.check_declared_dependencies(carry, x, y)
        final = loop.run(carry, loop.steps, x, y, "none")
        shared = [loop.theta[j] for j in range(len(loop.theta)) if not loop.adapted_mask[j]]
        meta = unique(loop.meta_tensors() + [t for t in shared if t.requires_grad])
        for j in range(len(loop.theta)):
            if not loop.adapted_mask[j]:
                final.params[j] = loop.theta[j]
        solution = _ImplicitSolution.apply(self, loop, (carry, final), info, x, y, *meta)
        params = list(final.params)
        for j, p in zip(loop.positions, solution):
            params[j] = p
        info["solver"] = self.solver.name  # type: ignore[union-attr]
        return Carry(params, final.states, final.buffers, final.step)



#: The update rules whose ``weight_decay`` is added to the gradient (unless a group sets
#: ``decoupled_weight_decay``): their stationary point is that of ``ℓ + s ω/2 ‖φ‖²``.
COUPLED_WEIGHT_DECAY = (SGDRule, AdamRule, AdamaxRule, NAdamRule, RAdamRule, RMSpropRule, AdagradRule, AdadeltaRule,
                        ASGDRule)


def coupled_weight_decays(loop: InnerLoop) -> list[tuple[float | Tensor, float]]:
    """Per adapted tensor (``loop.positions``' order), the weight decay ``ω`` of the inner
    optimizer's last step and the sign ``s`` of its gradient (−1 when maximising); ``(0.0, 1.0)``
    where there is none. Raises for a decoupled weight decay, which no inner objective accounts for."""
    optimizer = loop.optimizer
    found: list[tuple[float | Tensor, float]] = [(0.0, 1.0)] * len(loop.positions)
    if not isinstance(optimizer, DifferentiableOptimizer):  # L-BFGS: no weight decay
        return found
    step = max(loop.steps - 1, 0)
    for k, group in enumerate(optimizer.param_groups):
        for position, i in enumerate(group["params"]):
            hp = optimizer._hp(group, position, step)
            decay = hp.get("weight_decay", 0.0)
            if not isinstance(decay, Tensor) and float(decay) == 0.0:
                continue
            if type(optimizer.rule) not in COUPLED_WEIGHT_DECAY or hp.get("decoupled_weight_decay", False):
                raise ValueError(
                    f"InnerLoop(mode='implicit'): the inner optimizer's group {k} has a decoupled weight decay "
                    f"(weight_decay={decay!r}, {type(optimizer).__name__}): its updates stop at a point that is "
                    "stationary for no inner objective, so the implicit gradient would be wrong. Use weight_decay=0 "
                    "(iMAML's proximal term regularises instead: proximal=λ), a coupled weight decay (e.g. "
                    "Adam(..., decoupled_weight_decay=False) or SGD), or mode='second_order'"
                )
            found[i] = (decay if isinstance(decay, Tensor) else float(decay), -1.0 if hp.get("maximize") else 1.0)
    return found

class _ImplicitSolution(torch.autograd.Function):
    """Forward: the inner solution φ*. Backward: the implicit-function-theorem VJP
    (:func:`diffopt.implicit.ift.implicit_vjp` with ``F = ∇_φ G``: Hessian-vector products)."""

    @staticmethod
    def forward(ctx: Any, mode: Implicit, loop: Any, carries: tuple[Carry, Carry], info: dict[str, Any], x: Tensor,
                y: Tensor, *meta: Tensor) -> Any:
        (ctx.initial, final), ctx.mode, ctx.loop, ctx.info = carries, mode, loop, info
        ctx.final = final
        ctx.save_for_backward(x, y, *meta)
        return tuple(final.params[j].detach() for j in loop.positions)

    @staticmethod
    def backward(ctx: Any, *v: Tensor) -> Any:
        mode, loop, final = ctx.mode, ctx.loop, ctx.final
        x, y, *meta = ctx.saved_tensors
        # A frozen tensor (requires_grad=False) the optimizer holds never moves: a constant of the inner
        # problem, outside the system solved (its rows would couple the others' solve to a gradient
        # that is never followed).
        moving = [k for k, j in enumerate(loop.positions) if loop.model_parameters[j].requires_grad]
        positions = [loop.positions[k] for k in moving]
        v = [torch.zeros_like(final.params[j]) if v[k] is None else v[k] for k, j in zip(moving, positions)]
        decays = [coupled_weight_decays(loop)[k] for k in moving]
        if not moving:  # nothing adapts: the solution is the (frozen) initialisation, which gets no gradient
            return (None,) * (6 + len(meta))
        with torch.enable_grad(), double_differentiable(attention=loop.attention):  # HVPs through attention
            phi, grad = _objective_gradient(loop, final, x, y, positions, decays, create_graph=True)
            _check_stationarity(mode, loop, ctx.initial, grad, x, y, ctx.info)

            def hessian_vector(u: list[Tensor]) -> list[Tensor]:
                hv = torch.autograd.grad(grad, phi, u, retain_graph=True, allow_unused=True)
                return [torch.zeros_like(ui) if h is None else h for h, ui in zip(hv, u)]

            data = [x, y]  # inputs may depend on meta-parameters (e.g. ANIL's features)
            wanted = [m for m in list(meta) + data if m.requires_grad]

            def mixed_vjp(w: list[Tensor]) -> Any:  # (∂²G/∂θ∂φ)ᵀ w
                return torch.autograd.grad(grad, wanted, w, allow_unused=True) if wanted else []

            negated, solve = implicit_vjp(hessian_vector, mixed_vjp, v, _quiet(mode.solver), mode.damping,
                                          what=WHAT)
            _warn_once(mode, solve)
            ctx.info["solve"] = solve
        it = iter(negated)
        grads = [next(it) if m.requires_grad else None for m in list(meta) + data]
        meta_grads, (x_grad, y_grad) = grads[: len(meta)], grads[len(meta):]
        return (None, None, None, None, x_grad, y_grad, *meta_grads)


def _objective_gradient(loop: Any, carry: Carry, x: Tensor, y: Tensor, positions: list[int],
                        decays: list[tuple[float | Tensor, float]], create_graph: bool) -> tuple[list[Tensor], Any]:
    """Fresh leaves φ at ``carry``'s adapted ``positions`` and ``∇_φ G`` of the inner objective there
    (the loss, iMAML's proximal term, and the optimizer's coupled weight decay ``s ω/2 ‖φ‖²``)."""
    params = list(carry.params)
    phi = [params[j].detach().requires_grad_() for j in positions]
    for j, p in zip(positions, phi):
        params[j] = p
    losses, _ = loop.inner_objective(Carry(params, carry.states, [b.clone() for b in carry.buffers], carry.step), x, y)
    objective = losses.sum()
    for p, (decay, sign) in zip(phi, decays):
        if not (isinstance(decay, float) and decay == 0.0):
            objective = objective + (0.5 * sign) * (decay * p * p).sum()
    return phi, torch.autograd.grad(objective, phi, create_graph=create_graph)


def inner_gradient_norms(loop: Any, carry: Carry, x: Tensor, y: Tensor) -> Tensor:
    """Per task, ``‖∇_φ G‖`` of the inner objective at ``carry``'s adapted weights (the frozen ones, which
    never move, left out), shape (T,): how far they are from the stationary point the implicit
    gradient assumes (also :func:`diffopt.testing.check_modes`' measure)."""
    moving = [k for k, j in enumerate(loop.positions) if loop.model_parameters[j].requires_grad]
    decays = coupled_weight_decays(loop)
    with torch.enable_grad():
        _, grad = _objective_gradient(loop, carry, x, y, [loop.positions[k] for k in moving],
                                      [decays[k] for k in moving], create_graph=False)
    return _task_norms(grad)


def _task_norms(tensors: Any) -> Tensor:
    """Per-task 2-norms of a list of task-batched tensors, shape (T,)."""
    return torch.stack([t.detach().flatten(1).square().sum(1) for t in tensors]).sum(0).sqrt()


def _check_stationarity(mode: Implicit, loop: Any, initial: Carry, grad: Any, x: Tensor, y: Tensor,
                        info: dict[str, Any]) -> None:
    """Each task's ``‖∇G‖`` at the solution over its value at the start (or over the tasks' mean start value,
    where that is larger: a task that θ already nearly solves is not judged against its own tiny gradient):
    the worst in ``info["stationarity"]``, and a warning (once per loop) above ``mode.stationarity_tol``. The
    start's gradient is computed with the random number generators forked: a model with dropout draws
    the same masks later as it would without this check."""
    if not grad or under_vmap(list(grad)):
        return
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        first = inner_gradient_norms(loop, initial, x.detach(), y.detach())
    final = _task_norms(grad)
    reference = torch.maximum(first, first.mean())
    ratio = torch.where(reference > 0, final / reference.clamp_min(torch.finfo(final.dtype).tiny),
                        torch.where(final > 0, torch.full_like(final, math.inf), torch.zeros_like(final)))
    task = int(ratio.argmax())
    report = {"relative_gradient_norm": float(ratio[task]), "task": task, "gradient_norm": float(final[task]),
              "initial_gradient_norm": float(reference[task])}
    info["stationarity"] = report
    if not report["relative_gradient_norm"] <= mode.stationarity_tol and not getattr(mode, "_warned_stationarity",
                                                                                       False):
        object.__setattr__(mode, "_warned_stationarity", True)
        warnings.warn(
            f"{WHAT}the inner loop did not reach a stationary point: on task {task} the inner objective's gradient "
            f"norm is {report['gradient_norm']:.3g} after {loop.steps} steps, {report['relative_gradient_norm']:.3g} "
            f"times the {report['initial_gradient_norm']:.3g} at the start (its own, or the tasks' mean if larger; "
            "stationarity_tol="
            f"{mode.stationarity_tol:g}), so the implicit meta-gradient, which assumes a solved inner problem, may be "
            "far from the true one. Raise steps, lower the inner learning rate if the loop oscillates or diverges, "
            "or use mode='second_order' (warned once per loop; every meta-step's figures are in "
            "loop.last_info['stationarity'])", OptimalityResidualWarning, stacklevel=2)


def _quiet(solver: LinearSolver) -> LinearSolver:
    """The solver as it runs in the backward pass: one that would warn checks quietly (:func:`_warn_once`
    warns instead); one that raises still raises."""
    return dataclasses.replace(solver, on_fail="ignore") if solver.on_fail == "warn" else solver  # type: ignore


def _warn_once(mode: Implicit, solve: SolveInfo) -> None:
    """Warn of a non-converged solve (``on_fail="warn"``) only the first time for this mode: a
    meta-training run with a deliberately truncated solver (iMAML's few CG steps) would otherwise
    warn at every meta-step; every solve's residual stays in ``loop.last_info["solve"]``."""
    solver = mode.solver
    if solver.on_fail != "warn" or solve.converged is not False or getattr(mode, "_warned_solve", False):
        return
    object.__setattr__(mode, "_warned_solve", True)
    message = (f"{solver.failure_message(solve, WHAT)} (warned once per loop; every solve's residual is in "
               "loop.last_info['solve'])")
    warnings.warn(message, LinearSolveWarning, stacklevel=2)
