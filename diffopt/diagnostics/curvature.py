"""(7) Inner-loss curvature and stability.

``λ_max``, the largest eigenvalue of the support-loss Hessian at θ, by power iteration on
Hessian-vector products (a second, shifted run where the eigenvalue of largest magnitude is
negative: :func:`power_iteration`), ``tr H`` by Hutchinson's estimator with Rademacher probes
(explicit generator), and the stability ratio ``ρ = lr·λ_max``: plain gradient
descent on a quadratic converges for ``0 < ρ < 2`` and diverges for ``ρ > 2``.
Sharpness is descriptive, not predictive.

Needs second derivatives: a model whose loss cannot be differentiated twice
raises :class:`SecondOrderUnavailable` naming the fix.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

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
from ._result import Diagnostic, DiagnosticGroup

__all__ = ["curvature", "hessian_vector_product", "HVPOperator"]


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


def _power_iteration(op: Any, iters: int, tol: float, generator: torch.Generator,
                     shift: float = 0.0) -> Tuple[float, int, bool]:
    """The dominant eigenvalue of ``H + shift·I`` (largest magnitude, signed, a Rayleigh quotient), the
    iterations run, and whether it stopped by ``tol`` (``tol = 0``: a fixed count, taken as converged)."""
    v = torch.randn(op.size, generator=generator, dtype=op.dtype, device=generator.device).to(op.device)
    v = v / v.norm()
    lam, prev, it = 0.0, None, 0
    for it in range(1, iters + 1):
        hv = op(v) + shift * v if shift else op(v)
        lam = float(v @ hv)
        norm = float(hv.norm())
        if norm == 0.0:
            return lam, it, True
        v = hv / norm
        if tol > 0 and prev is not None and abs(lam - prev) <= tol * abs(lam):
            return lam, it, True
        prev = lam
    return lam, it, tol == 0


def power_iteration(op: Any, iters: int, tol: float, generator: torch.Generator) -> Tuple[float, int]:
    """``λ_max``, the largest (algebraic) eigenvalue of the symmetric operator, and the iterations run.
    Power iteration finds the eigenvalue of largest magnitude ``λ₁``; that is ``λ_max`` when it is
    positive and converged. Otherwise (``λ₁ < 0``, or ``±λ₁`` both eigenvalues, where the Rayleigh
    quotient does not settle) a second run on ``H + |λ₁|·I``, whose spectrum lies in ``[0, 2|λ₁|]``
    with ``λ_max + |λ₁|`` on top, gives ``λ_max``."""
    lam, run, converged = _power_iteration(op, iters, tol, generator)
    if lam >= 0 and converged:
        return lam, run
    shift = abs(lam)
    top, more, _ = _power_iteration(op, iters, tol, generator, shift)
    return top - shift, run + more


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
        lam, run = power_iteration(op, iters, tol, generator)
        vals["curvature/lambda_max"] = lam
        vals["power_iterations_run"] = run
        if lr is not None:
            vals["curvature/stability_ratio"] = float(lr) * lam
    if samples > 0:
        tr, se = hutchinson(op, samples, generator)
        vals["curvature/hessian_trace"] = tr
        vals["hutchinson_stderr"] = se
    return vals


@documented_cost(
    where="iters = power iterations run (≤ the maximum; fewer once converged to tol), samples = Hutchinson "
    "probes, tasks = 1 when nothing is task-batched.",
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
    """λ_max (power iteration), tr H (Hutchinson) and ρ = lr·λ_max of the support loss at ``params``.

    Args:
        x, y: support set(s).
        lr: the inner learning rate (ρ is reported only when given).
        iters, tol: power iterations (stop early once the Rayleigh quotient changes by ≤ ``tol·|λ|``; tol=0 never).
        samples: Rademacher probes for Hutchinson's trace (0 to skip).
        loss_fn: the inner loss ``(out, y) -> mean loss``; default the likelihood's mean NLL. Use the loss the
            inner loop minimises, or ρ is not the stability ratio of that loop.
        generator / seed: explicit RNG for the start vector and the probes.

    Returns:
        group ``curvature/lambda_max`` (units of the loss per param²), ``curvature/hessian_trace``
        (with Hutchinson stderr for a single task) and ``curvature/stability_ratio`` (unitless).

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
    units = "nats/param^2" if loss_fn is None else "loss/param^2"
    est = {"loss": "mean NLL, " + lik.describe() if lik is not None else "loss_fn", "bn_mode": settings.bn_mode,
           "power_iterations": iters, "tol": tol, "hutchinson_samples": samples, "probes": "Rademacher",
           "start": "Gaussian (explicit generator)", "lr": lr}
    return curvature_group(vals, T, units, est)


def curvature_group(vals: List[Dict[str, Any]], T: Optional[int], units: str, est: Dict[str, Any]) -> DiagnosticGroup:
    group = DiagnosticGroup()
    for key in [k for k in vals[0] if k.startswith("curvature/")]:
        u = "1" if key.endswith("stability_ratio") else units
        e = dict(est)
        if key.endswith("lambda_max") or key.endswith("stability_ratio"):
            e["power_iterations_run"] = [v["power_iterations_run"] for v in vals] if T is not None \
                else vals[0]["power_iterations_run"]
        if T is None:
            se = vals[0]["hutchinson_stderr"] if key.endswith("hessian_trace") else None
            ci = None if se is None else (vals[0][key] - 1.96 * se, vals[0][key] + 1.96 * se)
            group[key] = Diagnostic(key, vals[0][key], u, e, ci95=ci, stderr=se)
        else:
            group[key] = Diagnostic.from_tasks(key, [v[key] for v in vals], u, e)
    return group
