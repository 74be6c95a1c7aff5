r"""Implicit differentiation at the inner solution (iMAML, Rajeswaran et al. 2019).

With inner objective :math:`G(\phi, \lambda)` stationary at :math:`\phi^*`,
:math:`d\phi^*/d\lambda = -(\partial^2 G/\partial\phi^2)^{-1}\,\partial^2 G/\partial\phi\,\partial\lambda`,
so for an outer gradient :math:`v = \partial L/\partial\phi^*`:
:math:`\partial L/\partial\lambda = -(\partial^2 G/\partial\lambda\,\partial\phi)^\top w` with
:math:`(\partial^2 G/\partial\phi^2 + \text{damping}\cdot I)\,w = v`. For iMAML's proximal term
:math:`\tfrac{\lambda}{2}\|\phi-\theta\|^2` this is :math:`\partial L/\partial\theta = \lambda w = (I + H/\lambda)^{-1} v`.
Parameters the optimizer does not adapt act as hyperparameters of the inner problem.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ...errors import LinearSolveWarning
from ...implicit.ift import implicit_vjp
from ...implicit.linear_solve import SOLVERS, LinearSolver, SolveInfo, as_solver, solver_settings
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
    warns (or raises, by the solver's ``on_fail``) with its residual."""

    solver: LinearSolver | str = "cg"
    damping: float = 0.0
    name: ClassVar[str] = "implicit"
    legacy_options: ClassVar[dict[str, str]] = {
        "solver": "solver", "solver_iterations": "iterations", "solver_tol": "tol", "neumann_alpha": "alpha",
        "damping": "damping",
    }

    def __post_init__(self) -> None:
        self.solver = as_solver(self.solver, "solver")
        if not self.damping >= 0:
            raise ValueError(f"damping must be >= 0, got {self.damping!r}")

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
        final = loop.run(carry, loop.steps, x, y, "none")
        shared = [loop.theta[j] for j in range(len(loop.theta)) if not loop.adapted_mask[j]]
        meta = unique(loop.meta_tensors() + [t for t in shared if t.requires_grad])
        for j in range(len(loop.theta)):
            if not loop.adapted_mask[j]:
                final.params[j] = loop.theta[j]
        solution = _ImplicitSolution.apply(self, loop, final, info, x, y, *meta)
        params = list(final.params)
        for j, p in zip(loop.positions, solution):
            params[j] = p
        info["solver"] = self.solver.name  # type: ignore[union-attr]
        return Carry(params, final.states, final.buffers, final.step)


class _ImplicitSolution(torch.autograd.Function):
    """Forward: the inner solution φ*. Backward: the implicit-function-theorem VJP
    (:func:`diffopt.implicit.ift.implicit_vjp` with ``F = ∇_φ G``: Hessian-vector products)."""

    @staticmethod
    def forward(ctx: Any, mode: Implicit, loop: Any, final: Carry, info: dict[str, Any], x: Tensor, y: Tensor,
                *meta: Tensor) -> Any:
        ctx.mode, ctx.loop, ctx.final, ctx.info = mode, loop, final, info
        ctx.save_for_backward(x, y, *meta)
        return tuple(final.params[j].detach() for j in loop.positions)

    @staticmethod
    def backward(ctx: Any, *v: Tensor) -> Any:
        mode, loop, final = ctx.mode, ctx.loop, ctx.final
        x, y, *meta = ctx.saved_tensors
        v = [torch.zeros_like(final.params[j]) if g is None else g for g, j in zip(v, loop.positions)]
        with torch.enable_grad(), double_differentiable(attention=loop.attention):  # HVPs through attention
            params = list(final.params)
            phi = [params[j].detach().requires_grad_() for j in loop.positions]
            for j, p in zip(loop.positions, phi):
                params[j] = p
            carry = Carry(params, final.states, [b.clone() for b in final.buffers], final.step)
            losses, _ = loop.inner_objective(carry, x, y)
            grad = torch.autograd.grad(losses.sum(), phi, create_graph=True)

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
