"""(7) Inner-loss curvature and stability.

``λ_max``, the largest eigenvalue of the support-loss Hessian at θ, by the Lanczos method on
Hessian-vector products with a residual convergence test (:func:`top_eigenvalue`; an unconverged
value is flagged in the estimator and raises :class:`CurvatureConvergenceWarning`), ``tr H`` by
Hutchinson's estimator with Rademacher probes (explicit generator), and the stability ratio
``ρ = lr·λ_max``: plain gradient descent on a quadratic converges for ``0 < ρ < 2`` and diverges
for ``ρ > 2``. Sharpness is descriptive, not predictive.

Needs second derivatives: a model whose loss cannot be differentiated twice
raises :class:`SecondOrderUnavailable` naming the fix.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._cost import Cost, documented_cost
from ._functional import (
    LossFn,
    ParamsLike,
    as_weights,
    autograd_grad,
    call_model,
    check_twice_differentiable,
    device_of,
    explained_errors,
    to_vector,
    hessian_vector,
    differentiable_copies,
    mean_loss,
    resolve_generator,
    split_tasks,
    from_vector,
)
from .settings import DiagnosticSettings, diagnostic
from ._result import Diagnostic, DiagnosticGroup, loss_units

__all__ = ["curvature", "hessian_vector_product", "HVPOperator", "top_eigenvalue", "TopEigenvalue",
           "CurvatureConvergenceWarning"]


class HVPOperator:
    """``v ↦ H v`` for the Hessian of the mean loss at fixed weights, on flat vectors.

    Built with one forward and one backward (``create_graph=True``); each call is one HVP.
    """

    def __init__(self, model: nn.Module, params: Dict[str, Tensor], x: Tensor, y: Tensor, lik: Any,
                 loss_fn: Optional[LossFn], bn_mode: str = "eval", what: str = "curvature") -> None:
        self.params = differentiable_copies(params)
        self.what = what
        loss = mean_loss(lik, loss_fn)
        with torch.enable_grad(), explained_errors(model, params, x, y, lik, bn_mode):
            out = call_model(model, self.params, x, bn_mode)
            if lik is not None:
                lik.check(out, y)
            self.loss = loss(out, y)
            self.grads = autograd_grad(self.loss, list(self.params.values()), create_graph=True)
        check_twice_differentiable(self.grads, what)
        self.size = sum(p.numel() for p in self.params.values())
        self.dtype = next(iter(self.params.values())).dtype
        self.device = device_of(self.params)

    def __call__(self, v: Tensor) -> Tensor:
        vs = list(from_vector(v, self.params).values())
        with torch.enable_grad():
            hv = hessian_vector(self.grads, list(self.params.values()), vs, what=self.what)
        return torch.cat([h.detach().reshape(-1) for h in hv])


@documented_cost(default=Cost(forward="1", backward="1", hvp="1"))
@diagnostic("likelihood", "sigma", "num_classes", "bn_mode")
def hessian_vector_product(
    model: nn.Module,
    params: ParamsLike,
    x: Tensor,
    y: Tensor,
    v: Any,
    *,
    loss_fn: Optional[LossFn] = None,
    settings: DiagnosticSettings,
) -> Dict[str, Tensor]:
    """``H v`` for the Hessian of the mean loss (``loss_fn`` or mean NLL) at ``params`` (one task).

    ``v``: a dict like ``params`` or a flat vector. Returns a dict ``name -> tensor``.
    """
    lik = None if loss_fn is not None else settings.resolve_likelihood("hessian_vector_product")
    p = as_weights(model, params)
    op = HVPOperator(model, p, x, y, lik, loss_fn, settings.bn_mode, what="hessian_vector_product")
    flat = v if isinstance(v, Tensor) else to_vector({k: v[k] for k in p})
    return from_vector(op(flat.to(op.dtype)), p)


class CurvatureConvergenceWarning(RuntimeWarning):
    """λ_max (Lanczos) stopped at its iteration limit above its tolerance: the value is a lower bound
    on the largest eigenvalue, of unknown accuracy. Raise the iteration argument named in the message."""


@dataclass(frozen=True)
class TopEigenvalue:
    """The largest eigenvalue of a symmetric operator as :func:`top_eigenvalue` found it.

    Attributes:
        value: the largest Ritz value θ (a lower bound on λ_max; |θ − λ| ≤ ``residual`` for some eigenvalue λ).
        iterations: operator applications (Hessian-vector products) used.
        converged: ``residual ≤ tol·scale``, or the Krylov space became invariant (the value is then exact to
            rounding).
        residual: ‖A y − θ y‖ for the Ritz vector y (the Lanczos estimate β_k |s_k|).
        scale: max |θ_i| over the Ritz values, a lower bound on ‖A‖₂ (the tolerance is relative to it).
    """

    value: float
    iterations: int
    converged: bool
    residual: float
    scale: float


#: Largest Lanczos basis kept for full reorthogonalisation, in bytes; a bigger one (a large model, many
#: iterations) runs the three-term recurrence alone, whose memory is three vectors.
LANCZOS_BASIS_BYTES = 256 * 2**20


def top_eigenvalue(op: Any, iters: int, tol: float, generator: torch.Generator) -> TopEigenvalue:
    """λ_max, the largest (algebraic) eigenvalue of the symmetric operator ``op`` (flat vector -> flat vector, with
    ``size``, ``dtype``, ``device``), by the Lanczos method.

    After k steps from a Gaussian start vector q₁, ``A Q_k = Q_k T_k + β_k q_{k+1} e_kᵀ`` with ``T_k`` tridiagonal
    (α on the diagonal, β beside it). The largest eigenvalue θ of ``T_k``, with eigenvector s, is the Ritz value; its
    Ritz vector ``y = Q_k s`` has the residual ``‖A y − θ y‖ = β_k |s_k|`` (Golub & Van Loan, *Matrix
    Computations*, §10.1), and for a symmetric A some eigenvalue lies within that residual of θ. The iteration
    stops once ``β_k |s_k| ≤ tol · max_i |θ_i|``, or when the Krylov space is invariant (β_k at rounding level,
    or k = size: θ is then an eigenvalue to rounding). Lanczos approaches both ends of the spectrum at once, so
    a dominant negative eigenvalue, or eigenvalues ±a (where the power method's Rayleigh quotient does not
    move), neither slows nor fools it; it converges in O(√κ) steps where the power method needs O(κ).

    ``tol = 0`` runs exactly ``iters`` steps (fewer only at an invariant space); the result counts as converged
    only in that invariant case. Memory: ``min(iters, size)`` vectors of ``size`` (the basis kept for full
    reorthogonalisation) while that is at most :data:`LANCZOS_BASIS_BYTES`; above it (a large model) three
    vectors, the plain three-term recurrence. Without reorthogonalisation the basis loses orthogonality as
    Ritz values converge and copies of them appear, but the largest Ritz value still converges to λ_max and
    ``β_k |s_k|`` still bounds its error up to rounding (Paige, 1976), so the test stays sound.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1 to estimate lambda_max, got {iters}")
    dim = min(iters, op.size)
    itemsize = torch.empty((), dtype=op.dtype).element_size()
    keep_basis = dim * op.size * itemsize <= LANCZOS_BASIS_BYTES
    q = torch.randn(op.size, generator=generator, dtype=op.dtype, device=generator.device).to(op.device)
    q = q / q.norm()
    basis = torch.empty(dim, op.size, dtype=op.dtype, device=op.device) if keep_basis else None
    if basis is not None:
        basis[0] = q
    previous = torch.zeros_like(q)
    eps = torch.finfo(op.dtype).eps
    alphas: List[float] = []
    betas: List[float] = []
    result = TopEigenvalue(0.0, 0, False, math.inf, 0.0)
    for k in range(1, dim + 1):
        w = op(q)
        alphas.append(float(q @ w))
        if basis is not None:
            Q = basis[:k]
            for _ in range(2):  # classical Gram-Schmidt against the whole basis, twice ("twice is enough")
                w = w - Q.T @ (Q @ w)
        else:
            w = w - alphas[-1] * q - (betas[-1] * previous if betas else 0.0)
        beta = float(w.norm())
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        scale = float(theta.abs().max())
        residual = beta * float(S[-1, -1].abs())
        invariant = k == op.size or beta <= 4 * k * eps * scale
        converged = invariant or (tol > 0 and residual <= tol * scale)
        result = TopEigenvalue(float(theta[-1]), k, converged, residual, scale)
        if converged or k == dim:
            break
        previous, q = q, w / beta
        if basis is not None:
            basis[k] = q
        betas.append(beta)
    return result


def hutchinson(op: HVPOperator, samples: int, generator: torch.Generator) -> Tuple[float, Optional[float]]:
    est = []
    for _ in range(samples):
        z = torch.randint(0, 2, (op.size,), generator=generator, device=generator.device).to(op.dtype).to(op.device)
        z = 2 * z - 1
        est.append(float(z @ op(z)))
    t = torch.tensor(est, dtype=torch.float64)
    se = (t.std(unbiased=True) / math.sqrt(samples)).item() if samples > 1 else None
    return t.mean().item(), se


def curvature_single(model: nn.Module, params: Dict[str, Tensor], x: Tensor, y: Tensor, lik: Any,
                     loss_fn: Optional[LossFn], lr: Optional[float], iters: int, tol: float, samples: int,
                     generator: torch.Generator, bn_mode: str = "eval") -> Dict[str, Any]:
    op = HVPOperator(model, params, x, y, lik, loss_fn, bn_mode)
    vals: Dict[str, Any] = {}
    if iters > 0:
        top = top_eigenvalue(op, iters, tol, generator)
        vals["curvature/lambda_max"] = top.value
        vals["lambda_max"] = top
        if lr is not None:
            vals["curvature/stability_ratio"] = float(lr) * top.value
    if samples > 0:
        tr, se = hutchinson(op, samples, generator)
        vals["curvature/hessian_trace"] = tr
        vals["hutchinson_stderr"] = se
    return vals


@documented_cost(
    where="iters = Lanczos iterations run (≤ the maximum; fewer once converged to tol), samples = Hutchinson "
    "probes, tasks = 1 when nothing is task-batched. Memory: min(iters, parameters) parameter-sized vectors "
    "(the Lanczos basis).",
    default=Cost(forward="tasks", backward="tasks", hvp="tasks*(iters+samples)"),
)
@diagnostic("likelihood", "sigma", "num_classes", "seed", "bn_mode", "batched")
def curvature(
    model: nn.Module,
    params: ParamsLike,
    x: Any,
    y: Any,
    *,
    lr: Optional[float] = None,
    iters: int = 50,
    tol: float = 1e-6,
    samples: int = 10,
    loss_fn: Optional[LossFn] = None,
    generator: Optional[torch.Generator] = None,
    settings: DiagnosticSettings,
) -> DiagnosticGroup:
    """λ_max (Lanczos), tr H (Hutchinson) and ρ = lr·λ_max of the support loss at ``params``.

    Args:
        x, y: support set(s).
        lr: the inner learning rate (ρ is reported only when given).
        iters, tol: at most ``iters`` Lanczos iterations (Hessian-vector products, 0 to skip λ_max); they stop
            once the Ritz pair's residual ``‖H y − λ y‖ ≤ tol·max|θ|`` (θ the Ritz values; tol=0: never before
            ``iters``). When the limit is reached first, ``estimator["converged"]`` is False and a
            :class:`CurvatureConvergenceWarning` names ``iters``: the value is then a lower bound on λ_max.
        samples: Rademacher probes for Hutchinson's trace (0 to skip).
        loss_fn: the inner loss ``(out, y) -> mean loss``; default the likelihood's mean NLL. Use the loss the
            inner loop minimises, or ρ is not the stability ratio of that loop.
        generator / seed: explicit RNG for the start vector and the probes.

    Returns:
        group ``curvature/lambda_max`` (units of the loss per param²), ``curvature/hessian_trace``
        (with Hutchinson stderr for a single task) and ``curvature/stability_ratio`` (unitless). The estimator
        of λ_max and ρ records ``iterations_run``, ``converged`` and the relative ``residual`` (per task when
        task-batched).

    Raises:
        SecondOrderUnavailable: the loss cannot be differentiated twice (message names the fix).
    """
    lik = None if loss_fn is not None else settings.resolve_likelihood("curvature")
    p = as_weights(model, params)
    gen = resolve_generator(generator, settings.seed, device_of(p))
    T, views = split_tasks(model, {"p": p}, {"x": x, "y": y}, settings.batched)
    vals = [curvature_single(model, pt["p"], d["x"], d["y"], lik, loss_fn, lr, iters, tol, samples, gen,
                             settings.bn_mode)
            for pt, d in views]
    units = f"{loss_units(loss_fn)}/param^2"
    est = {"loss": "mean NLL, " + lik.describe() if lik is not None else "loss_fn", "bn_mode": settings.bn_mode,
           "iterations": iters, "tol": tol, "hutchinson_samples": samples, "probes": "Rademacher",
           "start": "Gaussian (explicit generator)", "lr": lr}
    return curvature_group(vals, T, units, est, ("iters", "tol"))


LANCZOS = "Lanczos, full reorthogonalisation; stops at residual <= tol * max|Ritz value|"


def eigen_estimator(tops: Sequence[TopEigenvalue], batched: bool) -> Dict[str, Any]:
    """The estimator entries of a λ_max from :func:`top_eigenvalue` (lists per task when task-batched)."""
    rel = [t.residual / t.scale if t.scale > 0 else 0.0 for t in tops]
    e: Dict[str, Any] = {"method": LANCZOS, "iterations_run": [t.iterations for t in tops],
                         "converged": [t.converged for t in tops], "residual": rel}
    return e if batched else {k: (v[0] if isinstance(v, list) else v) for k, v in e.items()}


def unconverged_message(tops: Sequence[TopEigenvalue], what: str, iters: int, tol: float,
                        arguments: Tuple[str, str]) -> Optional[str]:
    """What to say when some task's λ_max did not converge (None when all did); ``arguments`` names the caller's
    iteration limit and tolerance (``("iters", "tol")`` for :func:`curvature`)."""
    bad = [i for i, t in enumerate(tops) if not t.converged]
    if not bad:
        return None
    worst = max(tops[i].residual / tops[i].scale if tops[i].scale > 0 else 0.0 for i in bad)
    where = "" if len(tops) == 1 else f" on {len(bad)} of {len(tops)} tasks (first: task {bad[0]})"
    return (f"{what}: lambda_max did not converge within {arguments[0]}={iters} Lanczos iterations{where}: "
            f"relative residual {worst:.2g} > {arguments[1]}={tol:g}, so the value is only a lower bound on the "
            f"largest eigenvalue (estimator['converged'] is False). Raise {arguments[0]}.")


def warn_unconverged(tops: Sequence[TopEigenvalue], what: str, iters: int, tol: float,
                     arguments: Tuple[str, str]) -> Optional[str]:
    """Warn (:class:`CurvatureConvergenceWarning`, naming the caller's ``arguments``) when some task's λ_max did
    not converge; returns the message (None when all converged)."""
    message = unconverged_message(tops, what, iters, tol, arguments)
    if message is not None:
        warnings.warn(message, CurvatureConvergenceWarning, stacklevel=3)
    return message


def curvature_group(vals: List[Dict[str, Any]], T: Optional[int], units: str, est: Dict[str, Any],
                    arguments: Tuple[str, str]) -> DiagnosticGroup:
    """The curvature diagnostics from per-task :func:`curvature_single` values; warns (naming ``arguments``,
    the caller's names of the iteration limit and tolerance) when λ_max did not converge."""
    group = DiagnosticGroup()
    tops = [v["lambda_max"] for v in vals if "lambda_max" in v]
    if tops:
        warn_unconverged(tops, "curvature", est["iterations"], est["tol"], arguments)
    for key in [k for k in vals[0] if k.startswith("curvature/")]:
        u = "1" if key.endswith("stability_ratio") else units
        e = dict(est)
        if key.endswith("lambda_max") or key.endswith("stability_ratio"):
            e.update(eigen_estimator(tops, T is not None))
        if T is None:
            se = vals[0]["hutchinson_stderr"] if key.endswith("hessian_trace") else None
            ci = None if se is None else (vals[0][key] - 1.96 * se, vals[0][key] + 1.96 * se)
            group[key] = Diagnostic(key, vals[0][key], u, e, ci95=ci, stderr=se)
        else:
            group[key] = Diagnostic.from_tasks(key, [v[key] for v in vals], u, e)
    return group
