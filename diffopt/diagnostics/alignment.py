"""(4) Gradient alignment and signal-to-noise across and within tasks.

For task gradients ``g_t = ∇_w L_{S_t}(w)`` (mean support loss of task t):

* cross-task cosine matrix and conflict rate (fraction of pairs with cos < 0);
* diversity ``Σ‖g_t‖² / ‖Σ g_t‖²`` (1/M identical, 1 orthogonal);
* per-parameter GSNR ``(E g)² / Var g`` across tasks (U-statistic numerator);
* ``‖E g‖²`` by the unbiased U-statistic ``(1/(M(M−1))) Σ_{s≠t} g_sᵀ g_t`` with a jackknife standard error;
* within-task alignment ``ḡ_{B1}·ḡ_{B2}`` over two disjoint random halves of each
  support set (an unbiased estimate of ‖E g‖² within the task), and its cosine.

Whether tasks pull together, and whether the meta-batch is big enough.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ._cost import Cost, documented_cost
from ._functional import (
    LossFn,
    ParamsLike,
    as_weights,
    device_of,
    explained_errors,
    to_vector,
    vector_slices,
    per_example_grads,
    per_example_loss,
    resolve_generator,
    resolve_method,
    split_tasks,
)
from .settings import DiagnosticSettings, diagnostic
from ._result import Diagnostic, DiagnosticGroup, loss_units
from .stats import conflict_rate, cosine_matrix, gradient_diversity, gsnr, unbiased_sq_norm_of_mean

__all__ = ["gradient_alignment", "task_gradients"]


def task_gradient_single(model: nn.Module, params: Dict[str, Tensor], x: Tensor, y: Tensor, lik: Any,
                         loss_fn: Optional[LossFn], generator: torch.Generator, bn_mode: str, method: str):
    """Task gradient (P,), and the two half-support mean gradients (P,), (P,)."""
    loss = per_example_loss(lik, loss_fn)
    with explained_errors(model, params, x, y, lik, bn_mode):
        G, out = per_example_grads(model, params, x, y, loss, bn_mode=bn_mode, method=method)
    if lik is not None:
        lik.check(out, y)
    Gf = to_vector(G, start_dim=1)
    n = Gf.shape[0]
    g = Gf.mean(0)
    if n < 2:
        return g, None, None
    perm = torch.randperm(n, generator=generator, device=generator.device).to(Gf.device)
    h = n // 2
    return g, Gf[perm[:h]].mean(0), Gf[perm[h:]].mean(0)


@documented_cost(
    where="tasks = M; with per_example='jacrev' (bn_mode='batch' on a BatchNorm model) backward is n·tasks.",
    default=Cost(forward="tasks", backward="tasks"),
)
@diagnostic("likelihood", "sigma", "num_classes", "seed", "bn_mode", "per_example")
def gradient_alignment(
    model: nn.Module,
    params: ParamsLike,
    x: Any,
    y: Any,
    *,
    loss_fn: Optional[LossFn] = None,
    unbiased_gsnr: bool = True,
    generator: Optional[torch.Generator] = None,
    settings: DiagnosticSettings,
) -> DiagnosticGroup:
    """Gradient alignment across and within tasks at ``params`` (θ, shared, or per task).

    Args:
        x, y: support sets of M ≥ 2 tasks: ``(M, n, ...)`` tensors or lists of per-task tensors.
        loss_fn: ``(out, y) -> mean loss`` (e.g. ``F.cross_entropy``); default the
            likelihood's mean NLL (nats).
        generator / seed: explicit RNG for the random support halves.

    Returns:
        group ``alignment/cosine_matrix`` (M×M), ``conflict_rate``, ``diversity``,
        ``gsnr`` (mean over parameters; ``by_layer``; ``details["per_parameter"]``),
        ``sq_norm_mean_grad`` (U-statistic, jackknife stderr and CI),
        ``within_task_dot`` and ``within_task_cosine`` (per task, CI).
    """
    lik = None if loss_fn is not None else settings.resolve_likelihood("gradient_alignment")
    p = as_weights(model, params)
    method = resolve_method(settings.per_example, model, settings.bn_mode)
    gen = resolve_generator(generator, settings.seed, device_of(p))
    M, views = split_tasks(model, {"p": p}, {"x": x, "y": y}, batched=True)
    if M is None or M < 2:
        raise ValueError("gradient_alignment needs at least 2 tasks (x, y with a leading task dimension)")
    rows, within_dot, within_cos = [], [], []
    for pt, d in views:
        g, g1, g2 = task_gradient_single(model, pt["p"], d["x"], d["y"], lik, loss_fn, gen, settings.bn_mode, method)
        rows.append(g)
        if g1 is not None:
            within_dot.append((g1 @ g2).item())
            den = (g1.norm() * g2.norm()).item()
            within_cos.append(max(-1.0, min(1.0, (g1 @ g2).item() / den)) if den > 0 else float("nan"))
    G = torch.stack(rows)
    return alignment_group(G, views[0][0]["p"], within_dot, within_cos, lik, loss_fn, settings.bn_mode, method,
                           unbiased_gsnr)


def alignment_group(G: Tensor, like: Dict[str, Tensor], within_dot: list, within_cos: list, lik: Any,
                    loss_fn: Any, bn_mode: str, method: str, unbiased_gsnr: bool = True) -> DiagnosticGroup:
    M = G.shape[0]
    sq_units = f"{loss_units(loss_fn)}^2/param^2"
    est = {"loss": "mean NLL, " + lik.describe() if lik is not None else "loss_fn", "gradients": "mean support loss",
           "bn_mode": bn_mode, "per_example": method, "tasks": M}
    group = DiagnosticGroup()
    C = cosine_matrix(G)
    group["alignment/cosine_matrix"] = Diagnostic("alignment/cosine_matrix", C, "1", est)
    group["alignment/conflict_rate"] = Diagnostic("alignment/conflict_rate", conflict_rate(C), "1",
                                                  {**est, "pairs": M * (M - 1) // 2})
    group["alignment/diversity"] = Diagnostic("alignment/diversity", gradient_diversity(G), "1", est)
    s = gsnr(G, unbiased=unbiased_gsnr)
    per_param = {k: s[v].reshape(like[k].shape) for k, v in vector_slices(like).items()}
    finite = lambda t: t[torch.isfinite(t)]  # noqa: E731
    gsnr_est = {**est, "numerator": "U-statistic (unbiased; may be < 0)" if unbiased_gsnr else "squared mean",
                "variance": "sample variance across tasks (ddof=1)", "summary": "mean over parameters with Var > 0"}
    group["alignment/gsnr"] = Diagnostic(
        "alignment/gsnr", finite(s).mean().item() if finite(s).numel() else float("nan"), "1", gsnr_est,
        by_layer={k: (finite(v).mean().item() if finite(v).numel() else float("nan")) for k, v in per_param.items()},
        details={"per_parameter": per_param})
    U, se = unbiased_sq_norm_of_mean(G)
    naive = G.mean(0).pow(2).sum().item()
    group["alignment/sq_norm_mean_grad"] = Diagnostic(
        "alignment/sq_norm_mean_grad", U, sq_units,
        {**est, "estimator": "U-statistic over task pairs (unbiased)", "stderr": "jackknife over tasks"},
        ci95=None if se is None else (U - 1.96 * se, U + 1.96 * se), stderr=se,
        details={"naive_sq_norm_of_mean": naive})
    if within_dot:
        west = {**est, "halves": "disjoint random halves of each support set (explicit generator)"}
        group["alignment/within_task_dot"] = Diagnostic.from_tasks("alignment/within_task_dot", within_dot, sq_units, west)
        group["alignment/within_task_cosine"] = Diagnostic.from_tasks("alignment/within_task_cosine", within_cos, "1", west)
    return group


@documented_cost(where="tasks = M.", default=Cost(forward="tasks", backward="tasks"))
@diagnostic("likelihood", "sigma", "num_classes", "bn_mode", "per_example")
def task_gradients(
    model: nn.Module,
    params: ParamsLike,
    x: Any,
    y: Any,
    *,
    loss_fn: Optional[LossFn] = None,
    settings: DiagnosticSettings,
) -> Tensor:
    """Stacked task gradients ``(M, P)`` of the mean loss (parameters flattened in ``named_parameters()`` order)."""
    lik = None if loss_fn is not None else settings.resolve_likelihood("task_gradients")
    p = as_weights(model, params)
    method = resolve_method(settings.per_example, model, settings.bn_mode)
    gen = resolve_generator(None, 0, device_of(p))
    _, views = split_tasks(model, {"p": p}, {"x": x, "y": y}, batched=True)
    return torch.stack([task_gradient_single(model, pt["p"], d["x"], d["y"], lik, loss_fn, gen, settings.bn_mode,
                                             method)[0]
                        for pt, d in views])
