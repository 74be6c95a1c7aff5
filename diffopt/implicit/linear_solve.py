r"""Matrix-free linear solvers for implicit differentiation, batched over tasks.

Implicit differentiation needs one linear solve per gradient: :math:`A^\top w = v` (reverse mode)
or :math:`A\dot x = b` (forward mode), where :math:`A = \partial F/\partial x` is the Jacobian of
the optimality condition (the Hessian, when :math:`F` is a gradient). :math:`A` is never formed:
a solver only applies it to vectors (a Hessian- or Jacobian-vector product), except
:class:`Dense`, which materialises it column by column for small problems.

A *vector* is a list of tensors, each with a leading task dimension ``T``; every task's system
is solved independently (the Hessian of a sum of task losses with respect to task-batched
weights is block diagonal). :func:`diffopt.implicit.custom_root` uses ``T = 1``.

Each solver returns ``(w, SolveInfo)``: the iterations run and the worst task's relative residual
:math:`\|Aw-b\|/\|b\|`. A solver object (:class:`CG`, ...) also checks the result: a solve that
stops above ``tol`` warns (:class:`~diffopt.errors.LinearSolveWarning`) or raises
(:class:`~diffopt.errors.LinearSolveError`) by ``on_fail``, naming the residual and iterations.

Under ``torch.func.vmap`` (for example inside ``jacrev``) a tensor's values cannot steer Python
control flow: the iterative solvers then run all ``iterations`` (their updates are guarded so a
converged system stays put), and the residual is reported as ``nan`` with ``converged=None``
(unknown), not checked. Outside ``vmap`` a ``nan`` or infinite residual is a failure: the solve
diverged (a Neumann series with ``alpha`` above ``2/λ_max``, say), and ``on_fail`` applies.

References: Hestenes & Stiefel 1952 (CG); Saad & Schultz 1986 (GMRES); Paige & Saunders 1975
(MINRES); Lorraine et al. 2020 (Neumann series for hypergradients).
"""
from __future__ import annotations

import dataclasses

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import ClassVar, Union

import torch
from torch import Tensor
from torch._C import _functorch

from ..errors import LinearSolveError, LinearSolveWarning
from ..optim._gradients import inside_torch_func

Vector = list[Tensor]
Operator = Callable[[Vector], Vector]

ON_FAIL = ("warn", "raise", "ignore")


def task_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Per-task inner products, shape (T,)."""
    return sum((x * y).reshape(x.shape[0], -1).sum(1) for x, y in zip(a, b))  # type: ignore[return-value]


def _scale(alpha: Tensor, v: Tensor) -> Tensor:
    return alpha.view(-1, *([1] * (v.dim() - 1))) * v


def under_vmap(tensors: Sequence[Tensor]) -> bool:
    """Whether any tensor is batched by ``torch.func.vmap``, or by the legacy batching of torch's
    batched-gradient API (``autograd.grad(is_grads_batched=True)``, which ``autograd.functional.jacobian(
    vectorize=True)`` and ``gradcheck(check_batched_grad=True)`` use): then its values cannot be read."""
    for t in tensors:
        if _functorch.is_legacy_batchedtensor(t):
            return True
        while _functorch.is_functorch_wrapped_tensor(t):
            if _functorch.is_batchedtensor(t) or _functorch.is_legacy_batchedtensor(t):
                return True
            t = _functorch.get_unwrapped(t)
    return False


def _norm(v: Sequence[Tensor]) -> Tensor:
    """Per-task norms whose derivatives stay finite at 0 (the forward-mode tangent of ``sqrt(0)`` is not:
    after convergence, under ``vmap``, a residual can be exactly zero)."""
    squared = task_dot(v, v)
    return torch.where(squared > 0, squared.clamp_min(torch.finfo(squared.dtype).tiny).sqrt(),
                       torch.zeros_like(squared))


def _safe_divide(a: Tensor, b: Tensor, active: Tensor | None = None) -> Tensor:
    """``a / b`` where ``b != 0`` (and ``active``, the systems still iterating under ``vmap``), else 0: an
    exactly solved system stays put, and no branch divides by 0 (whose derivatives would be 0/0)."""
    nonzero = b != 0 if active is None else active & (b != 0)
    return torch.where(nonzero, a / torch.where(nonzero, b, torch.ones_like(b)), torch.zeros_like(a))


@dataclass
class SolveInfo:
    """What a linear solve did: ``relative_residual`` is the worst task's ``‖Aw − b‖ / ‖b‖``
    (``nan`` and ``converged=None`` under ``vmap``, where the values cannot be read; elsewhere a ``nan``
    or infinite residual means the solve diverged, and ``converged`` is ``False``).
    ``negative_curvature``: whether conjugate gradient met a direction with ``pᵀAp < 0``, proof that
    ``A`` is not positive definite and that CG's iterates mean nothing there (``None`` for the other
    solvers, and under ``vmap``)."""

    solver: str
    iterations: int
    relative_residual: float
    converged: bool | None
    negative_curvature: bool | None = None


def _relative_residual(apply_a: Operator, w: Vector, b: Vector, b_norm: Tensor) -> float | None:
    """The worst task's ``‖Aw − b‖/‖b‖``, or ``None`` under ``vmap`` (unknown: the values cannot be read)."""
    if under_vmap(list(w) + list(b)):
        return None
    aw = apply_a(w)
    r = [x - y for x, y in zip(b, aw)]
    return float((task_dot(r, r).sqrt() / b_norm).max().detach())


def _info(name: str, iterations: int, residual: float | None, tol: float,
          negative_curvature: bool | None = None) -> SolveInfo:
    """``converged=None`` only for an unknown residual (``None``: under ``vmap``); a ``nan`` residual (a
    diverged solve) is not ``<= tol``, so it reads ``converged=False``."""
    if residual is None:
        return SolveInfo(name, iterations, math.nan, None, negative_curvature)
    return SolveInfo(name, iterations, residual, residual <= tol, negative_curvature)


def _b_norm(b: Vector) -> Tensor:
    return task_dot(b, b).sqrt().clamp_min(torch.finfo(b[0].dtype).tiny)


def conjugate_gradient(apply_a: Operator, b: Vector, iterations: int, tol: float) -> tuple[Vector, SolveInfo]:
    """Solve ``A w = b`` per task by conjugate gradient (A symmetric positive definite).

    Stops when every task's relative residual is below ``tol`` or after
    ``iterations`` products with A.
    """
    w, done, b_norm, negative = _conjugate_gradient_iterations(apply_a, b, iterations, tol)
    return w, _info("cg", done, _relative_residual(apply_a, w, b, b_norm), tol,
                    None if under_vmap(b) else _true(negative.any()))


def _conjugate_gradient_iterations(apply_a: Operator, b: Vector, iterations: int,
                                   tol: float) -> tuple[Vector, int, Tensor, Tensor]:
    """:func:`conjugate_gradient`'s iterations: ``(w, iterations run, per-task ‖b‖, per-task flag of a
    direction with negative curvature pᵀAp)``, no final residual."""
    batched = under_vmap(b)
    w = [torch.zeros_like(x) for x in b]
    r = [x.clone() for x in b]
    p = [x.clone() for x in b]
    b_norm = _b_norm(b)
    rs = task_dot(r, r)
    negative = torch.zeros_like(rs, dtype=torch.bool)
    # Under vmap the loop cannot stop: a system stays put once converged (α = β = 0), and the
    # unused branches divide by 1, so differentiating the solve (jacrev of jacrev) cannot meet 0/0.
    # (comparisons only, no .detach(): torch's legacy batched tensors, under autograd.grad(is_grads_batched=True),
    # have no batching rule for it, and a comparison carries no derivative anyway)
    bar = (max(tol, torch.finfo(b[0].dtype).eps) * b_norm) ** 2 if batched else None
    done = 0
    for done in range(1, iterations + 1):
        ap = apply_a(p)
        curvature = task_dot(p, ap)
        negative = negative | (curvature < 0)  # read once at the end: no synchronisation here
        active = None if bar is None else rs > bar  # (no square root: its forward-mode tangent at 0 is not finite)
        alpha = _safe_divide(rs, curvature, active)
        w = [x + _scale(alpha, y) for x, y in zip(w, p)]
        r = [x - _scale(alpha, y) for x, y in zip(r, ap)]
        rs_new = task_dot(r, r)
        if not batched and _true((rs_new.sqrt() / b_norm <= tol).all()):
            rs = rs_new
            break
        if bar is None:
            beta = rs_new / torch.where(rs != 0, rs, torch.ones_like(rs))
        else:
            beta = _safe_divide(rs_new, rs, active)
        p = [x + _scale(beta, y) for x, y in zip(r, p)]
        rs = rs_new
    return w, done, b_norm, negative


def _conjugate_gradient_float_steps(apply_a: Operator, b: Vector, iterations: int,
                                    tol: float) -> tuple[Vector, SolveInfo]:
    """:func:`conjugate_gradient` for one system outside autograd: the same recurrence with the step
    sizes as Python floats (``x.add(p, alpha=α)``), about 8 tensor operations per iteration instead of
    30, which is most of the cost on small problems. Used only where nothing differentiates the solve
    (grad mode off, no ``torch.func`` transform): freezing ``α`` and ``β`` would be wrong there."""
    w = [torch.zeros_like(x) for x in b]
    r = [x.clone() for x in b]
    p = [x.clone() for x in b]
    rs = sum(float((x * x).sum()) for x in r)
    bar = tol * max(math.sqrt(rs), torch.finfo(b[0].dtype).tiny)
    done, negative = 0, False
    for done in range(1, iterations + 1):
        ap = apply_a(p)
        curvature = sum(float((x * y).sum()) for x, y in zip(p, ap))
        negative = negative or curvature < 0
        alpha = rs / curvature if curvature != 0 else 0.0
        w = [x.add(y, alpha=alpha) for x, y in zip(w, p)]
        r = [x.sub(y, alpha=alpha) for x, y in zip(r, ap)]
        rs_new = sum(float((x * x).sum()) for x in r)
        if math.sqrt(rs_new) <= bar:
            break
        beta = rs_new / rs if rs != 0 else 0.0
        p = [x.add(y, alpha=beta) for x, y in zip(r, p)]
        rs = rs_new
    return w, _info("cg", done, _relative_residual(apply_a, w, b, _b_norm(b)), tol, negative)


def _nothing_differentiates(b: Vector) -> bool:
    return (b[0].shape[0] == 1 and not torch.is_grad_enabled() and not inside_torch_func()
            and not any(x.requires_grad for x in b) and not under_vmap(b))


def normal_conjugate_gradient(
    apply_a: Operator, b: Vector, iterations: int, tol: float, apply_at: Operator | None = None,
) -> tuple[Vector, SolveInfo]:
    r"""Solve ``A w = b`` per task by CG on the normal equations ``AᵀA w = Aᵀb`` (CGNR; Hestenes &
    Stiefel 1952, §10).

    ``apply_at`` applies ``Aᵀ`` (default: ``apply_a``, for a symmetric ``A`` such as a Hessian). The
    recurrence carries the original system's residual :math:`r = b - Aw` (and :math:`z = A^\top r`,
    the normal equations' residual): with :math:`q = Ap`, :math:`\alpha = \|z\|^2/\|q\|^2`,
    :math:`w \mathrel{+}= \alpha p`, :math:`r \mathrel{-}= \alpha q`, :math:`z = A^\top r`,
    :math:`p = z + (\|z'\|^2/\|z\|^2)\, p`. It stops when every task's ``‖b − Aw‖/‖b‖`` is below
    ``tol``, the residual it reports and checks (a stop on the normal equations' ``‖Aᵀr‖ ≤ tol·‖Aᵀb‖``,
    torchopt's, could leave ``‖r‖/‖b‖`` up to ``cond(A)`` times above ``tol`` and then warn whatever the
    iteration budget), or after ``iterations`` iterations (two products with ``A`` or ``Aᵀ`` each).
    """
    apply_at = apply_at or apply_a
    batched = under_vmap(b)
    b_norm = _b_norm(b)
    w = [torch.zeros_like(x) for x in b]
    r = [x.clone() for x in b]
    z = apply_at(r)
    p = [x.clone() for x in z]
    zz = task_dot(z, z)
    rr = task_dot(r, r)
    # under vmap the loop cannot stop: guarded as conjugate_gradient's (comparisons only, see there)
    bar = (max(tol, torch.finfo(b[0].dtype).eps) * b_norm) ** 2 if batched else None
    done = 0
    for done in range(1, iterations + 1):
        q = apply_a(p)
        curvature = task_dot(q, q)  # pᵀAᵀA p
        active = None if bar is None else rr > bar
        alpha = _safe_divide(zz, curvature, active)
        w = [x + _scale(alpha, y) for x, y in zip(w, p)]
        r = [x - _scale(alpha, y) for x, y in zip(r, q)]
        rr = task_dot(r, r)
        if not batched and _true((rr.sqrt() / b_norm <= tol).all()):
            break
        z = apply_at(r)
        zz_new = task_dot(z, z)
        beta = _safe_divide(zz_new, zz, active)
        p = [x + _scale(beta, y) for x, y in zip(z, p)]
        zz = zz_new
    return w, _info("normal_cg", done, _relative_residual(apply_a, w, b, b_norm), tol)


def neumann(apply_a: Operator, b: Vector, iterations: int, alpha: float, tol: float) -> tuple[Vector, SolveInfo]:
    """``A^{-1} b ≈ α Σ_{k=0}^{n} (I − αA)^k b`` (converges when ``0 < α < 2/λ_max(A)``)."""
    term = [alpha * x for x in b]
    w = [x.clone() for x in term]
    for _ in range(iterations):
        a_term = apply_a(term)
        term = [x - alpha * y for x, y in zip(term, a_term)]
        w = [x + y for x, y in zip(w, term)]
    return w, _info("neumann", iterations, _relative_residual(apply_a, w, b, _b_norm(b)), tol)


def gmres(apply_a: Operator, b: Vector, iterations: int, tol: float, restart: int = 20) -> tuple[Vector, SolveInfo]:
    r"""Solve ``A w = b`` per task by restarted GMRES(m) (Saad & Schultz 1986), for any square ``A``.

    Each cycle builds an orthonormal Krylov basis :math:`V_k` of
    :math:`\{r, Ar, \dots, A^{k-1}r\}` by Arnoldi (modified Gram–Schmidt) and takes
    :math:`w \leftarrow w + V_k y` with :math:`y = \arg\min_y \|\beta e_1 - \bar H_k y\|`
    (the small least-squares problem solved per task). At most ``iterations`` products with
    ``A``; restarts every ``restart`` of them; stops when every task's (estimated) relative
    residual is below ``tol``.
    """
    batched = under_vmap(b)
    b_norm = _b_norm(b)
    w = [torch.zeros_like(x) for x in b]
    done = 0
    while done < iterations:
        aw = apply_a(w) if done else [torch.zeros_like(x) for x in b]
        r = [x - y for x, y in zip(b, aw)]
        beta = _norm(r)
        if not batched and _true((beta / b_norm <= tol).all()):
            break
        basis = [[_scale(_safe_divide(torch.ones_like(beta), beta), x) for x in r]]
        columns: list[Tensor] = []  # column j of H̄: (T, j + 2), zero-padded when solving
        y = torch.zeros_like(beta)[:, None]
        for _ in range(min(restart, iterations - done)):
            v = apply_a(basis[-1])
            done += 1
            h = []
            for q in basis:  # modified Gram–Schmidt
                coefficient = task_dot(v, q)
                v = [x - _scale(coefficient, y_) for x, y_ in zip(v, q)]
                h.append(coefficient)
            norm = _norm(v)
            h.append(norm)
            columns.append(torch.stack(h, 1))
            basis.append([_scale(_safe_divide(torch.ones_like(norm), norm), x) for x in v])
            k = len(columns)
            hessenberg = torch.stack([torch.cat([c, c.new_zeros(c.shape[0], k + 1 - c.shape[1])], 1)
                                      for c in columns], 2)  # (T, k + 1, k)
            rhs = torch.cat([beta[:, None], beta.new_zeros(beta.shape[0], k)], 1)
            y = torch.linalg.lstsq(hessenberg, rhs[..., None], driver="gelsd" if hessenberg.device.type == "cpu"
                                   else None).solution[..., 0]
            estimate = (rhs - (hessenberg @ y[..., None])[..., 0]).norm(dim=1)
            if not batched and _true((estimate / b_norm <= tol).all()):
                break
        for j in range(y.shape[1]):
            w = [x + _scale(y[:, j], q) for x, q in zip(w, basis[j])]
        if not batched and _true((estimate / b_norm <= tol).all()):
            break
    return w, _info("gmres", done, _relative_residual(apply_a, w, b, b_norm), tol)


def minres(apply_a: Operator, b: Vector, iterations: int, tol: float) -> tuple[Vector, SolveInfo]:
    r"""Solve ``A w = b`` per task by MINRES (Paige & Saunders 1975), for a symmetric ``A`` that
    may be indefinite (a Hessian away from a minimum): the Lanczos recurrence with Givens
    rotations minimises :math:`\|b - Aw\|` over the Krylov space, one product with ``A`` per
    iteration. Stops when every task's residual estimate is below ``tol·‖b‖``.
    """
    batched = under_vmap(b)
    b_norm = _b_norm(b)
    tiny = torch.finfo(b[0].dtype).tiny
    w = [torch.zeros_like(x) for x in b]
    r1 = [x.clone() for x in b]
    r2 = [x.clone() for x in b]
    beta = _norm(b)
    old_beta = torch.zeros_like(beta)
    dbar = torch.zeros_like(beta)
    epsilon = torch.zeros_like(beta)
    phibar = beta.clone()
    cs = -torch.ones_like(beta)
    sn = torch.zeros_like(beta)
    d = [torch.zeros_like(x) for x in b]   # the last two search directions
    d_old = [torch.zeros_like(x) for x in b]
    done = 0
    for done in range(1, iterations + 1):
        v = [_scale(_safe_divide(torch.ones_like(beta), beta), x) for x in r2]
        y = apply_a(v)
        if done >= 2:
            y = [x - _scale(_safe_divide(beta, old_beta), r) for x, r in zip(y, r1)]
        alpha = task_dot(v, y)
        y = [x - _scale(_safe_divide(alpha, beta), r) for x, r in zip(y, r2)]
        r1, r2 = r2, y
        old_beta, beta = beta, _norm(y)
        old_epsilon = epsilon
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        epsilon = sn * beta
        dbar = -cs * beta
        gamma = (gbar ** 2 + beta ** 2).clamp_min(tiny).sqrt()
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        d_old, d = d, [_scale(1 / gamma, x - _scale(old_epsilon, p) - _scale(delta, q))
                       for x, p, q in zip(v, d_old, d)]
        w = [x + _scale(phi, q) for x, q in zip(w, d)]
        if not batched and _true((phibar.abs() / b_norm <= tol).all()):
            break
    return w, _info("minres", done, _relative_residual(apply_a, w, b, b_norm), tol)


def dense(apply_a: Operator, b: Vector, lstsq: bool = False, tol: float = 1e-10) -> tuple[Vector, SolveInfo]:
    """Solve ``A w = b`` per task exactly: ``A`` materialised by ``n`` products with the unit
    vectors (``n`` = unknowns per task; for small problems), then ``torch.linalg.solve`` — or
    ``torch.linalg.lstsq`` (``lstsq=True``: the minimum-norm least-squares solution, for a
    singular ``A``)."""
    tasks = b[0].shape[0]
    sizes = [x[0].numel() for x in b]
    n = sum(sizes)
    columns = []
    for k in range(n):
        unit = b[0].new_zeros(tasks, n)
        unit[:, k] = 1
        pieces = [piece.reshape(x.shape) for piece, x in zip(unit.split(sizes, 1), b)]
        columns.append(torch.cat([a.reshape(tasks, -1) for a in apply_a(pieces)], 1))
    matrix = torch.stack(columns, 2)  # (T, n, n)
    rhs = torch.cat([x.reshape(tasks, -1) for x in b], 1)[..., None]
    if lstsq:
        solution = torch.linalg.lstsq(matrix, rhs, driver="gelsd" if matrix.device.type == "cpu" else None).solution
    else:
        try:
            solution = torch.linalg.solve(matrix, rhs)
        except RuntimeError as error:  # torch.linalg.LinAlgError subclasses RuntimeError
            raise LinearSolveError(f"dense solve: the {n}x{n} matrix A is singular ({error}); use "
                                   "Dense(lstsq=True) for the least-squares solution, or add damping") from error
    w = [piece.reshape(x.shape) for piece, x in zip(solution[..., 0].split(sizes, 1), b)]
    return w, _info("dense", n, _relative_residual(apply_a, w, b, _b_norm(b)), tol)


# -- solver objects: settings, validation, and the convergence check ---------------------------------

class _Solver:
    """Shared behaviour of the solver objects: validation and the ``on_fail`` check.

    Each solver is a frozen dataclass that declares its own fields, ``tol`` and ``on_fail``
    included: their order is the class's positional signature (``CG(50, 1e-8)``,
    ``Neumann(50, 0.1)``), which a base dataclass's fields would put first."""

    name: ClassVar[str]
    tol: float
    on_fail: str

    def __post_init__(self) -> None:
        """Called by the dataclass's ``__init__``; a solver with more settings extends it."""
        self._validate()

    def _validate(self) -> None:
        iterations = getattr(self, "iterations", 1)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"{self.name}: iterations (InnerLoop's solver_iterations=) must be a positive integer, "
                             f"got {iterations!r}")
        if not self.tol >= 0:
            raise ValueError(f"{self.name}: tol must be >= 0, got {self.tol!r}")
        if self.on_fail not in ON_FAIL:
            raise ValueError(f"{self.name}: on_fail must be 'warn', 'raise' or 'ignore', got {self.on_fail!r}")

    def check(self, info: SolveInfo, dtype: torch.dtype, what: str = "") -> SolveInfo:
        """Warn or raise (by ``on_fail``) when the solve stopped above its tolerance.

        The bar is ``tol``, or the dtype's rounding floor ``1000·eps`` where that is higher (a
        float32 solve cannot reach ``tol=1e-10``; that is not worth a warning at every step). The
        returned ``converged`` says whether the solve cleared that same bar.
        """
        if info.converged is None:
            return info
        bar = max(self.tol, 1000 * torch.finfo(dtype).eps)
        info = dataclasses.replace(info, converged=info.relative_residual <= bar)  # the bar the check uses
        if self.on_fail == "ignore":
            return info
        if not info.converged:
            message = self.failure_message(info, what)
            if self.on_fail == "raise":
                raise LinearSolveError(message)
            warnings.warn(message, LinearSolveWarning, stacklevel=4)
        return info

    def failure_message(self, info: SolveInfo, what: str = "") -> str:
        """What :meth:`check` says of a solve that stopped above its tolerance (``what`` first)."""
        if not math.isfinite(info.relative_residual):
            return (f"{what}{self.name} linear solve diverged: relative residual ‖Aw − b‖/‖b‖ = "
                    f"{info.relative_residual} after {info.iterations} iterations, so the implicit gradient is not "
                    "finite. " + self.divergence_hint())
        start = (f"{what}{self.name} linear solve did not converge: relative residual ‖Aw − b‖/‖b‖ = "
                 f"{info.relative_residual:.3g} after {info.iterations} iterations (tol={self.tol:g}). ")
        if info.negative_curvature:
            return start + (
                "It met a direction of negative curvature (pᵀAp < 0): A is not positive definite, which CG needs "
                "(a Hessian away from a minimum: few inner steps, a non-convex loss, a small proximal λ or "
                "damping), so its iterates are unreliable and more iterations may not converge. Use "
                "solver='minres' (symmetric A, indefinite allowed; its residual only falls), add damping or a "
                "larger proximal λ above the most negative eigenvalue, or solve the inner problem closer to its "
                "minimum")
        return start + ("The implicit gradient is off by about as much: raise iterations, add damping, or choose "
                        "another solver (cg needs a positive definite A; minres a symmetric one; gmres, "
                        "normal_cg and dense take any)")

    def divergence_hint(self) -> str:
        """How to fix a solve whose result is not finite (:meth:`failure_message`)."""
        return ("A or b holds a non-finite value, or the iterations overflowed: check the optimality condition "
                "at the solution, add damping, or choose another solver (minres for a symmetric A, gmres or dense "
                "for any)")

    def __call__(self, apply_a: Operator, b: Vector, apply_at: Operator | None = None) -> tuple[Vector, SolveInfo]:
        raise NotImplementedError  # pragma: no cover

    def solve(self, apply_a: Operator, b: Vector, apply_at: Operator | None = None,
              what: str = "") -> tuple[Vector, SolveInfo]:
        """``(w, info)`` with ``A w ≈ b`` per task; ``apply_at`` applies ``Aᵀ`` (used by
        :class:`NormalCG` only). ``what`` prefixes the non-convergence message."""
        w, info = self(apply_a, b, apply_at)
        return w, self.check(info, b[0].dtype, what)


@dataclass(frozen=True)
class CG(_Solver):
    """Conjugate gradient (for a symmetric positive definite ``A``): at most ``iterations``
    products with ``A``, stopping when every task's relative residual is below ``tol``."""

    iterations: int = 100
    tol: float = 1e-10
    on_fail: str = "warn"
    name: ClassVar[str] = "cg"

    def __call__(self, apply_a: Operator, b: Vector, apply_at: Operator | None = None) -> tuple[Vector, SolveInfo]:
        if _nothing_differentiates(b):
            return _conjugate_gradient_float_steps(apply_a, b, self.iterations, self.tol)
        return conjugate_gradient(apply_a, b, self.iterations, self.tol)


@dataclass(frozen=True)
class Neumann(_Solver):
    """Truncated Neumann series ``A⁻¹b ≈ α Σₖ (I − αA)ᵏ b`` (Lorraine et al., 2020):
    converges when ``0 < alpha < 2/λ_max(A)``; ``tol`` only decides ``converged``."""

    iterations: int = 100
    alpha: float = 0.1
    tol: float = 1e-10
    on_fail: str = "warn"
    name: ClassVar[str] = "neumann"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.alpha < math.inf:
            raise ValueError(f"Neumann(alpha=...) must be positive and finite (below 2/λ_max(A)), got {self.alpha!r}")

    def divergence_hint(self) -> str:
        return (f"The Neumann series converges only for 0 < alpha < 2/λ_max(A), and alpha={self.alpha:g} is likely "
                f"above that for this A (λ_max(A) > {2 / self.alpha:g}): lower alpha below 2/λ_max(A), or choose "
                "another solver (cg for a positive definite A, minres for a symmetric one, gmres or dense for any)")

    def __call__(self, apply_a: Operator, b: Vector, apply_at: Operator | None = None) -> tuple[Vector, SolveInfo]:
        return neumann(apply_a, b, self.iterations, self.alpha, self.tol)


@dataclass(frozen=True)
class NormalCG(_Solver):
    """Conjugate gradient on the normal equations ``AᵀA w = Aᵀb`` (CGNR), as torchopt's
    ``solve_normal_cg`` and its iMAML example: at most ``iterations`` CG iterations (each two
    products with ``A`` or ``Aᵀ``), stopping when every task's relative residual ``‖b − Aw‖/‖b‖``
    is below ``tol``, the residual it reports and checks (:func:`normal_conjugate_gradient`; torchopt
    stops on the normal equations' ``‖Aᵀ(b − Aw)‖ ≤ tol·‖Aᵀb‖`` instead, so with ``tol > 0`` the two
    may stop at different iterations; with ``tol=0`` both run every iteration).

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
    on_fail: str = "warn"
    name: ClassVar[str] = "normal_cg"

    def __call__(self, apply_a: Operator, b: Vector, apply_at: Operator | None = None) -> tuple[Vector, SolveInfo]:
        return normal_conjugate_gradient(apply_a, b, self.iterations, self.tol, apply_at)


@dataclass(frozen=True)
class GMRES(_Solver):
    """Restarted GMRES(``restart``) for any square ``A`` (:func:`gmres`): at most ``iterations``
    products with ``A``. The default for :func:`~diffopt.implicit.custom_fixed_point`, whose
    ``I − ∂T/∂x`` is not symmetric in general."""

    iterations: int = 100
    tol: float = 1e-10
    restart: int = 20
    on_fail: str = "warn"
    name: ClassVar[str] = "gmres"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.restart, bool) or not isinstance(self.restart, int) or self.restart < 1:
            raise ValueError(f"GMRES(restart=...) must be a positive integer, got {self.restart!r}")

    def __call__(self, apply_a: Operator, b: Vector, apply_at: Operator | None = None) -> tuple[Vector, SolveInfo]:
        return gmres(apply_a, b, self.iterations, self.tol, self.restart)


@dataclass(frozen=True)
class MINRES(_Solver):
    """MINRES for a symmetric, possibly indefinite ``A`` (:func:`minres`): one product with
    ``A`` per iteration, where :class:`NormalCG` needs two and squares the condition number."""

    iterations: int = 100
    tol: float = 1e-10
    on_fail: str = "warn"
    name: ClassVar[str] = "minres"

    def __call__(self, apply_a: Operator, b: Vector, apply_at: Operator | None = None) -> tuple[Vector, SolveInfo]:
        return minres(apply_a, b, self.iterations, self.tol)


@dataclass(frozen=True)
class Dense(_Solver):
    """Materialise ``A`` (``n`` products for ``n`` unknowns) and solve exactly
    (:func:`dense`): for small problems, and as a reference. ``lstsq=True`` for a singular ``A``."""

    lstsq: bool = False
    tol: float = 1e-10
    on_fail: str = "warn"
    name: ClassVar[str] = "dense"

    def __call__(self, apply_a: Operator, b: Vector, apply_at: Operator | None = None) -> tuple[Vector, SolveInfo]:
        return dense(apply_a, b, self.lstsq, self.tol)


LinearSolver = Union[CG, NormalCG, Neumann, GMRES, MINRES, Dense]
SOLVERS: dict[str, type] = {"cg": CG, "normal_cg": NormalCG, "neumann": Neumann, "gmres": GMRES, "minres": MINRES,
                            "dense": Dense}


def as_solver(solve: LinearSolver | str, argument: str = "solve") -> LinearSolver:
    """A solver object from a name (default settings) or an object, with did-you-mean on a typo."""
    if isinstance(solve, str):
        if solve not in SOLVERS:
            import difflib
            close = difflib.get_close_matches(solve, SOLVERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            names = ", ".join(map(repr, SOLVERS))
            raise ValueError(f"{argument}={solve!r}: choose one of {names}{hint}, or a solver object such as "
                             "CG(iterations=..., tol=...)")
        return SOLVERS[solve]()
    if not isinstance(solve, tuple(SOLVERS.values())):
        raise TypeError(f"{argument} must be a solver name ({', '.join(map(repr, SOLVERS))}) or one of "
                        f"{' / '.join(cls.__name__ for cls in SOLVERS.values())}, got {solve!r}")
    return solve


def solver_settings(cls: type) -> tuple[str, ...]:
    """The settings a solver class takes (for legacy keyword options)."""
    return tuple(f.name for f in fields(cls))


def _true(condition: Tensor) -> bool:
    return bool(condition.detach())
