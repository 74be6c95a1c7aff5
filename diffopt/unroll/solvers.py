"""Matrix-free linear solvers for implicit hypergradients, batched over tasks.

Vectors are lists of tensors with a leading task dimension; every task's
system is solved independently (the Hessian of a sum of task losses with
respect to task-batched weights is block diagonal).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Union

import torch
from torch import Tensor

Vector = list[Tensor]
Operator = Callable[[Vector], Vector]


def task_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Per-task inner products, shape (T,)."""
    return sum((x * y).flatten(1).sum(1) for x, y in zip(a, b))  # type: ignore[return-value]


def _scale(alpha: Tensor, v: Tensor) -> Tensor:
    return alpha.view(-1, *([1] * (v.dim() - 1))) * v


@dataclass
class SolveInfo:
    solver: str
    iterations: int
    relative_residual: float  # worst task: ||A w - b|| / ||b||
    converged: bool


def conjugate_gradient(apply_a: Operator, b: Vector, iterations: int, tol: float) -> tuple[Vector, SolveInfo]:
    """Solve ``A w = b`` per task by conjugate gradient (A symmetric positive definite).

    Stops when every task's relative residual is below ``tol`` or after
    ``iterations`` products with A.
    """
    w = [torch.zeros_like(x) for x in b]
    r = [x.clone() for x in b]
    p = [x.clone() for x in b]
    b_norm = task_dot(b, b).sqrt().clamp_min(torch.finfo(b[0].dtype).tiny)
    rs = task_dot(r, r)
    done = 0
    for done in range(1, iterations + 1):
        ap = apply_a(p)
        curvature = task_dot(p, ap)
        alpha = torch.where(curvature != 0, rs / torch.where(curvature != 0, curvature, torch.ones_like(curvature)), torch.zeros_like(rs))
        w = [x + _scale(alpha, y) for x, y in zip(w, p)]
        r = [x - _scale(alpha, y) for x, y in zip(r, ap)]
        rs_new = task_dot(r, r)
        if bool((rs_new.sqrt() / b_norm <= tol).all()):
            rs = rs_new
            break
        beta = rs_new / torch.where(rs != 0, rs, torch.ones_like(rs))
        p = [x + _scale(beta, y) for x, y in zip(r, p)]
        rs = rs_new
    residual = _relative_residual(apply_a, w, b, b_norm)
    return w, SolveInfo("cg", done, residual, residual <= tol)


def normal_conjugate_gradient(
    apply_a: Operator, b: Vector, iterations: int, tol: float, apply_at: Operator | None = None,
) -> tuple[Vector, SolveInfo]:
    """Solve ``A w = b`` per task by CG on the normal equations ``AᵀA w = Aᵀb``.

    ``apply_at`` applies ``Aᵀ`` (default: ``apply_a``, for a symmetric ``A`` such as a
    Hessian). Stops when every task's normal-equation residual ``‖Aᵀ(b − A w)‖`` is below
    ``tol·‖Aᵀb‖`` or after ``iterations`` CG iterations (two products with ``A`` each); the
    reported residual is the original system's, ``‖A w − b‖ / ‖b‖``.
    """
    apply_at = apply_at or apply_a
    w, info = conjugate_gradient(lambda u: apply_at(apply_a(u)), apply_at(b), iterations, tol)
    b_norm = task_dot(b, b).sqrt().clamp_min(torch.finfo(b[0].dtype).tiny)
    residual = _relative_residual(apply_a, w, b, b_norm)
    return w, SolveInfo("normal_cg", info.iterations, residual, residual <= tol)


def neumann(apply_a: Operator, b: Vector, iterations: int, alpha: float, tol: float) -> tuple[Vector, SolveInfo]:
    """``A^{-1} b ≈ α Σ_{k=0}^{n} (I − αA)^k b`` (converges when ``0 < α < 2/λ_max(A)``)."""
    term = [alpha * x for x in b]
    w = [x.clone() for x in term]
    for _ in range(iterations):
        a_term = apply_a(term)
        term = [x - alpha * y for x, y in zip(term, a_term)]
        w = [x + y for x, y in zip(w, term)]
    b_norm = task_dot(b, b).sqrt().clamp_min(torch.finfo(b[0].dtype).tiny)
    residual = _relative_residual(apply_a, w, b, b_norm)
    return w, SolveInfo("neumann", iterations, residual, residual <= tol)


def _relative_residual(apply_a: Operator, w: Vector, b: Vector, b_norm: Tensor) -> float:
    aw = apply_a(w)
    r = [x - y for x, y in zip(b, aw)]
    return float((task_dot(r, r).sqrt() / b_norm).max())


@dataclass(frozen=True)
class CG:
    """Conjugate gradient (for a symmetric positive definite ``A``): at most ``iterations``
    products with ``A``, stopping when every task's relative residual is below ``tol``."""

    iterations: int = 100
    tol: float = 1e-10
    name: ClassVar[str] = "cg"

    def __post_init__(self) -> None:
        _check_iterations(self.iterations, self.tol, self.name)

    def solve(self, apply_a: Operator, b: Vector) -> tuple[Vector, SolveInfo]:
        return conjugate_gradient(apply_a, b, self.iterations, self.tol)


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series ``A⁻¹b ≈ α Σₖ (I − αA)ᵏ b`` (Lorraine et al., 2020):
    converges when ``0 < alpha < 2/λ_max(A)``; ``tol`` only decides ``converged``."""

    iterations: int = 100
    alpha: float = 0.1
    tol: float = 1e-10
    name: ClassVar[str] = "neumann"

    def __post_init__(self) -> None:
        _check_iterations(self.iterations, self.tol, self.name)
        if not self.alpha > 0:
            raise ValueError(f"Neumann(alpha=...) must be positive (below 2/λ_max), got {self.alpha!r}")

    def solve(self, apply_a: Operator, b: Vector) -> tuple[Vector, SolveInfo]:
        return neumann(apply_a, b, self.iterations, self.alpha, self.tol)


@dataclass(frozen=True)
class NormalCG:
    """Conjugate gradient on the normal equations ``AᵀA w = Aᵀb`` (CGNR), as torchopt's
    ``solve_normal_cg`` and its iMAML example: at most ``iterations`` CG iterations (each two
    products with ``A``), stopping when every task's normal-equation residual is below
    ``tol·‖Aᵀb‖``.

    When to use it: when ``A`` is not symmetric positive definite. The implicit systems
    here are symmetric (a Hessian plus damping), but away from a minimum — few inner
    steps, a non-convex loss, a small proximal λ — the Hessian is indefinite, and plain
    CG may divide by a vanishing or negative curvature ``pᵀAp`` and diverge. ``AᵀA`` is
    positive semi-definite, so CGNR always makes progress, at the price of the squared
    condition number (slower convergence) and two products per iteration. Also use it
    to reproduce torchopt's iMAML gradients. For a positive definite ``A`` prefer
    :class:`CG`. ``solve(apply_a, b, apply_at)`` takes ``Aᵀ`` for a non-symmetric ``A``
    (default: ``A`` itself)."""

    iterations: int = 100
    tol: float = 1e-10
    name: ClassVar[str] = "normal_cg"

    def __post_init__(self) -> None:
        _check_iterations(self.iterations, self.tol, self.name)

    def solve(self, apply_a: Operator, b: Vector, apply_at: Operator | None = None) -> tuple[Vector, SolveInfo]:
        return normal_conjugate_gradient(apply_a, b, self.iterations, self.tol, apply_at)


LinearSolver = Union[CG, NormalCG, Neumann]
SOLVERS: dict[str, type] = {"cg": CG, "normal_cg": NormalCG, "neumann": Neumann}


def _check_iterations(iterations: int, tol: float, name: str) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"{name}: iterations (InnerLoop's solver_iterations=) must be a positive integer, "
                         f"got {iterations!r}")
    if not tol >= 0:
        raise ValueError(f"{name}: tol must be >= 0, got {tol!r}")
