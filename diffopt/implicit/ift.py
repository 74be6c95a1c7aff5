r"""The implicit-function-theorem step shared by :func:`~diffopt.implicit.custom_root` and the engine's
``implicit`` mode (:class:`diffopt.unroll.Implicit`).

At a root :math:`F(x^\star, \theta) = 0` with :math:`A = \partial F/\partial x` (plus ``damping`` on
its diagonal), the reverse-mode derivative of a loss :math:`L(x^\star)` is

.. math::
    A^\top w = \bar x, \qquad \bar\theta = -\Big(\frac{\partial F}{\partial\theta}\Big)^{\!\top} w .

The caller supplies :math:`u \mapsto A^\top u` and :math:`w \mapsto (\partial F/\partial\theta)^\top w`
as closures over whatever computes them (``torch.func.vjp`` of a user's ``F``; ``autograd.grad``
of an inner gradient for the engine, where :math:`F = \nabla_\phi G` and :math:`A` is the Hessian).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor

from .linear_solve import LinearSolver, Operator, SolveInfo, Vector


def damped(apply: Operator, damping: float) -> Operator:
    """``u ↦ apply(u) + damping·u`` (the identity's multiple added to the operator)."""
    if not math.isfinite(damping):
        raise ValueError(f"damping must be finite (a ridge added to A's diagonal), got {damping!r}: an infinite "
                         "damping makes every implicit gradient nan or 0")
    if not damping:
        return apply
    return lambda u: [a + damping * x for a, x in zip(apply(u), u)]


def implicit_vjp(apply_at: Operator, mixed_vjp: Callable[[Vector], Sequence[Tensor | None]], cotangent: Vector,
                 solver: LinearSolver, damping: float = 0.0, apply_a: Operator | None = None,
                 what: str = "") -> tuple[list[Tensor | None], SolveInfo]:
    """``θ̄ = −(∂F/∂θ)ᵀ w`` with ``(A + damping·I)ᵀ w = x̄``, and the solve's report.

    Vectors are the solvers' task-batched lists; ``apply_a`` (``u ↦ A u``) is needed by
    :class:`~diffopt.implicit.NormalCG` for a non-symmetric ``A``; ``mixed_vjp(w)`` returns
    ``(∂F/∂θ)ᵀ w`` per parameter (``None`` for one ``F`` does not depend on).
    """
    w, info = solver.solve(damped(apply_at, damping), cotangent,
                           None if apply_a is None else damped(apply_a, damping), what=what)
    return [None if g is None else -g for g in mixed_vjp(w)], info
