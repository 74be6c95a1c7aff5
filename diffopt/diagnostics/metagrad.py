"""(8) First- vs second-order meta-gradient.

For each task, with ``φ = U(θ; S)`` the adapted weights and ``L_Q`` the mean
query loss:

* second order ``g² = ∇_θ L_Q(U(θ; S))`` (backpropagation through the inner loop);
* first order ``g¹ = ∇_φ L_Q(φ)`` (the Jacobian ``∂φ/∂θ`` replaced by the identity).

For one SGD step ``g² = (I − lr·H_S(θ)) g¹``. Reported: the cosine and the
relative error ``‖g¹ − g²‖/‖g²‖`` per task (mean and CI across tasks), the cosine
of the task-mean meta-gradients, and the variance of each across tasks (sum of
per-parameter sample variances) — what dropping second derivatives costs.

The adaptation is either a callable ``adapt(params, x, y) -> params`` that is
differentiable (builds its steps with ``create_graph=True`` when the given
weights require grad, as :func:`sgd_adapt` does), or — with ``adapt=None`` —
``steps`` steps of plain SGD with learning rate ``lr`` done here.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _cost
from ._cost import Cost, count_costs, documented_cost
from ._functional import (
    LossFn,
    ParamsLike,
    SecondOrderUnavailable,
    as_weights,
    call_adapt,
    call_model,
    check_twice_differentiable,
    explained_errors,
    to_vector,
    differentiable_copies,
    mean_loss,
    second_order_fix,
    split_tasks,
)
from .settings import DiagnosticSettings, diagnostic
from ._result import Diagnostic, DiagnosticGroup, loss_units

__all__ = ["metagradient_discrepancy", "metagradients"]


def metagradients_single(model: nn.Module, theta: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor,
                         yq: Tensor, adapt: Callable, lik: Any, loss_fn: Optional[LossFn],
                         bn_mode: str = "eval") -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """``(g¹, g²)`` for one task as dicts ``name -> tensor``."""
    loss = mean_loss(lik, loss_fn)
    th = differentiable_copies(theta)
    names = list(th)
    with torch.enable_grad():
        with count_costs() as inner:
            phi = call_adapt(adapt, th, xs, ys)
        with explained_errors(model, theta, xq, yq, lik, bn_mode):
            out = call_model(model, phi, xq, bn_mode)
        if lik is not None:
            lik.check(out, yq)
            if lik.categorical:
                lik.check(out, ys)  # support labels against the head size
        lq = loss(out, yq)
        check_twice_differentiable([lq], "the second-order meta-gradient")
        if not lq.requires_grad:
            raise RuntimeError("the query loss does not depend on θ through adapt: adapt must return weights "
                               "computed from the given ones with autograd enabled (see sgd_adapt)")
        try:
            g2 = torch.autograd.grad(lq, [th[n] for n in names], allow_unused=True)
        except RuntimeError as exc:
            raise SecondOrderUnavailable(second_order_fix("the second-order meta-gradient", str(exc).splitlines()[0])) from exc
        # backprop through the unrolled loop: one backward plus one HVP per graph-building inner gradient
        _cost.record(backward=1, hvp=inner.graph_backward)
        g2d = {n: (torch.zeros_like(th[n]) if g is None else g.detach()) for n, g in zip(names, g2)}
        phd = differentiable_copies({n: phi[n] for n in names})
        outd = call_model(model, phd, xq, bn_mode)
        g1 = torch.autograd.grad(loss(outd, yq), [phd[n] for n in names], allow_unused=True)
        _cost.record(backward=1)
        g1d = {n: (torch.zeros_like(phd[n]) if g is None else g.detach()) for n, g in zip(names, g1)}
    return g1d, g2d


def _resolve_adapt(model: nn.Module, adapt: Optional[Callable], lr: Optional[float], steps: int, lik: Any,
                   loss_fn: Optional[LossFn], bn_mode: str) -> Callable:
    if adapt is not None:
        return adapt
    if lr is None:
        raise ValueError("metagradient diagnostics need the adaptation: pass adapt=callable, or lr= (and steps=) "
                         "for plain SGD done here")
    from ._functional import SGDAdapt

    return SGDAdapt(model, lr, steps, loss_fn=loss_fn, likelihood=lik, bn_mode=bn_mode)


@documented_cost(
    where="steps = inner SGD steps when adapt is None; adapt_forward / adapt_backward = forwards / "
    "diffopt-recorded backwards of one adapt call.",
    sgd=Cost(forward="steps+2", backward="steps+2", hvp="steps", adapt="1"),
    callable=Cost(forward="adapt_forward+2", backward="adapt_backward+2", hvp="adapt_backward", adapt="1"),
)
@diagnostic("likelihood", "sigma", "num_classes", "bn_mode")
def metagradients(
    model: nn.Module,
    theta: ParamsLike,
    x_support: Tensor,
    y_support: Tensor,
    x_query: Tensor,
    y_query: Tensor,
    *,
    adapt: Optional[Callable] = None,
    lr: Optional[float] = None,
    steps: int = 1,
    loss_fn: Optional[LossFn] = None,
    settings: DiagnosticSettings,
) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """First- and second-order meta-gradients ``(g¹, g²)`` of one task (dicts ``name -> tensor``)."""
    lik = None if loss_fn is not None else settings.resolve_likelihood("metagradients")
    fn = _resolve_adapt(model, adapt, lr, steps, lik, loss_fn, settings.bn_mode)
    return metagradients_single(model, as_weights(model, theta), x_support, y_support, x_query, y_query, fn, lik,
                                loss_fn, settings.bn_mode)


def compare_single(g1: Dict[str, Tensor], g2: Dict[str, Tensor]) -> Dict[str, float]:
    a, b = to_vector(g1).to(torch.float64), to_vector(g2).to(torch.float64)
    na, nb = a.norm().item(), b.norm().item()
    cos = max(-1.0, min(1.0, (a @ b).item() / (na * nb))) if na > 0 and nb > 0 else (1.0 if na == nb == 0 else float("nan"))
    rel = (a - b).norm().item() / nb if nb > 0 else (0.0 if na == 0 else float("inf"))
    return {"metagrad/cosine": cos, "metagrad/relative_error": rel}


@documented_cost(
    where="tasks = 1 when nothing is task-batched; steps = inner SGD steps when adapt is None; "
    "adapt_forward / adapt_backward = forwards / diffopt-recorded backwards of one adapt call.",
    sgd=Cost(forward="tasks*(steps+2)", backward="tasks*(steps+2)", hvp="tasks*steps", adapt="tasks"),
    callable=Cost(forward="tasks*(adapt_forward+2)", backward="tasks*(adapt_backward+2)", hvp="tasks*adapt_backward",
                  adapt="tasks"),
)
@diagnostic("likelihood", "sigma", "num_classes", "bn_mode", "batched")
def metagradient_discrepancy(
    model: nn.Module,
    theta: ParamsLike,
    x_support: Any,
    y_support: Any,
    x_query: Any,
    y_query: Any,
    *,
    adapt: Optional[Callable] = None,
    lr: Optional[float] = None,
    steps: int = 1,
    loss_fn: Optional[LossFn] = None,
    settings: DiagnosticSettings,
) -> DiagnosticGroup:
    """Cosine and relative error between first- and second-order meta-gradients, and their spread over tasks.

    Args:
        adapt: differentiable ``adapt(params, x, y) -> params``; or ``None`` with ``lr``
            and ``steps`` for plain SGD on the mean support loss done here (``sgd_adapt``).
        loss_fn: ``(out, y) -> mean loss`` for both inner and query losses of the
            internal SGD (and the query loss with a callable adapt); default mean NLL.

    Returns:
        group ``metagrad/cosine`` and ``metagrad/relative_error`` (per task, CI),
        and for several tasks ``metagrad/cosine_of_means``, ``metagrad/variance_first_order``,
        ``metagrad/variance_second_order`` (sum over parameters of the sample variance across tasks).

    Raises:
        SecondOrderUnavailable: the loss cannot be differentiated twice (message names the fix).
    """
    lik = None if loss_fn is not None else settings.resolve_likelihood("metagradient_discrepancy")
    fn = _resolve_adapt(model, adapt, lr, steps, lik, loss_fn, settings.bn_mode)
    th = as_weights(model, theta)
    T, views = split_tasks(model, {"theta": th},
                           {"xs": x_support, "ys": y_support, "xq": x_query, "yq": y_query}, settings.batched)
    pairs = [metagradients_single(model, p["theta"], d["xs"], d["ys"], d["xq"], d["yq"], fn, lik, loss_fn,
                                  settings.bn_mode)
             for p, d in views]
    est = {"adapt": repr(fn) if adapt is not None else f"SGD lr={lr} steps={steps} (internal)",
           "loss": "mean NLL, " + lik.describe() if lik is not None else "loss_fn", "bn_mode": settings.bn_mode,
           "second_order": "reverse mode through the unrolled adaptation", "first_order": "gradient at phi"}
    return metagrad_group(pairs, T, est, loss_fn)


def metagrad_group(pairs: List[Tuple[Dict[str, Tensor], Dict[str, Tensor]]], T: Optional[int],
                   est: Dict[str, Any], loss_fn: Optional[LossFn]) -> DiagnosticGroup:
    """The meta-gradient comparisons; the variances are in (query-loss units)²/param², nats² for the
    likelihood's NLL (``loss_fn=None``), as :func:`~diffopt.diagnostics.gradient_alignment` labels them."""
    vals = [compare_single(g1, g2) for g1, g2 in pairs]
    group = DiagnosticGroup()
    for key in vals[0]:
        if T is None:
            group[key] = Diagnostic(key, vals[0][key], "1", dict(est))
        else:
            group[key] = Diagnostic.from_tasks(key, [v[key] for v in vals], "1", est)
    if T is not None and T >= 2:
        G1 = torch.stack([to_vector(g1) for g1, _ in pairs]).to(torch.float64)
        G2 = torch.stack([to_vector(g2) for _, g2 in pairs]).to(torch.float64)
        cm = compare_single({"g": G1.mean(0)}, {"g": G2.mean(0)})["metagrad/cosine"]
        group["metagrad/cosine_of_means"] = Diagnostic("metagrad/cosine_of_means", cm, "1", dict(est))
        units = f"{loss_units(loss_fn)}^2/param^2"
        group["metagrad/variance_first_order"] = Diagnostic(
            "metagrad/variance_first_order", G1.var(0, unbiased=True).sum().item(), units,
            {**est, "variance": "sum over parameters of the sample variance across tasks (ddof=1)"})
        group["metagrad/variance_second_order"] = Diagnostic(
            "metagrad/variance_second_order", G2.var(0, unbiased=True).sum().item(), units,
            {**est, "variance": "sum over parameters of the sample variance across tasks (ddof=1)"})
    return group
