"""All diagnostics over a batch of tasks: :func:`diagnose_adaptation` and its :class:`Report`.

``diagnose_adaptation(model, theta, adapt, tasks)`` adapts θ on each task's
support set with ``adapt(params, x, y) -> params`` and computes every requested
diagnostic with per-task values and 95% confidence intervals across tasks.
When the adaptation can be stepped (``inner_steps=K`` with ``adapt`` being one
inner step, an ``adapt`` with ``.step`` and ``.steps`` like :func:`sgd_adapt`, or
one with ``.trajectory(params, x, y) -> [θ, φ_1, ..., φ_K]`` and ``.steps`` for
inner loops that carry optimizer state or per-step rates across steps), the cheap
diagnostics are also recorded after every inner step (``report.steps``).

:func:`diffopt.diagnostics.diagnose` wraps this for meta-learners (model, θ and
the adaptation taken from the learner's own inner loop).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._functional import (
    LossFn,
    ParamsLike,
    as_weights,
    call_adapt,
    evaluation,
    resolve_generator,
    resolve_method,
    device_of,
)
from .settings import REPORT, DiagnosticSettings, with_settings
from ._result import Diagnostic, DiagnosticGroup, _jsonable, loss_units
from .alignment import alignment_group, task_gradient_single
from .codelength import block_ends, code_group, first_block, prequential_single
from .curvature import curvature_group, curvature_single
from .entropy import bald_single, entropy_single
from .fisher import fisher_estimator, fisher_result, fisher_single, weight_information_result, weight_information_terms
from .kl import aggregate, kl_estimator, kl_single
from .metagrad import metagrad_group, metagradients_single
from .representation import default_layers, representation_single

__all__ = ["diagnose_adaptation", "Report", "DIAGNOSTICS", "plot_history"]

DIAGNOSTICS = ("kl", "entropy", "bald", "fisher", "weight_information", "alignment", "prequential",
               "representation", "curvature", "metagrad")
STEPWISE = ("kl", "entropy", "weight_information", "representation")

Task = Tuple[Tensor, Tensor, Tensor, Tensor]


def normalize_tasks(tasks: Any) -> List[Task]:
    """Tasks as a list of ``(x_support, y_support, x_query, y_query)``.

    Accepts a 4-tuple of tensors with a leading task dimension, a sequence of
    per-task 4-tuples or dicts (keys ``x_support``, ``y_support``, ``x_query``,
    ``y_query``), or objects with those attributes.
    """
    keys = ("x_support", "y_support", "x_query", "y_query")
    if isinstance(tasks, Mapping):
        tasks = tuple(tasks[k] for k in keys)
    if isinstance(tasks, (tuple, list)) and len(tasks) == 4 and all(isinstance(t, Tensor) for t in tasks):
        T = tasks[0].shape[0]
        if any(t.shape[0] != T for t in tasks):
            raise ValueError("batched tasks: every tensor needs the same leading task dimension")
        return [tuple(t[i] for t in tasks) for i in range(T)]  # type: ignore[misc]
    out = []
    for task in tasks:
        if isinstance(task, Mapping):
            out.append(tuple(task[k] for k in keys))
        elif isinstance(task, (tuple, list)) and len(task) == 4:
            out.append(tuple(task))
        elif all(hasattr(task, k) for k in keys):
            out.append(tuple(getattr(task, k) for k in keys))
        else:
            raise TypeError("each task must be (x_support, y_support, x_query, y_query), a dict or an object "
                            "with those names")
    if not out:
        raise ValueError("no tasks")
    return out  # type: ignore[return-value]


class Report(DiagnosticGroup):
    """Diagnostics of adaptation over a batch of tasks.

    A mapping ``name -> Diagnostic`` (final values, means over tasks with 95%
    CIs), plus ``steps`` (``name -> [Diagnostic at inner step 0, 1, ...]``),
    ``settings`` and ``skipped`` (diagnostic -> reason).
    """

    def __init__(self, results: Mapping[str, Diagnostic] = (), steps: Optional[Dict[str, List[Diagnostic]]] = None,
                 settings: Optional[Dict[str, Any]] = None, skipped: Optional[Dict[str, str]] = None) -> None:
        super().__init__(results)
        self.steps = steps or {}
        self.settings = settings or {}
        self.skipped = skipped or {}

    def to_table(self, max_estimator_width: int = 60) -> str:
        parts = [DiagnosticGroup.to_table(self, max_estimator_width)]
        notes = self.settings.get("notes")
        if notes:
            parts.insert(0, "\n".join(f"note: {n}" for n in notes))
        if self.steps:
            K = max(len(v) for v in self.steps.values())
            header = ["per inner step"] + [f"step {k}" for k in range(K)]
            rows = [[key] + [f"{float(d.value):.4g}" for d in ds] for key, ds in self.steps.items()]
            widths = [max(len(r[i]) if i < len(r) else 0 for r in [header] + rows) for i in range(len(header))]
            fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
            parts.append("\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]))
        if self.skipped:
            parts.append("\n".join(f"skipped {k}: {v}" for k, v in self.skipped.items()))
        return "\n\n".join(parts)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "results": DiagnosticGroup.to_dict(self),
            "steps": {k: [d.to_dict() for d in v] for k, v in self.steps.items()},
            "settings": _jsonable(self.settings),
            "skipped": dict(self.skipped),
        }

    def plot(self, path: str, keys: Optional[Sequence[str]] = None) -> str:
        """Save a figure: each per-step quantity over inner steps (mean ± 95% CI across tasks);
        without per-step values, a bar chart of the scalar diagnostics. Needs matplotlib."""
        plt = _pyplot()
        if self.steps:
            keys = list(keys or self.steps)
            cols = min(4, len(keys))
            rows = math.ceil(len(keys) / cols)
            fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
            for ax, key in zip(axes.flat, keys):
                ds = self.steps[key]
                ks = list(range(len(ds)))
                ax.plot(ks, [float(d.value) for d in ds], marker="o")
                if all(d.ci95 is not None for d in ds):
                    ax.fill_between(ks, [d.ci95[0] for d in ds], [d.ci95[1] for d in ds], alpha=0.25)
                ax.set_title(key, fontsize=9)
                ax.set_xlabel("inner step")
                ax.set_ylabel(ds[0].units)
            for ax in list(axes.flat)[len(keys):]:
                ax.axis("off")
        else:
            items = [(k, d) for k, d in self.items() if not (isinstance(d.value, Tensor) and d.value.numel() > 1)]
            if keys is not None:
                items = [(k, d) for k, d in items if k in keys]
            fig, ax = plt.subplots(figsize=(8, 0.3 * len(items) + 1))
            ax.barh([k for k, _ in items], [float(d.value) for _, d in items],
                    xerr=[0 if d.stderr is None else 1.96 * d.stderr for _, d in items])
            ax.invert_yaxis()
            ax.set_xlabel("value (units in the table)")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting diagnostics needs matplotlib: pip install 'diffopt[plot]' "
                          "(or pip install matplotlib); to_table() and to_json() work without it") from exc
    return plt


def plot_history(reports: Sequence[Report], path: str, keys: Optional[Sequence[str]] = None,
                 x: Optional[Sequence[float]] = None, xlabel: str = "meta-iteration") -> str:
    """Plot scalar diagnostics over meta-training: one report per point (e.g. every k meta-steps)."""
    plt = _pyplot()
    x = list(x) if x is not None else list(range(len(reports)))
    keys = list(keys or [k for k, d in reports[0].items() if not isinstance(d.value, Tensor)])
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        ds = [r[key] for r in reports]
        ax.plot(x, [float(d.value) for d in ds], marker="o")
        if all(d.ci95 is not None for d in ds):
            ax.fill_between(x, [d.ci95[0] for d in ds], [d.ci95[1] for d in ds], alpha=0.25)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(xlabel)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def choose_diagnostics(which: Optional[Sequence[str]], categorical: bool, tasks: int,
                       unavailable: Optional[Mapping[str, str]] = None) -> Tuple[List[str], Dict[str, str]]:
    """``(chosen, skipped)``: ``which`` checked against :data:`DIAGNOSTICS`, or (``which=None``) every
    diagnostic that applies, with the reason each other one was left out (BALD needs categorical
    predictions, alignment two tasks; ``unavailable`` maps others to their reason)."""
    if which is not None:
        unknown = [w for w in which if w not in DIAGNOSTICS]
        if unknown:
            raise ValueError(f"unknown diagnostics {unknown}; choose among {DIAGNOSTICS}")
        return list(which), {}
    skipped: Dict[str, str] = {}
    if not categorical:
        skipped["bald"] = "categorical predictions only"
    if tasks < 2:
        skipped["alignment"] = "needs at least 2 tasks"
    skipped.update(unavailable or {})
    return [w for w in DIAGNOSTICS if w not in skipped], skipped


def _detached(p: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    return {k: v.detach() for k, v in p.items()}


@with_settings(*REPORT)
def diagnose_adaptation(
    model: nn.Module,
    theta: ParamsLike,
    adapt: Callable,
    tasks: Any,
    *,
    which: Optional[Sequence[str]] = None,
    inner_steps: Optional[int] = None,
    lr: Optional[float] = None,
    loss_fn: Optional[LossFn] = None,
    settings: DiagnosticSettings,
) -> Report:
    """Compute the diagnostics of adaptation for a batch of tasks.

    Args:
        model: the network (evaluated functionally; its weights, buffers and
            training flags are left as they were, and the global RNG stream too).
        theta: the meta-learned initialisation (dict/list, or None for the module's parameters).
        adapt: ``adapt(params, x, y) -> params``, the inner loop (e.g. the engine's,
            or :func:`sgd_adapt`). Called on detached weights, except for
            ``"metagrad"`` where it must be differentiable. With ``inner_steps=K``
            it is one inner step, applied K times.
        tasks: ``(x_support, y_support, x_query, y_query)`` with a leading task
            dimension, or a sequence of per-task tuples/dicts.
        which: a subset of :data:`DIAGNOSTICS` (default: all that apply: BALD needs
            classification, alignment at least 2 tasks).
        settings: a :class:`~diffopt.diagnostics.DiagnosticSettings` (every field but
            ``batched``); each field may also be given as a keyword argument
            (``sigma=0.5``, ``orderings=4``), which overrides it.
        lr: inner learning rate for the stability ratio (default ``adapt.lr`` if present).
        loss_fn: inner loss ``(out, y) -> mean loss`` for curvature, alignment and
            meta-gradients; default the likelihood's mean NLL.

    Settings read here (see :class:`~diffopt.diagnostics.DiagnosticSettings`):
        likelihood, sigma, num_classes, bn_mode, per_example: scoring and evaluation.
        prior_precision: λ of the prior 𝒩(θ, λ⁻¹I) in the weight information (3b).
        fisher_kind: ``"true"``, ``"empirical"`` or ``"mc"`` for Fisher and 3b.
        orderings, blocks: prequential code settings.
        bald_members: bootstrap resamples of the support set adapted on for BALD.
        power_iters, power_tol: Lanczos iterations and residual tolerance for λ_max (curvature's iters, tol).
        hutchinson_samples: Rademacher probes for the curvature's tr H.
        seed: seeds the one explicit generator used for all sampling.

    Returns:
        a :class:`Report` (``.to_table()``, ``.to_json()``, ``.plot(path)``).

    Cost: the sum of the chosen diagnostics' costs (see each function) plus the
    adapt calls: one per task (K steps when stepped), ``bald_members`` per task,
    ``orderings·(blocks−1)`` per task for the code length, one per task for metagrad.
    """
    lik = settings.resolve_likelihood("diagnose_adaptation")
    bn_mode = settings.bn_mode
    task_list = normalize_tasks(tasks)
    T = len(task_list)
    chosen, skipped = choose_diagnostics(which, lik.categorical, T)
    if "alignment" in chosen and T < 2:
        raise ValueError("'alignment' needs at least 2 tasks")
    th = _detached(as_weights(model, theta))
    gen = resolve_generator(None, settings.seed, device_of(th))
    method = resolve_method(settings.per_example, model, bn_mode)
    trajectory = None
    if inner_steps is not None:
        step_fn, K = adapt, int(inner_steps)
    elif callable(getattr(adapt, "trajectory", None)) and isinstance(getattr(adapt, "steps", None), int):
        # an adaptation that keeps its own state across steps (optimizer state, per-step rates) gives the
        # whole trajectory [φ_0 = θ, φ_1, ..., φ_K] in one call
        step_fn, K, trajectory = None, adapt.steps, adapt.trajectory
    elif callable(getattr(adapt, "step", None)) and isinstance(getattr(adapt, "steps", None), int):
        step_fn, K = adapt.step, adapt.steps
    else:
        step_fn, K = None, None
    stepped = step_fn is not None or trajectory is not None
    lr_used = lr if lr is not None else getattr(adapt, "lr", None)
    layer_names = list(settings.layers) if settings.layers is not None else default_layers(model)

    def full_adapt(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Dict[str, Tensor]:
        if inner_steps is None:
            return call_adapt(adapt, p, x, y)
        for _ in range(K):  # type: ignore[arg-type]
            p = call_adapt(step_fn, p, x, y)  # type: ignore[arg-type]
        return p

    full_adapt.counts_itself = True  # type: ignore[attr-defined]

    recorded = {"tasks": T, "likelihood": lik.describe(), "bn_mode": bn_mode, "seed": settings.seed, "which": chosen,
                "inner_steps": K, "adapt": repr(adapt), "fisher_kind": settings.fisher_kind, "lr": lr_used,
                "prior_precision": settings.prior_precision}
    results = DiagnosticGroup()
    steps: Dict[str, List[Diagnostic]] = {}
    with evaluation(model, bn_mode):
        # trajectories θ = φ_0, φ_1, ..., φ_K (or θ, φ)
        trajs = []
        for xs, ys, _, _ in task_list:
            if trajectory is not None:
                points = trajectory(dict(th), xs, ys)
                if len(points) != K + 1:  # type: ignore[operator]
                    raise ValueError(f"adapt.trajectory returned {len(points)} points for steps={K}; it must "
                                     "return [theta, phi_1, ..., phi_K]")
                traj = [th] + [_detached({n: dict(pt)[n] for n in th}) for pt in points[1:]]
            elif step_fn is not None:
                traj, p = [th], th
                for _ in range(K):  # type: ignore[arg-type]
                    p = _detached(call_adapt(step_fn, p, xs, ys))
                    traj.append(p)
            else:
                traj = [th, _detached(call_adapt(adapt, th, xs, ys))]
            trajs.append(traj)
        n_points = len(trajs[0])

        def stepwise(name: str, fn: Callable[[int, int], Dict[str, float]], units: Any, est: Dict[str, Any],
                     make: Optional[Callable] = None) -> None:
            per_step = []
            for k in range(n_points):
                vals = [fn(t, k) for t in range(T)]
                group = make(vals) if make else aggregate(vals, T, units, est)
                per_step.append(group)
            for key in per_step[-1]:
                results[key] = per_step[-1][key]
                if stepped:
                    steps[key] = [g[key] for g in per_step]

        if "kl" in chosen:
            stepwise("kl", lambda t, k: kl_single(model, th, trajs[t][k], task_list[t][2], lik, bn_mode), "nats",
                     kl_estimator(lik, bn_mode, "mean"))
        if "entropy" in chosen:
            est = {"likelihood": lik.describe(), "reduction": "mean over query examples", "bn_mode": bn_mode,
                   "labels": "query labels from data (cross-entropy)"}
            stepwise("entropy", lambda t, k: entropy_single(model, th, trajs[t][k], task_list[t][2], task_list[t][3],
                                                            lik, bn_mode), "nats", est)
        if "weight_information" in chosen:
            fest = fisher_estimator(lik, settings.fisher_kind, settings.fisher_samples, bn_mode, method)
            est = {"posterior": "Laplace, diagonal Fisher at phi on the support set",
                   "prior_precision": float(settings.prior_precision), **{f"fisher_{k}": v for k, v in fest.items()}}

            def wi(t: int, k: int) -> Dict[str, float]:
                xs, ys = task_list[t][0], task_list[t][1]
                dg, _ = fisher_single(model, trajs[t][k], xs, ys, lik, settings.fisher_kind,
                                      samples=settings.fisher_samples,
                                      generator=gen, bn_mode=bn_mode, method=method)
                return weight_information_terms(th, trajs[t][k], dg, xs.shape[0], settings.prior_precision)

            stepwise("weight_information", wi, "nats", est,
                     make=lambda vals: DiagnosticGroup({"weight_information": weight_information_result(vals, T, est)}))
        if "representation" in chosen:
            est = {"features": "outputs of " + ", ".join(l or "<model>" for l in layer_names),
                   "cka": "linear, centred", "erank": "exp entropy of normalised singular values", "bn_mode": bn_mode}
            stepwise("representation", lambda t, k: representation_single(model, th, trajs[t][k], task_list[t][2],
                                                                           layer_names, bn_mode), "1", est)
        if "bald" in chosen:
            vals = []
            for xs, ys, xq, _ in task_list:
                n = xs.shape[0]
                members = []
                for _ in range(settings.bald_members):
                    idx = torch.randint(0, n, (n,), generator=gen, device=gen.device).to(xs.device)
                    members.append(_detached(full_adapt(th, xs[idx], ys[idx])))
                vals.append(bald_single(model, members, xq, lik, bn_mode))
            results.update(aggregate(vals, T, "nats", {"likelihood": lik.describe(), "members": settings.bald_members,
                                                        "members from": "adapt on bootstrap resamples of the support set",
                                                        "reduction": "mean over query inputs", "bn_mode": bn_mode}))
        if "fisher" in chosen:
            fest = fisher_estimator(lik, settings.fisher_kind, settings.fisher_samples, bn_mode, method)
            for label, idx in (("theta", 0), ("phi", -1)):
                diags = []
                for t, (xs, ys, _, _) in enumerate(task_list):
                    dg, _ = fisher_single(model, trajs[t][idx], xs, ys, lik, settings.fisher_kind,
                                          samples=settings.fisher_samples,
                                          generator=gen, bn_mode=bn_mode, method=method)
                    diags.append(dg)
                name = f"fisher_{label}/trace"
                results[name] = fisher_result(diags, [None] * T, T, {**fest, "at": label, "inputs": "support"}, name)
        if "alignment" in chosen:
            rows, wd, wc = [], [], []
            for xs, ys, _, _ in task_list:
                g, g1, g2 = task_gradient_single(model, th, xs, ys, None if loss_fn else lik, loss_fn, gen, bn_mode,
                                                 method)
                rows.append(g)
                if g1 is not None:
                    wd.append((g1 @ g2).item())
                    den = (g1.norm() * g2.norm()).item()
                    wc.append(max(-1.0, min(1.0, (g1 @ g2).item() / den)) if den > 0 else float("nan"))
            results.update(alignment_group(torch.stack(rows), th, wd, wc, None if loss_fn else lik, loss_fn, bn_mode,
                                           method))
        if "prequential" in chosen:
            per_task = []
            for xs, ys, _, _ in task_list:
                n = xs.shape[0]
                ends = block_ends(n, settings.blocks, first_block(model, bn_mode))
                runs = [prequential_single(model, th, xs, ys, full_adapt, lik, ends,
                                           torch.randperm(n, generator=gen, device=gen.device).to(xs.device), bn_mode)
                        for _ in range(settings.orderings)]
                per_task.append({"ends": ends, "runs": runs})
            results.update(code_group(per_task, T, {"likelihood": lik.describe(), "orderings": settings.orderings,
                                                    "ordering": "random permutations (explicit generator)",
                                                    "labels": "support labels from data", "bn_mode": bn_mode}))
        if "curvature" in chosen:
            vals = [curvature_single(model, th, xs, ys, None if loss_fn else lik, loss_fn, lr_used,
                                     settings.power_iters, settings.power_tol, settings.hutchinson_samples, gen,
                                     bn_mode)
                    for xs, ys, _, _ in task_list]
            results.update(curvature_group(vals, T, f"{loss_units(loss_fn)}/param^2",
                                           {"iterations": settings.power_iters, "tol": settings.power_tol,
                                            "lr": lr_used,
                                            "hutchinson_samples": settings.hutchinson_samples, "bn_mode": bn_mode},
                                           ("power_iters", "power_tol")))
        if "metagrad" in chosen:
            pairs = [metagradients_single(model, th, xs, ys, xq, yq, full_adapt, None if loss_fn else lik, loss_fn,
                                          bn_mode) for xs, ys, xq, yq in task_list]
            results.update(metagrad_group(pairs, T, {"adapt": repr(adapt), "bn_mode": bn_mode}, loss_fn))
    ordered = Report({k: results[k] for k in results}, steps, recorded, skipped)
    return ordered
