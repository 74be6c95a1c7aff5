"""``diffopt bench`` results as markdown tables, JSON and PNG plots (matplotlib optional)."""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import _measure as common
from .measuring import _median, _peak
from .settings import MODES

MiB = 2**20


def _fmt_ms(summary: Mapping[str, Any] | None) -> str:
    if not summary or not summary.get("n"):
        return "n/a"
    median, iqr = summary["median"] * 1e3, summary["iqr"] * 1e3
    text = f"{median:.3g}" if median < 100 else f"{median:.0f}"
    return text + (f" ±{iqr / 2:.2g}" if summary["n"] > 1 else " (1 call)")


def _fmt_metric(metrics: Mapping[str, Any] | None, metric: str) -> str:
    if not metrics or metric not in metrics:
        return "n/a"
    m = metrics[metric]
    if metric == "accuracy":
        return f"{100 * m['mean']:.1f} ±{100 * m['ci95']:.1f}%"
    return f"{m['mean']:.3g} ±{m['ci95']:.2g}"


def _fmt_difference(d: Mapping[str, Any] | None, metric: str) -> str:
    if not d:
        return ""
    scale, unit = (100.0, " pt") if metric == "accuracy" else (1.0, "")
    mean = 0.0 if abs(d["mean"]) < 1e-6 else scale * d["mean"]  # float32 rounding of equal results
    return f"{mean:+.3g} ±{scale * d['ci95']:.2g}{unit}" + (" =" if d["matches"] else "")


def _cell_status(entry: Mapping[str, Any]) -> str | None:
    if "skipped" in entry:
        return "skipped"
    if "error" in entry:
        return "error"
    return None


def _ci(d: Mapping[str, Any] | None) -> str:
    if not d:
        return "n/a"
    ci = d.get("ci95")
    return f"{d['mean']:.3f}" + ("" if not ci else f" [{ci[0]:.3f}, {ci[1]:.3f}]")


def problem_markdown(name: str, entry: Mapping[str, Any], results: Mapping[str, Any]) -> str:
    table = common.markdown_table
    ks = sorted(entry["timing"], key=int)
    names = [n for n in results["implementations"] if any(n in entry["timing"][k] for k in ks)]
    parts = [f"## {name}: {entry['description']}"]
    if entry.get("vectorize_reason"):
        parts.append(f"Inner loop: {entry['vectorize_reason']}.")
    rows = []
    for n in names:
        row = [n]
        for k in ks:
            e = entry["timing"][k].get(n, {})
            status = _cell_status(e)
            row.append(status or f"{_fmt_ms(e.get('time'))} ({common.fmt_ratio(e.get('ratios', {}).get('plain'))})")
        rows.append(row)
    parts.append("Median ms per meta-step ±IQR/2 (ratio to the plain loop of the same order: first order to the "
                 "first-order loop, every other mode to the second-order loop):\n\n"
                 + table(["implementation"] + [f"K={k}" for k in ks], rows))
    notes: dict[str, list[str]] = {}
    for k in ks:
        for n in names:
            e = entry["timing"][k].get(n, {})
            why = e.get("skipped") or e.get("error") or e.get("note")
            if why:
                notes.setdefault(f"{n}: {why}" if "predicted" not in why else f"{n}: skipped above the time cap",
                                 []).append(k)
    if notes:
        parts.append("Skipped, failed or single-call cells:\n\n" + "\n".join(
            f"- {text} (K={', '.join(k)})" for text, k in notes.items()))
    unsolved = [(k, n, e["solve"]) for k in ks for n in names
                if (e := entry["timing"][k].get(n, {})).get("solve", {}).get("converged") is False]
    if unsolved:
        parts.append("Linear solves that did not converge (the implicit meta-gradient is off by about the relative "
                     "residual; raise --solver-iterations or --proximal, or choose another --solver):\n\n" + "\n".join(
                         f"- {n}, K={k}: {s['solver']} stopped after {s['iterations']} iterations at relative "
                         f"residual {s['relative_residual']:.3g}" for k, n, s in unsolved))
    unsettled = [(k, n, e["stationarity"]) for k, n in ((k, n) for k in ks for n in names)
                 if (e := entry["timing"][k].get(n, {})).get("stationarity", {}).get("relative_gradient_norm", 0) > 0.5]
    if unsettled:
        parts.append("Inner problems far from stationary (the implicit meta-gradient assumes a solved inner problem; "
                     "raise K, or change the inner learning rate if it oscillates or crawls):\n\n" + "\n".join(
                         f"- {n}, K={k}: the worst task's inner gradient norm is {s['relative_gradient_norm']:.2g} "
                         "times its value at the start" for k, n, s in unsettled))
    rows = []
    for n in names:
        if n.startswith(("higher", "torch.func")):
            continue
        row = [n]
        for k in ks:
            r = entry["timing"][k].get(n, {}).get("ratios", {})
            row.append(f"{common.fmt_ratio(r.get('higher'))} / {common.fmt_ratio(r.get('torch.func'))}")
        rows.append(row)
    parts.append("Time ratio to the higher loop / to torch.func vmap (same order):\n\n"
                 + table(["implementation"] + [f"K={k}" for k in ks], rows))
    if results["settings"]["memory"] != "off":
        rows = []
        for n in names:
            row = [n]
            for k in ks:
                e = entry["timing"][k].get(n, {})
                peak = _peak(e)
                status = _cell_status(e)
                row.append(status or ("n/a" if peak is None else
                                      f"{peak / MiB:.3g} ({common.fmt_ratio(e.get('memory_ratio'))})"))
            rows.append(row)
        parts.append("Peak tensor memory per meta-step, MiB (ratio to the plain loop of the same order):\n\n"
                     + table(["implementation"] + [f"K={k}" for k in ks], rows))
        rss = {(k, n): e["memory"]["rss_peak_bytes"] for k in ks for n in names
               if (e := entry["timing"][k].get(n, {})).get("memory", {}).get("rss_peak_bytes") is not None}
        if rss:  # --memory subprocess: the process's resident memory too (allocator caches, non-tensor buffers)
            rows = [[n] + [f"{rss[k, n] / MiB:.3g}" if (k, n) in rss else "n/a" for k in ks] for n in names]
            parts.append("Peak resident-memory (RSS) increase of the process per meta-step, MiB:\n\n"
                         + table(["implementation"] + [f"K={k}" for k in ks], rows))
    rows = []
    for n in names:
        row = [n]
        for k in ks:
            e = entry["timing"][k].get(n, {})
            v = e.get("vs_exact", {})
            row.append(_cell_status(e) or ("n/a" if v.get("cosine") is None else
                                           f"{v['cosine']:.3f} / {v['relative_error']:.2g}"))
        rows.append(row)
    parts.append("Meta-gradient of θ against the plain loop's second-order one on the same meta-batch, "
                 "cosine / relative error (float32; n/a: no gradient for θ, e.g. forward mode w.r.t. the "
                 "learning rate only):\n\n" + table(["implementation"] + [f"K={k}" for k in ks], rows))
    if entry.get("discrepancy"):
        rows = []
        for k in sorted(entry["discrepancy"], key=int):
            d = entry["discrepancy"][k]
            if "error" in d:
                rows.append([k, d["error"], "", "", ""])
                continue
            rows.append([k, _ci(d.get("cosine")), _ci(d.get("relative_error")),
                         "n/a" if "cosine_of_means" not in d else f"{d['cosine_of_means']['mean']:.3f}", d["tasks"]])
        parts.append("First- vs second-order meta-gradient discrepancy at the initial weights "
                     "(diffopt.diagnostics.metagradient_discrepancy; per-task mean [95% CI]):\n\n"
                     + table(["K", "cosine", "relative error", "cosine of task means", "tasks"], rows))
    for k, block in entry.get("accuracy", {}).items():
        metric = entry["metric"]
        rows = []
        for n, r in block["runs"].items():
            t, it = r.get("at_time_budget"), r.get("at_iteration_budget")
            paired = r.get("vs_second_order", {})
            rows.append([
                n, f"{r['seconds_per_iteration'] * 1e3:.3g}" if r.get("seconds_per_iteration") else "n/a",
                _fmt_metric(t["metrics"] if t else None, metric), t["iteration"] if t else "n/a",
                _fmt_difference(paired.get("at_time_budget"), metric),
                _fmt_metric(it["metrics"] if it else None, metric), f"{it['seconds']:.3g}" if it else "n/a",
                _fmt_difference(paired.get("at_iteration_budget"), metric),
                r.get("failure") or r.get("iteration_budget_missed") or "",
            ])
        unit = "accuracy" if metric == "accuracy" else "MSE"
        time_budget, iterations = f"{block['time_budget_s']:g} s", block["iteration_budget"]
        parts.append(
            f"Meta-test {unit} (mean ±95% CI over the test tasks, {k} test-time steps) after meta-training with "
            f"K={k}, all runs interleaved one meta-iteration at a time: at the time budget ({time_budget} of "
            f"meta-steps) and at the iteration budget ({iterations} meta-iterations); Δ: minus second order's "
            f"{unit} on the same test tasks (paired, mean ±95% CI; '=' where the interval contains 0). "
            f"Before training: "
            f"{_fmt_metric(block['initial'], metric)}.\n\n"
            + table(["implementation", "ms per iteration", f"{unit} at {time_budget}", "iterations done",
                     f"Δ at {time_budget}", f"{unit} at {iterations} iterations", "seconds to that",
                     f"Δ at {iterations} it.", "note"], rows))
        after = block.get("discrepancy_after_second_order_training")
        if after and "error" not in after:
            parts.append(f"Discrepancy at the weights second-order training reached (K={k}): cosine "
                         f"{_ci(after.get('cosine'))}, relative error {_ci(after.get('relative_error'))}.")
    return "\n\n".join(parts)


def _sample_text(min_sample_s: float) -> str:
    """How one time sample was taken (:class:`~diffopt.bench.settings.Settings` ``min_sample_s``)."""
    if not min_sample_s:
        return "one meta-step"
    return f"the mean of back-to-back meta-steps lasting ≥ {min_sample_s * 1e3:g} ms"


def markdown(results: Mapping[str, Any]) -> str:
    """The results as markdown: per problem time, ratios, memory, agreement, discrepancy, accuracy; targets."""
    info = results["machine"]
    s = results["settings"]
    parts = [f"# diffopt bench: modes against baselines\n\nMachine: {common.describe_machine(info)}.",
             f"Settings: threads {s['threads']}, repeats ≤ {s['repeats']} interleaved rounds per K "
             f"(≤ {s['block_budget_s']:g} s per K), each sample "
             f"{_sample_text(s.get('min_sample_s', 0.0))}, skipped when a meta-step is predicted over "
             f"{s['max_call_s']:g} s; "
             f"truncated window {'max(1, K//2)' if not s['truncate'] else s['truncate']}, checkpoint segment "
             f"{'⌈√K⌉' if not s['segment'] else s['segment']}, implicit proximal λ={s['proximal']} with "
             f"{s['solver_iterations']} {s.get('solver', 'cg')} iterations, forward mode w.r.t. the (tensor) inner learning rate only, "
             f"es/pes {s['es_samples']} antithetic pairs σ={s['es_sigma']:g}, pes truncation "
             f"min({s['pes_truncation']}, K).",
             f"Memory: {results['memory_method']}"]
    for name, entry in results["problems"].items():
        parts.append(problem_markdown(name, entry, results))
    if results.get("targets"):
        rows = [[t["target"], t["display"], {True: "met", False: "missed", None: "n/a"}[t["met"]]]
                for t in results["targets"]]
        parts.append("## Targets\n\n" + common.markdown_table(["target", "measured", ""], rows))
    return "\n\n".join(parts) + "\n"


def write_json(path: str | os.PathLike[str], results: Mapping[str, Any]) -> None:
    """Write ``results`` as standard JSON; an unmeasured or non-finite number is ``null``."""
    common.write_json(path, results)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.split(" ")[0]).strip("_") or "problem"


MATPLOTLIB_MISSING = "matplotlib is not installed: plots skipped (pip install matplotlib, or diffopt[plot])"


def plot(results: Mapping[str, Any], directory: str | os.PathLike[str], prefix: str = "modes") -> list[str]:
    """PNG plots per problem: time and memory against K, and the metric against training wall time.

    Returns the files written; without matplotlib returns ``[]`` after warning
    (:data:`MATPLOTLIB_MISSING`, a :class:`UserWarning`).
    """
    try:
        import matplotlib.ticker
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state is touched
    except ImportError:
        warnings.warn(MATPLOTLIB_MISSING, stacklevel=2)
        return []
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    colours = {name: f"C{i}" for i, name in enumerate(MODES)}
    styles = {"plain loop": ("black", "--"), "higher loop": ("grey", "-."), "torch.func vmap": ("tab:brown", ":"),
              "torchopt": ("tab:olive", "--")}
    for name, entry in results["problems"].items():
        ks = sorted(entry["timing"], key=int)
        fig = Figure(figsize=(12, 4.5))
        axes = fig.subplots(1, 2)
        for impl in results["implementations"]:
            xs, ts, ms = [], [], []
            for k in ks:
                e = entry["timing"][k].get(impl, {})
                if _median(e) is not None:
                    xs.append(int(k))
                    ts.append(_median(e) * 1e3)
                    ms.append((_peak(e) or float("nan")) / MiB)
            if not xs:
                continue
            if impl in MODES:
                style = {"color": colours[impl], "linestyle": "-", "marker": "o"}
            else:
                base, order = impl.rsplit(" ", 1)
                colour, line = styles.get(base, ("black", "--"))
                style = {"color": colour, "linestyle": line, "marker": "s" if order == "SO" else "^",
                         "alpha": 1.0 if order == "SO" else 0.6}
            axes[0].plot(xs, ts, label=impl, **style)
            if any(m == m for m in ms):
                axes[1].plot(xs, ms, label=impl, **style)
        if not axes[1].lines:
            axes[1].text(0.5, 0.5, "memory not measured", ha="center", va="center", transform=axes[1].transAxes)
        for ax, label in zip(axes, ("ms per meta-step (median)", "peak tensor memory, MiB")):
            if not ax.lines:
                continue
            ax.set_xscale("log")
            ax.set_xticks([int(k) for k in ks])
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_yscale("log")
            ax.set_xlabel("inner steps K")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        (axes[1] if axes[1].lines else axes[0]).legend(fontsize=7, ncol=2)
        fig.suptitle(f"{name}: time and memory per meta-step against K", fontsize=10)
        fig.tight_layout()
        path = directory / f"{prefix}_time_memory_{_slug(name)}.png"
        fig.savefig(path, dpi=110)
        written.append(str(path))
        if entry.get("accuracy"):
            blocks = entry["accuracy"]
            fig = Figure(figsize=(6 * len(blocks), 4.5))
            axes = fig.subplots(1, len(blocks), squeeze=False)
            metric = entry["metric"]
            for ax, (k, block) in zip(axes[0], blocks.items()):
                initial = block["initial"].get(metric, {}).get("mean")
                for impl, r in block["runs"].items():
                    pts = [p for p in r["points"] if p["kind"] == "time" and metric in p["metrics"]]
                    xs = [0.0] + [p["seconds"] for p in pts]
                    ys = [initial] + [p["metrics"][metric]["mean"] for p in pts]
                    es = [0.0] + [p["metrics"][metric]["ci95"] for p in pts]
                    if impl in MODES:
                        style = {"color": colours[impl], "linestyle": "-", "marker": "o"}
                    else:
                        colour, line = styles.get(impl, ("black", "--"))
                        style = {"color": colour, "linestyle": line, "marker": "s"}
                    ax.errorbar(xs, ys, yerr=es, label=impl, capsize=2, **style)
                ax.set_xlabel("meta-training wall time, s (meta-steps only)")
                ax.set_ylabel("meta-test accuracy" if metric == "accuracy" else "meta-test MSE")
                if metric != "accuracy":
                    ax.set_yscale("log")
                ax.set_title(f"K={k} (±95% CI over test tasks)", fontsize=9)
                ax.grid(True, alpha=0.3)
            axes[0][-1].legend(fontsize=7)
            fig.suptitle(f"{name}: meta-test {metric} against meta-training time", fontsize=10)
            fig.tight_layout()
            path = directory / f"{prefix}_accuracy_{_slug(name)}.png"
            fig.savefig(path, dpi=110)
            written.append(str(path))
    return written
