"""(3) Fisher information at θ and φ, and (3b) the information written into the adapted weights.

Fisher information of the predictive ``p_w(y|x)`` on inputs ``x_1..x_n``
(means over examples):

* **empirical** — labels from data: ``F̂ = (1/n) Σ g_i g_iᵀ``, ``g_i = ∇_w ln p(y_i|x_i)``;
  ``tr F̂ = (1/n) Σ ‖g_i‖²`` — per-example gradients, *never* the square of the
  batch-mean gradient;
* **true** (model) Fisher — ``F = (1/n) Σ J_iᵀ Λ_i J_i`` with ``J_i = ∂f_w(x_i)/∂w``
  and ``Λ = diag(p) − ppᵀ`` (softmax) or ``I/σ²`` (Gaussian): the expectation of
  ``g gᵀ`` under labels drawn from the model; independent of the observed labels;
* **mc** — Monte-Carlo Fisher: labels sampled from the model with an explicit
  generator, ``S`` samples per example; unbiased for the true Fisher.

Reported: the trace (total and per parameter tensor), the diagonal, and on
request the full matrix (parameters flattened in ``named_parameters()`` order).

(3b) Laplace posterior ``q = 𝒩(φ, diag 1/(nF_k+λ))`` against the prior
``𝒩(θ, λ⁻¹I)``: ``I_w = KL(q‖prior) = ½ Σ_k [λ/(nF_k+λ) − 1 + ln((nF_k+λ)/λ) + λ(φ_k−θ_k)²]``
nats written into the weights by adaptation, per layer and in total.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ._cost import Cost, documented_cost
from ._functional import (
    ParamsLike,
    as_weights,
    call_model,
    explained_errors,
    to_vector,
    per_example_grads,
    per_example_jacobians,
    resolve_generator,
    resolve_method,
    split_tasks,
    device_of,
)
from .settings import EVALUATION, DiagnosticSettings, diagnostic
from ._likelihood import Likelihood
from ._result import Diagnostic

__all__ = ["fisher_information", "weight_information", "adapted_weight_information"]

FISHER_KINDS = ("empirical", "true", "mc")
FISHER_UNITS = "nats^2/param^2"


def fisher_single(
    model: nn.Module,
    params: Dict[str, Tensor],
    x: Tensor,
    y: Optional[Tensor],
    lik: Likelihood,
    kind: str = "empirical",
    *,
    samples: int = 1,
    generator: Optional[torch.Generator] = None,
    bn_mode: str = "eval",
    method: str = "auto",
    matrix: bool = False,
) -> Tuple[Dict[str, Tensor], Optional[Tensor]]:
    """Diagonal (``name -> tensor``) and optionally the full matrix of the Fisher at ``params`` on ``x``."""
    n = x.shape[0]
    if kind == "empirical":
        if y is None:
            raise ValueError("the empirical Fisher needs labels: pass y, or kind='true' / kind='mc'")
        with explained_errors(model, params, x, y, lik, bn_mode):
            G, out = per_example_grads(model, params, x, y, lik.log_prob, bn_mode=bn_mode, method=method)
        lik.check(out, y)
        diag = {k: (g * g).mean(0) for k, g in G.items()}
        mat = None
        if matrix:
            Gf = to_vector(G, start_dim=1)
            mat = Gf.T @ Gf / n
        return diag, mat
    if kind == "mc":
        if samples < 1:
            raise ValueError("samples must be >= 1")
        assert generator is not None
        with torch.no_grad(), explained_errors(model, params, x, None, lik, bn_mode):
            out = call_model(model, {k: p.detach() for k, p in params.items()}, x, bn_mode)
        lik.check(out)
        # all samples in one vectorised call over n·samples examples (repeating a batch leaves BatchNorm's
        # batch statistics unchanged)
        ys = lik.sample(out, generator, samples)
        xr = x.unsqueeze(0).expand(samples, *x.shape).reshape(samples * n, *x.shape[1:])
        G, _ = per_example_grads(model, params, xr, ys.reshape(samples * n, *ys.shape[2:]), lik.log_prob,
                                 bn_mode=bn_mode, method=method)
        diag = {k: (g * g).mean(0) for k, g in G.items()}
        mat = None
        if matrix:
            Gf = to_vector(G, start_dim=1)
            mat = Gf.T @ Gf / (n * samples)
        return diag, mat
    if kind == "true":
        with explained_errors(model, params, x, None, lik, bn_mode):
            J, out = per_example_jacobians(model, params, x, bn_mode=bn_mode,
                                           method="vmap" if method == "loop" else method)
        lik.check(out)
        lam = lik.lam(out.reshape(n, -1) if not lik.categorical else out)
        diag = {}
        for k, j in J.items():
            jf = j.reshape(n, j.shape[1], -1)
            if lik.categorical:
                # J_pᵀ(diag(p) − ppᵀ)J_p = Σ_a p_a (J_ap − Σ_b p_b J_bp)²: a variance, computed centred so that
                # it is ≥ 0 in floating point too (E[J²] − (E J)² cancels to negative values in float32 when the
                # classes' Jacobians are nearly equal, which mid meta-training broke the weight information)
                p = out.detach().softmax(-1)
                centred = jf - torch.einsum("na,nap->np", p, jf).unsqueeze(1)
                diag[k] = torch.einsum("na,nap->p", p, centred * centred).reshape(params[k].shape) / n
            else:
                diag[k] = torch.einsum("nap,nab,nbp->p", jf, lam, jf).reshape(params[k].shape) / n
        mat = None
        if matrix:
            jf = torch.cat([j.reshape(n, j.shape[1], -1) for j in J.values()], dim=-1)
            mat = torch.einsum("nap,nab,nbq->pq", jf, lam, jf) / n
        return diag, mat
    raise ValueError(f"kind must be one of {FISHER_KINDS}, got {kind!r}")


def fisher_estimator(lik: Likelihood, kind: str, samples: int, bn_mode: str, method: str) -> Dict[str, Any]:
    labels = {"empirical": "from data", "true": "expectation under the model (J^T Λ J)",
              "mc": f"sampled from the model ({samples} per example, explicit generator)"}[kind]
    return {"kind": kind, "labels": labels, "likelihood": lik.describe(), "reduction": "mean over examples",
            "bn_mode": bn_mode, "per_example": method}


# per Fisher kind, per call of fisher_information / adapted_weight_information
FISHER_COSTS = dict(
    empirical=Cost(forward="tasks", backward="tasks"),
    true=Cost(forward="tasks", backward="outputs*tasks"),
    mc=Cost(forward="2*tasks", backward="tasks"),
)


@documented_cost(
    where="tasks = 1 when nothing is task-batched, outputs = model outputs per example (classes N), "
    "samples = labels drawn per example (mc evaluates one vectorised batch of n·samples examples: its compute "
    "is that of samples forward and backward passes over the n examples); with per_example='jacrev' (forced "
    "by bn_mode='batch' on a model with BatchNorm) each backward term is multiplied by the number of examples "
    "in the batch (n, or n·samples for mc).",
    **FISHER_COSTS,
)
@diagnostic(*EVALUATION)
def fisher_information(
    model: nn.Module,
    params: ParamsLike,
    x: Any,
    y: Any = None,
    *,
    kind: str = "empirical",
    samples: int = 1,
    generator: Optional[torch.Generator] = None,
    matrix: bool = False,
    settings: DiagnosticSettings,
) -> Diagnostic:
    """Fisher information of ``p_w(y|x)`` at ``params`` (θ or φ) on inputs ``x``: trace, diagonal, per layer.

    Args:
        params: the weights (dict/list; a leading task dimension makes it per task).
        x, y: inputs and labels (``y`` only needed for ``kind="empirical"``).
        kind: ``"empirical"`` (labels from data), ``"true"`` (``JᵀΛJ``) or ``"mc"``
            (``samples`` labels per example sampled with ``generator``, or a fresh
            generator seeded with ``seed``; the global RNG is never used).
        matrix: also return the full ``P×P`` matrix in ``details["matrix"]`` (small models only).
        per_example: ``"auto"``, ``"vmap"`` (reference), ``"jacrev"`` or ``"loop"``.

    Returns:
        Diagnostic ``fisher/trace`` (units nats²/param²): value = total trace,
        ``by_layer`` = trace per parameter tensor, ``details["diagonal"]`` =
        the diagonal per tensor (means over tasks).
    """
    lik = settings.resolve_likelihood("fisher_information")
    if kind not in FISHER_KINDS:
        raise ValueError(f"kind must be one of {FISHER_KINDS}, got {kind!r}")
    p = as_weights(model, params)
    method = resolve_method(settings.per_example, model, settings.bn_mode)
    gen = resolve_generator(generator, settings.seed, device_of(p)) if kind == "mc" else None
    T, views = split_tasks(model, {"p": p}, {"x": x, "y": y}, settings.batched)
    diags, mats = [], []
    for pt, d in views:
        dg, m = fisher_single(model, pt["p"], d["x"], d["y"], lik, kind, samples=samples, generator=gen,
                              bn_mode=settings.bn_mode, method=method, matrix=matrix)
        diags.append(dg)
        mats.append(m)
    return fisher_result(diags, mats, T, fisher_estimator(lik, kind, samples, settings.bn_mode, method))


def fisher_result(diags: list, mats: list, T: Optional[int], est: Dict[str, Any], name: str = "fisher/trace") -> Diagnostic:
    traces = [sum(v.sum() for v in dg.values()).item() for dg in diags]
    layers = [{k: v.sum().item() for k, v in dg.items()} for dg in diags]
    mean_diag = {k: torch.stack([dg[k] for dg in diags]).mean(0) for k in diags[0]}
    details: Dict[str, Any] = {"diagonal": mean_diag}
    if mats[0] is not None:
        details["matrix"] = torch.stack(mats).mean(0)
    if T is None:
        return Diagnostic(name, traces[0], FISHER_UNITS, est, by_layer=layers[0], details=details)
    return Diagnostic.from_tasks(name, traces, FISHER_UNITS, est, by_layer=layers, details=details)


# ---------------------------------------------------------------------------------------
# 3b: information in the adapted weights
# ---------------------------------------------------------------------------------------
def _as_dict(x: Union[Tensor, Mapping[str, Tensor]]) -> Dict[str, Tensor]:
    return {"w": x} if isinstance(x, Tensor) else dict(x)


def weight_information_terms(theta: Dict[str, Tensor], phi: Dict[str, Tensor], fisher_diag: Dict[str, Tensor],
                             n: int, prior_precision: float) -> Dict[str, float]:
    lam = float(prior_precision)
    if not lam > 0:
        raise ValueError(f"prior_precision λ must be > 0, got {prior_precision}")
    out = {}
    for k in theta:
        F = fisher_diag[k].detach().to(torch.float64)
        if (F < 0).any():
            raise ValueError(f"the Fisher diagonal of {k!r} has negative entries")
        a = n * F / lam
        d = (phi[k].detach() - theta[k].detach()).to(torch.float64)
        # λ/(nF+λ) − 1 + ln((nF+λ)/λ) = ln(1+a) − a/(1+a) ≥ 0, computed stably
        term = (torch.log1p(a) - a / (1 + a)).clamp_min(0.0) + lam * d * d
        out[k] = 0.5 * term.sum().item()
    return out


def weight_information(
    theta: Union[Tensor, Mapping[str, Tensor]],
    phi: Union[Tensor, Mapping[str, Tensor]],
    fisher_diag: Union[Tensor, Mapping[str, Tensor]],
    n: int,
    *,
    prior_precision: float = 1.0,
) -> Diagnostic:
    """(3b) ``KL(𝒩(φ, diag 1/(nF+λ)) ‖ 𝒩(θ, λ⁻¹I))`` in nats, per tensor and in total. Free (no model calls).

    ``½ Σ_k [λ/(nF_k+λ) − 1 + ln((nF_k+λ)/λ) + λ(φ_k−θ_k)²]``: ≥ 0, and 0 iff
    φ = θ and F = 0. ``theta``, ``phi``, ``fisher_diag``: tensors, or dicts
    with the same keys (in any order).
    """
    th, ph, fd = _as_dict(theta), _as_dict(phi), _as_dict(fisher_diag)
    if set(th) != set(ph) or set(th) != set(fd):
        raise ValueError("theta, phi and fisher_diag must have the same keys")
    layers = weight_information_terms(th, ph, fd, n, prior_precision)
    est = {"posterior": "Laplace, diagonal Fisher", "prior_precision": float(prior_precision), "n": int(n)}
    return Diagnostic("weight_information", sum(layers.values()), "nats", est, by_layer=layers)


@documented_cost(
    where="the cost of fisher_information(kind=fisher_kind) at φ on the support set.",
    **FISHER_COSTS,
)
@diagnostic(*EVALUATION)
def adapted_weight_information(
    model: nn.Module,
    theta: ParamsLike,
    phi: ParamsLike,
    x_support: Any,
    y_support: Any = None,
    *,
    prior_precision: float = 1.0,
    fisher_kind: str = "true",
    samples: int = 1,
    generator: Optional[torch.Generator] = None,
    settings: DiagnosticSettings,
) -> Diagnostic:
    """(3b) Nats written into the weights by adaptation (Laplace approximation), per layer and total.

    The Fisher diagonal ``F`` is evaluated at φ on the support set (``n`` =
    support size; ``fisher_kind`` as in :func:`fisher_information`, default the
    true Fisher = generalised Gauss–Newton), ``λ`` = ``prior_precision``.
    """
    lik = settings.resolve_likelihood("adapted_weight_information")
    th, ph = as_weights(model, theta), as_weights(model, phi)
    method = resolve_method(settings.per_example, model, settings.bn_mode)
    gen = resolve_generator(generator, settings.seed, device_of(ph)) if fisher_kind == "mc" else None
    T, views = split_tasks(model, {"theta": th, "phi": ph}, {"x": x_support, "y": y_support}, settings.batched)
    vals = []
    for p, d in views:
        dg, _ = fisher_single(model, p["phi"], d["x"], d["y"], lik, fisher_kind, samples=samples, generator=gen,
                              bn_mode=settings.bn_mode, method=method)
        vals.append(weight_information_terms(p["theta"], p["phi"], dg, d["x"].shape[0], prior_precision))
    est = {"posterior": "Laplace, diagonal Fisher at phi on the support set", "prior_precision": float(prior_precision),
           **{f"fisher_{k}": v
              for k, v in fisher_estimator(lik, fisher_kind, samples, settings.bn_mode, method).items()}}
    return weight_information_result(vals, T, est)


def weight_information_result(vals: list, T: Optional[int], est: Dict[str, Any]) -> Diagnostic:
    totals = [sum(v.values()) for v in vals]
    if T is None:
        return Diagnostic("weight_information", totals[0], "nats", est, by_layer=vals[0])
    return Diagnostic.from_tasks("weight_information", totals, "nats", est, by_layer=vals)
