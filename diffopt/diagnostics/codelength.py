"""(5) Prequential (online) code length of the support set's labels, in bits.

Order the support set, split it into blocks ending at ``t_1 < t_2 < ... < t_K = n``;
code block 1 with θ and block k+1 with ``φ_k = adapt(θ, S[:t_k])`` (the model
adapted on all earlier blocks):

``L_preq = Σ_k Σ_{i ∈ block k} −log₂ p_{φ_{k−1}}(y_i|x_i)``  (φ_0 = θ).

Reported with ``L_θ = Σ_i −log₂ p_θ(y_i|x_i)`` (everything coded by the prior),
the savings ``L_θ − L_preq`` (bits of the labels the inner loop learns to
predict), ``L_unif = n log₂ N`` and the switch code ``min(L_preq, L_unif) + 1``
(classification only), averaged over random orderings with their spread.
``L_preq ≤ L_unif`` is *not* a theorem (a bad inner loop can do worse than
uniform); the switch code is ≤ ``L_unif + 1`` by construction.

For regression (Gaussian with declared σ) code lengths are differential
(−log₂ of a density) and ``L_unif``/switch are not reported.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._cost import Cost, documented_cost
from ._functional import (
    ParamsLike,
    as_weights,
    call_adapt,
    call_model,
    explained_errors,
    has_batchnorm,
    resolve_generator,
    split_tasks,
)
from .settings import DiagnosticSettings, diagnostic
from ._likelihood import Likelihood
from ._result import LN2, Diagnostic, DiagnosticGroup

__all__ = ["prequential_code_length", "block_ends"]


def block_ends(n: int, blocks: Union[None, int, Sequence[int]] = None, first: int = 1) -> List[int]:
    """Block end positions ``t_1 < … < t_K = n``.

    ``None``: doubling ``first, 2·first, 4·first, ..., n``; an int ``K``: K
    near-equal blocks; a sequence: the given ends (``n`` appended if missing).
    """
    if n < 1:
        raise ValueError("the support set is empty")
    if blocks is None:
        ends, t = [], max(1, int(first))
        while t < n:
            ends.append(t)
            t *= 2
        return ends + [n]
    if isinstance(blocks, int):
        if not 1 <= blocks <= n:
            raise ValueError(f"blocks must be between 1 and n={n}, got {blocks}")
        ends = sorted({math.ceil(n * (k + 1) / blocks) for k in range(blocks)})
        return ends
    ends = [int(t) for t in blocks]
    if not ends or ends[-1] != n:
        ends = ends + [n]
    if any(b <= a for a, b in zip([0] + ends, ends)) or ends[-1] > n:
        raise ValueError(f"block ends must increase strictly within (0, n={n}], got {list(blocks)}")
    return ends


def first_block(model: nn.Module, bn_mode: str) -> int:
    """Default first block size: 2 when BatchNorm uses batch statistics (adapting on one example fails)."""
    return 2 if bn_mode == "batch" and has_batchnorm(model) else 1


def prequential_single(
    model: nn.Module,
    theta: Dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    adapt: Callable,
    lik: Likelihood,
    ends: List[int],
    perm: Tensor,
    bn_mode: str = "eval",
) -> Dict[str, Any]:
    """Code lengths (bits) for one ordering ``perm`` of one task's support set."""
    xs, ys = x[perm], y[perm]
    theta = {k: v.detach() for k, v in theta.items()}
    with torch.no_grad(), explained_errors(model, theta, xs, ys, lik, bn_mode):
        out = call_model(model, theta, xs, bn_mode)
        lik.check(out, ys)
        nll_theta = lik.nll(out, ys)
    code = nll_theta.clone()
    starts = [0] + ends[:-1]
    for s, e in zip(starts[1:], ends[1:]):
        phi = call_adapt(adapt, theta, xs[:s], ys[:s])
        with torch.no_grad():
            nll = lik.nll(call_model(model, {k: v.detach() for k, v in phi.items()}, xs, bn_mode), ys)
        code[s:e] = nll[s:e]
    n = xs.shape[0]
    L_preq = code.sum().item() / LN2
    L_theta = nll_theta.sum().item() / LN2
    vals: Dict[str, Any] = {
        "code/L_preq": L_preq,
        "code/L_theta": L_theta,
        "code/savings": L_theta - L_preq,
        "block_bits": [code[s:e].sum().item() / LN2 for s, e in zip(starts, ends)],
        "per_example_bits": code / LN2,
    }
    if lik.categorical:
        N = out.shape[-1]
        L_unif = n * math.log2(N)
        vals["code/L_unif"] = L_unif
        vals["code/switch"] = min(L_preq, L_unif) + 1.0
    return vals


@documented_cost(
    where="blocks = K, orderings = number of orderings, tasks = 1 when nothing is task-batched; "
    "adapt_forward / adapt_backward = forwards / diffopt-recorded backwards of one adapt call "
    "(steps / steps for sgd_adapt).",
    default=Cost(
        forward="tasks*orderings*(blocks + (blocks-1)*adapt_forward)",
        backward="tasks*orderings*(blocks-1)*adapt_backward",
        adapt="tasks*orderings*(blocks-1)",
    ),
)
@diagnostic("seed", "likelihood", "sigma", "num_classes", "bn_mode", "batched")
def prequential_code_length(
    model: nn.Module,
    theta: ParamsLike,
    x: Any,
    y: Any,
    adapt: Callable,
    *,
    blocks: Union[None, int, Sequence[int]] = None,
    orderings: int = 1,
    shuffle: bool = True,
    generator: Optional[torch.Generator] = None,
    settings: DiagnosticSettings,
) -> DiagnosticGroup:
    """Prequential code length of the support labels under θ plus the inner loop ``adapt``, in bits.

    Args:
        x, y: the support set(s); a leading task dimension (or lists) for several tasks.
        adapt: ``adapt(params, x, y) -> params``, called on detached θ and each
            prefix ``S[:t_k]`` (the engine's inner loop, or :func:`sgd_adapt`).
        blocks: block ends (see :func:`block_ends`; default doubling 1, 2, 4, ..., n, or 2, 4, ..., n
            when BatchNorm uses batch statistics, ``bn_mode="batch"``).
        orderings: number of orderings averaged; with ``shuffle=True`` each is a
            random permutation from ``generator`` (or a fresh one seeded with
            ``seed``); with ``shuffle=False`` the given order is used once.

    Every model (θ and each φ_k) is evaluated on the whole (permuted) support
    input and the entries of its block are kept, so with an adapt that returns
    θ unchanged (lr = 0) ``L_preq == L_θ`` exactly.

    Returns:
        group ``code/L_preq``, ``code/L_theta``, ``code/savings``, and for
        classification ``code/L_unif``, ``code/switch`` — means over orderings
        (and tasks); ``details`` hold the per-ordering values, their sd, and the
        bits of each block.
    """
    lik = settings.resolve_likelihood("prequential_code_length")
    if not shuffle:
        orderings = 1
    if orderings < 1:
        raise ValueError("orderings must be >= 1")
    th = as_weights(model, theta)
    gen = resolve_generator(generator, settings.seed, "cpu")
    T, views = split_tasks(model, {"theta": th}, {"x": x, "y": y}, settings.batched)
    per_task: List[Dict[str, Any]] = []
    for p, d in views:
        n = d["x"].shape[0]
        ends = block_ends(n, blocks, first_block(model, settings.bn_mode))
        runs = []
        for _ in range(orderings):
            perm = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
            runs.append(prequential_single(model, p["theta"], d["x"], d["y"], adapt, lik, ends,
                                           perm.to(d["x"].device), settings.bn_mode))
        per_task.append({"ends": ends, "runs": runs})
    est = {"likelihood": lik.describe(), "labels": "support labels from data", "orderings": orderings,
           "ordering": "random permutations (explicit generator)" if shuffle else "as given",
           "blocks": per_task[0]["ends"] if len({str(t["ends"]) for t in per_task}) == 1 else "per task",
           "first block coded by": "theta", "bn_mode": settings.bn_mode, "adapt": repr(adapt)}
    return code_group(per_task, T, est)


def code_group(per_task: List[Dict[str, Any]], T: Optional[int], est: Dict[str, Any]) -> DiagnosticGroup:
    keys = [k for k in per_task[0]["runs"][0] if k.startswith("code/")]
    group = DiagnosticGroup()
    for k in keys:
        means, sds, all_runs = [], [], []
        for t in per_task:
            v = torch.tensor([r[k] for r in t["runs"]], dtype=torch.float64)
            means.append(v.mean().item())
            sds.append(v.std(unbiased=True).item() if v.numel() > 1 else 0.0)
            all_runs.append(v)
        details = {"per_ordering": all_runs if T is not None else all_runs[0],
                   "sd_over_orderings": sds if T is not None else sds[0]}
        if k == "code/L_preq":
            details["block_bits"] = [t["runs"][0]["block_bits"] for t in per_task] if T is not None \
                else per_task[0]["runs"][0]["block_bits"]
        if T is None:
            group[k] = Diagnostic(k, means[0], "bits", dict(est), details=details)
        else:
            group[k] = Diagnostic.from_tasks(k, means, "bits", est, details=details)
    return group
