"""(2) Entropy and cross-entropy change, and BALD over several adapted solutions.

``ΔH = H_Q(θ) − H_Q(φ)`` (confidence gained, nats per query example),
``ΔCE = CE_Q(θ) − CE_Q(φ)`` (nats of query likelihood gained), and
``BALD = H[mean_j p_j] − mean_j H[p_j]`` over adapted solutions ``φ_1..φ_J``
(remaining epistemic uncertainty; ``0 ≤ BALD ≤ ln N``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from ._cost import Cost, documented_cost
from ._functional import ParamsLike, as_weights, call_model, explained_errors, split_tasks
from .settings import DiagnosticSettings, diagnostic
from ._likelihood import Likelihood, resolve_likelihood
from ._result import DiagnosticGroup
from .kl import _weighted, aggregate

__all__ = ["entropy_change", "bald", "entropy_categorical", "bald_from_logits"]


def entropy_categorical(logits: Tensor) -> Tensor:
    """``H[softmax(logits)]`` over the last dim, in nats, in ``[0, ln N]``."""
    lp = logits.log_softmax(-1)
    return (-_weighted(lp, lp).sum(-1)).clamp(0.0, math.log(logits.shape[-1]))


def bald_from_logits(logits: Tensor) -> Tensor:
    """BALD per example from member logits ``(J, m, N)``: ``H[mean_j p_j] − mean_j H[p_j]`` (nats)."""
    J = logits.shape[0]
    lp = logits.log_softmax(-1)
    lmean = torch.logsumexp(lp, dim=0) - math.log(J)
    h_mean = -_weighted(lmean, lmean).sum(-1)
    mean_h = -_weighted(lp, lp).sum(-1).mean(0)
    return (h_mean - mean_h).clamp(0.0, math.log(logits.shape[-1]))


def _entropy(lik: Likelihood, out: Tensor) -> Tensor:
    if lik.categorical:
        return entropy_categorical(out)
    D = lik.output_dim(out)
    return torch.full((out.shape[0],), 0.5 * D * math.log(2 * math.pi * math.e * lik.sigma**2), dtype=out.dtype)


def entropy_single(model: nn.Module, theta: Dict[str, Tensor], phi: Dict[str, Tensor], x: Tensor,
                   y: Optional[Tensor], lik: Likelihood, bn_mode: str = "eval",
                   out_theta: Optional[Tensor] = None) -> Dict[str, float]:
    with torch.no_grad(), explained_errors(model, theta, x, y, lik, bn_mode):
        out_t = call_model(model, theta, x, bn_mode) if out_theta is None else out_theta
        out_p = call_model(model, phi, x, bn_mode)
        lik.check(out_t, y)
        h_t, h_p = _entropy(lik, out_t).mean().item(), _entropy(lik, out_p).mean().item()
        vals = {"entropy/theta": h_t, "entropy/phi": h_p, "entropy/delta": h_t - h_p}
        if y is not None:
            ce_t, ce_p = lik.nll(out_t, y).mean().item(), lik.nll(out_p, y).mean().item()
            vals.update({"cross_entropy/theta": ce_t, "cross_entropy/phi": ce_p, "cross_entropy/delta": ce_t - ce_p})
    return vals


@documented_cost(where="tasks = 1 when nothing is task-batched.", default=Cost(forward="2*tasks"))
@diagnostic("likelihood", "sigma", "num_classes", "bn_mode", "batched")
def entropy_change(
    model: nn.Module,
    theta: ParamsLike,
    phi: ParamsLike,
    x_query: Any,
    y_query: Any = None,
    *,
    settings: DiagnosticSettings,
) -> DiagnosticGroup:
    """Predictive entropy and (with labels) cross-entropy on the query set under θ and φ, and their change.

    Means over query examples, in nats. For a Gaussian likelihood the entropy is
    the constant ``D/2·ln(2πeσ²)`` (so ΔH = 0) and the cross-entropy is the NLL.

    Returns:
        group with ``entropy/theta``, ``entropy/phi``, ``entropy/delta`` (= H_θ − H_φ)
        and, when ``y_query`` is given, ``cross_entropy/theta|phi|delta`` (= CE_θ − CE_φ).
    """
    lik = settings.resolve_likelihood("entropy_change")
    th, ph = as_weights(model, theta), as_weights(model, phi)
    T, views = split_tasks(model, {"theta": th, "phi": ph}, {"x": x_query, "y": y_query}, settings.batched)
    vals = [entropy_single(model, p["theta"], p["phi"], d["x"], d["y"], lik, settings.bn_mode) for p, d in views]
    est = {"likelihood": lik.describe(), "reduction": "mean over query examples", "bn_mode": settings.bn_mode,
           "labels": "query labels from data (cross-entropy)" if y_query is not None else "none"}
    return aggregate(vals, T, "nats", est)


def bald_single(model: nn.Module, members: Sequence[Dict[str, Tensor]], x: Tensor, lik: Likelihood,
                bn_mode: str = "eval") -> Dict[str, float]:
    if not lik.categorical:
        raise ValueError("BALD is implemented for categorical predictions only (the entropy of a mixture of "
                         "Gaussians has no closed form); use likelihood='categorical'")
    if len(members) < 1:
        raise ValueError("BALD needs at least one adapted solution")
    with torch.no_grad(), explained_errors(model, members[0], x, None, lik, bn_mode):
        logits = torch.stack([call_model(model, m, x, bn_mode) for m in members])
    lik.check(logits[0])
    return {"bald": bald_from_logits(logits).mean().item()}


@documented_cost(where="members = J adapted solutions; tasks = 1 when nothing is task-batched.",
                 default=Cost(forward="members*tasks"))
@diagnostic("likelihood", "num_classes", "bn_mode", "batched")
def bald(
    model: nn.Module,
    members: Sequence[ParamsLike],
    x: Any,
    *,
    settings: DiagnosticSettings,
) -> DiagnosticGroup:
    """BALD mutual information between the prediction and the choice of adapted solution, in nats.

    ``BALD = H[mean_j p_j] − mean_j H[p_j]``, averaged over the inputs ``x``.
    ``members`` are J adapted weight sets (e.g. adaptations on bootstrap
    resamples of the support set, or from different seeds); each may carry a
    task dimension, then ``x`` does too. 0 when all members agree.
    """
    lik = resolve_likelihood(settings.likelihood, None, settings.num_classes, what="bald")
    ms = [as_weights(model, m) for m in members]
    T, views = split_tasks(model, {f"m{j}": m for j, m in enumerate(ms)}, {"x": x}, settings.batched)
    vals = [bald_single(model, [p[f"m{j}"] for j in range(len(ms))], d["x"], lik, settings.bn_mode) for p, d in views]
    est = {"likelihood": lik.describe(), "members": len(ms), "reduction": "mean over inputs",
           "bn_mode": settings.bn_mode}
    return aggregate(vals, T, "nats", est)
