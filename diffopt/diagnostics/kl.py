"""(1) Adaptation KL: how much the support set changed the predictions on the query set.

``KL_fwd = (1/m) Σ_{x∈Q} KL(p_φ(·|x) ‖ p_θ(·|x))``, the reverse ``KL(p_θ ‖ p_φ)``
and Jensen–Shannon ``½KL(p_φ‖M) + ½KL(p_θ‖M)``, ``M = ½(p_φ+p_θ)``. For
regression with 𝒩(f, σ²) both directions are ``Σ_d (f_φ−f_θ)²/(2σ²)`` (JS
between Gaussians has no closed form and is not reported). ≈0 means the support
set is ignored (memorisation).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ._cost import Cost, documented_cost
from ._functional import ParamsLike, as_weights, call_model, explained_errors, split_tasks
from .settings import DiagnosticSettings, diagnostic
from ._likelihood import Likelihood
from ._result import Diagnostic, DiagnosticGroup

__all__ = ["adaptation_kl", "kl_categorical", "js_categorical", "kl_gaussian"]


def _weighted(log_p: Tensor, term: Tensor) -> Tensor:
    """``p · term`` with ``0 · term = 0`` where ``p = 0`` (a class masked by a ``-inf`` logit), as in the
    definitions of KL and entropy; ``0 · (−inf)`` would be NaN. Where ``p > 0`` and ``term = inf``
    (``q = 0``) the result stays ``inf``: the KL is infinite."""
    return torch.where(log_p > float("-inf"), log_p.exp() * torch.where(log_p > float("-inf"), term, 0.0), 0.0)


def kl_categorical(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(softmax(logits_p) ‖ softmax(logits_q))`` over the last dim, in nats (clamped at 0)."""
    lp, lq = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
    return _weighted(lp, lp - lq).sum(-1).clamp_min(0.0)


def js_categorical(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Jensen–Shannon divergence in nats, in ``[0, ln 2]``."""
    lp, lq = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
    lm = torch.where(lp == lq, lp, torch.logaddexp(lp, lq) - math.log(2.0))  # exactly 0 for identical inputs
    js = 0.5 * _weighted(lp, lp - lm).sum(-1) + 0.5 * _weighted(lq, lq - lm).sum(-1)
    return js.clamp(0.0, math.log(2.0))


def kl_gaussian(mean_p: Tensor, mean_q: Tensor, sigma: float) -> Tensor:
    """``KL(𝒩(mean_p, σ²I) ‖ 𝒩(mean_q, σ²I))`` per example = ``Σ_d (mean_p − mean_q)²/(2σ²)``."""
    d = (mean_p - mean_q).reshape(mean_p.shape[0], -1)
    return (d * d).sum(-1) / (2.0 * float(sigma) ** 2)


def _kl_values(lik: Likelihood, out_theta: Tensor, out_phi: Tensor, reduction: str) -> Dict[str, float]:
    red = (lambda v: v.mean()) if reduction == "mean" else (lambda v: v.sum())
    if lik.categorical:
        return {
            "kl/forward": red(kl_categorical(out_phi, out_theta)).item(),
            "kl/reverse": red(kl_categorical(out_theta, out_phi)).item(),
            "kl/js": red(js_categorical(out_phi, out_theta)).item(),
        }
    kl = red(kl_gaussian(out_phi, out_theta, lik.sigma)).item()
    return {"kl/forward": kl, "kl/reverse": kl}


def kl_single(model: nn.Module, theta: Dict[str, Tensor], phi: Dict[str, Tensor], x: Tensor, lik: Likelihood,
              bn_mode: str = "eval", reduction: str = "mean") -> Dict[str, float]:
    with torch.no_grad(), explained_errors(model, theta, x, None, lik, bn_mode):
        out_t = call_model(model, {n: p.detach() for n, p in theta.items()}, x, bn_mode)
        out_p = call_model(model, {n: p.detach() for n, p in phi.items()}, x, bn_mode)
    lik.check(out_t)
    return _kl_values(lik, out_t, out_p, reduction)


def kl_estimator(lik: Likelihood, bn_mode: str, reduction: str) -> Dict[str, Any]:
    return {"likelihood": lik.describe(), "reduction": f"{reduction} over query examples", "bn_mode": bn_mode,
            "labels": "none (predictive distributions)"}


@documented_cost(where="tasks = 1 when nothing is task-batched.", default=Cost(forward="2*tasks"))
@diagnostic("likelihood", "sigma", "num_classes", "bn_mode", "batched")
def adaptation_kl(
    model: nn.Module,
    theta: ParamsLike,
    phi: ParamsLike,
    x_query: Any,
    *,
    reduction: str = "mean",
    settings: DiagnosticSettings,
) -> DiagnosticGroup:
    """Forward KL(p_φ‖p_θ), reverse KL(p_θ‖p_φ) and JS on the query inputs, in nats.

    Args:
        model: the network; evaluated as ``functional_call(model, weights, (x,))``.
        theta, phi: weights before/after adaptation (dict or list; may carry a
            leading task dimension, then ``x_query`` carries it too).
        x_query: query inputs ``(m, ...)``, ``(T, m, ...)`` or a list of per-task tensors.
        likelihood: ``"categorical"`` (logits) or ``"gaussian"`` (needs ``sigma``).
        reduction: ``"mean"`` (the spec's 1/m Σ) or ``"sum"`` over query examples.
        bn_mode: ``"eval"`` (running statistics) or ``"batch"`` (query-batch statistics).

    Returns:
        group with ``"kl/forward"``, ``"kl/reverse"`` and (classification) ``"kl/js"``.
    """
    lik = settings.resolve_likelihood("adaptation_kl")
    if reduction not in ("mean", "sum"):
        raise ValueError("reduction must be 'mean' or 'sum'")
    th, ph = as_weights(model, theta), as_weights(model, phi)
    T, views = split_tasks(model, {"theta": th, "phi": ph}, {"x": x_query}, settings.batched)
    vals = [kl_single(model, p["theta"], p["phi"], d["x"], lik, settings.bn_mode, reduction) for p, d in views]
    return aggregate(vals, T, "nats", kl_estimator(lik, settings.bn_mode, reduction))


def aggregate(vals: list, T: Optional[int], units: Any, estimator: Dict[str, Any]) -> DiagnosticGroup:
    """Turn per-task dicts ``name -> float`` into a group of Diagnostics (mean and CI across tasks)."""
    group = DiagnosticGroup()
    for key in vals[0]:
        u = units[key] if isinstance(units, dict) else units
        if T is None:
            group[key] = Diagnostic(key, vals[0][key], u, dict(estimator))
        else:
            group[key] = Diagnostic.from_tasks(key, [v[key] for v in vals], u, estimator)
    return group
