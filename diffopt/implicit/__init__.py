r"""Implicit differentiation of any solver (jaxopt's ``custom_root`` / ``custom_fixed_point``, for PyTorch).

Write a solver ``solver(init, *theta) -> x*`` any way you like and an optimality condition
``F(x, *theta) = 0``; :func:`custom_root` makes ``x*`` differentiable in ``theta`` by the implicit
function theorem, :math:`dx^\star/d\theta = -(\partial F/\partial x)^{-1}\,\partial F/\partial\theta`,
with a matrix-free linear solve from :mod:`diffopt.implicit.linear_solve` (CG, MINRES, GMRES,
normal-equation CG, Neumann, dense). It composes with ``torch.func`` (``vmap``, ``grad``, ``jacrev``,
``jvp``). The engine's ``implicit`` meta-gradient mode (:class:`diffopt.unroll.Implicit`) uses the
same linear solvers.
"""
from .linear_solve import (CG, GMRES, MINRES, SOLVERS, Dense, LinearSolver, Neumann, NormalCG, SolveInfo, as_solver,
                           conjugate_gradient, dense, gmres, minres, neumann, normal_conjugate_gradient)
from .root import custom_fixed_point, custom_root

__all__ = [
    "CG", "GMRES", "MINRES", "SOLVERS", "Dense", "LinearSolver", "Neumann", "NormalCG", "SolveInfo", "as_solver",
    "conjugate_gradient", "custom_fixed_point", "custom_root", "dense", "gmres", "minres", "neumann",
    "normal_conjugate_gradient",
]
