"""The linear solvers of the implicit mode, now in :mod:`diffopt.implicit.linear_solve` (one set of
solvers for the engine and for :func:`diffopt.implicit.custom_root`); the names stay importable here."""
from ..implicit.linear_solve import (CG, GMRES, MINRES, SOLVERS, Dense, LinearSolver, Neumann, NormalCG, Operator,
                                     SolveInfo, Vector, conjugate_gradient, dense, gmres, minres, neumann,
                                     normal_conjugate_gradient, task_dot)

__all__ = ["CG", "GMRES", "MINRES", "SOLVERS", "Dense", "LinearSolver", "Neumann", "NormalCG", "Operator", "SolveInfo",
           "Vector", "conjugate_gradient", "dense", "gmres", "minres", "neumann", "normal_conjugate_gradient",
           "task_dot"]
