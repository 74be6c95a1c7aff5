"""Diagnostics of adaptation over meta-training: MAML, first-order MAML and ANIL on two task families.

For each (family, algorithm) the learner is meta-trained with diffopt's Trainer and a
``diffopt.diagnostics.DiagnosticsCallback`` that runs ``diagnose`` every ``--every``
meta-iterations on a fixed set of held-out test tasks (the same tasks throughout),
plus once before training (iteration 0). Recorded (mean and 95% CI across tasks):

* adaptation KL(p_φ‖p_θ) on the query set (nats per query point) and the query
  cross-entropy gained ΔCE;
* prequential code length of the support labels: savings L_θ − L_preq (bits);
* true-Fisher trace on the support set at θ and at φ, and the information written
  into the weights I_w (Laplace, λ = 1), per layer;
* first- vs second-order meta-gradient cosine; stability ratio ρ = lr·λ_max;
* linear CKA between θ- and φ-features per layer (feature reuse vs rapid learning).

Before and after training, the *whole network's* true-Fisher trace per layer at θ
and φ is computed for every learner (for ANIL: body and head, φ = adapted head on
the meta-learned body), to see where the task information lands, and a two-block
prequential code (first half of the support set coded by θ, second half by the
model adapted on the first half) next to the default doubling schedule.

Families (``diffopt train`` protocols, shortened):

* ``sinusoid``: MAML's sinusoid regression, 1-40-40-1 ReLU MLP, K=10 support / 10
  query points in training, 1 inner SGD step with lr 0.01, meta-batch 10, Adam 1e-3;
  test tasks: 5 support, 100 query points; Gaussian likelihood with declared σ = 0.5;
* ``synthetic``: ``diffopt.tasks.synthetic_vectors`` 5-way 1-shot (``--synthetic-shots``),
  15 query points, 32-64-64-5 ReLU MLP, 1 inner step with lr 0.4, meta-batch 8, Adam 1e-3.

    python benchmarks/diagnostics_study.py [--quick] [--json PATH] [--plots DIR] [--synthetic-shots K]

The full run takes about 4 minutes on 2 shared cores (``--quick``: under a minute).

Writes ``diagnostics_<family>.png`` (quantities over meta-training),
``diagnostics_fisher_layers.png`` (where the Fisher lands) and
``diagnostics_inner_steps.png`` (MAML on sinusoid after training, 10 test-time
steps) into ``--plots`` (default: benchmarks/).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common  # noqa: E402

import diffopt.diagnostics as dg  # noqa: E402
from diffopt.recipes import EpisodeSource, SinusoidSource, make_learner, mlp_classifier, sinusoid_mlp  # noqa: E402
from diffopt.tasks import synthetic_vectors  # noqa: E402
from diffopt.training import Trainer, evaluate  # noqa: E402

FAMILIES = ("sinusoid", "synthetic")
ALGORITHMS = ("maml", "fomaml", "anil")
NAMES = {"maml": "MAML", "fomaml": "FOMAML", "anil": "ANIL"}
SIGMA = 0.5
WHICH = ["kl", "entropy", "fisher", "weight_information", "prequential", "representation", "curvature", "metagrad"]
TRACKED = [
    ("kl/forward", "adaptation KL (nats/query point)"),
    ("cross_entropy/delta", "query CE gained (nats/point)"),
    ("code/savings", "code-length savings (bits/support set)"),
    ("fisher_theta/trace", "Fisher trace at θ"),
    ("fisher_phi/trace", "Fisher trace at φ"),
    ("weight_information", "information in weights I_w (nats)"),
    ("metagrad/cosine", "cos(first-, second-order meta-grad)"),
    ("curvature/stability_ratio", "stability ratio ρ = lr·λ_max"),
]


LOG_SCALE = ("kl/forward", "cross_entropy/delta", "code/savings", "weight_information", "fisher_theta/trace",
             "fisher_phi/trace")


def build(family: str, algo: str, seed: int, test_tasks: int, shots: int = 1) -> tuple[Any, Any, float | None]:
    torch.manual_seed(seed)
    if family == "sinusoid":
        source = SinusoidSource(meta_batch=10, shots=10, query=10, test_tasks=test_tasks, test_shots=5,
                                test_query=100)
        model = sinusoid_mlp()
        learner = make_learner(algo, model, classification=False, inner_lr=0.01, inner_steps=1)
        return learner, source, SIGMA
    data = synthetic_vectors(seed=seed)
    train, test = data.split([0.7, 0.3], seed=seed)
    source = EpisodeSource(train, test, meta_batch=8, ways=5, shots=shots, query=15, test_tasks=test_tasks,
                           name="synthetic")
    learner = make_learner(algo, mlp_classifier(train.example_shape[0], 5), classification=True, ways=5,
                           inner_lr=0.4, inner_steps=1)
    return learner, source, None


def whole_network(learner: Any) -> tuple[nn.Module, Dict[str, str]]:
    """The full network and, for ANIL, the map head-parameter name -> name in the full network."""
    if hasattr(learner, "head"):
        whole = nn.Sequential(learner.body, learner.head)
        return whole, {n: f"1.{n}" for n, _ in learner.head.named_parameters()}
    return learner.model, {n: n for n, _ in learner.model.named_parameters()}


def whole_fisher(learner: Any, tasks: List[tuple], sigma: float | None) -> Dict[str, Any]:
    """True-Fisher trace per layer of the whole network on the support sets, at θ and at φ (mean over tasks)."""
    whole, mapping = whole_network(learner)
    theta = {n: p.detach() for n, p in whole.named_parameters()}
    adapt = dg.LoopAdapt(learner.loop)
    lik = dict(likelihood="gaussian", sigma=sigma) if sigma is not None else {}
    phis = []
    with torch.no_grad():
        for xs, ys, _, _ in tasks:
            inner = {n: p.detach() for n, p in learner.loop.model.named_parameters()}
            phi_inner = adapt(inner, learner.inputs(xs.unsqueeze(0))[0], ys)
            phi = dict(theta)
            phi.update({mapping[n]: v for n, v in phi_inner.items()})
            phis.append(phi)
    xs = torch.stack([t[0] for t in tasks])
    out = {}
    for label, params in (("theta", theta), ("phi", {n: torch.stack([p[n] for p in phis]) for n in theta})):
        d = dg.fisher_information(whole, params, xs, kind="true", batched=True, **lik)
        out[label] = {"total": float(d.value), "by_layer": {k: float(v) for k, v in d.by_layer.items()}}
    head = [mapping[n] for n in mapping] if hasattr(learner, "head") else [list(theta)[-2], list(theta)[-1]]
    for label in ("theta", "phi"):
        layers = out[label]["by_layer"]
        out[label]["last_layer_share"] = sum(layers[k] for k in head) / out[label]["total"]
    return out


def half_code(learner: Any, tasks: List[tuple], sigma: float | None, seed: int) -> Dict[str, Any]:
    """A two-block prequential code: the first half of the (shuffled) support set coded by θ, the second half
    by the model adapted on the first half — the inner loop on a support set of half the size it was trained
    for, instead of the doubling schedule's 1, 2, 4, ... example prefixes."""
    n = tasks[0][0].shape[0]
    rep = dg.diagnose(learner, tasks, which=["prequential"], sigma=sigma, blocks=[n // 2], orderings=4, seed=seed)
    out = {"blocks": [n // 2, n]}
    for key in ("code/savings", "code/L_preq", "code/L_theta", "code/L_unif"):
        if key in rep:
            d = rep[key]
            out[key] = {"value": float(d.value), "ci95": list(d.ci95) if d.ci95 else None}
    return out


def run_one(family: str, algo: str, args: argparse.Namespace) -> Dict[str, Any]:
    learner, source, sigma = build(family, algo, args.seed, args.tasks, args.synthetic_shots)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    callback = dg.DiagnosticsCallback(source, every=args.every, which=WHICH, tasks=args.tasks, sigma=sigma,
                                      orderings=2, power_iters=20, hutchinson_samples=0, layers=True,
                                      seed=args.seed)
    started = time.perf_counter()
    callback.record(learner, 0)
    fisher_start = whole_fisher(learner, callback.task_list, sigma)
    half_start = half_code(learner, callback.task_list, sigma, args.seed)
    steps = (0, 1)
    trainer = Trainer(learner, source, optimizer, iterations=args.iterations[family], seed=args.seed,
                      log_every=args.every, eval_every=args.every, eval_steps=steps, callbacks=[callback],
                      progress=False)
    start_eval = evaluate(learner, source.test_batches(), steps)
    trainer.fit()
    fisher_end = whole_fisher(learner, callback.task_list, sigma)
    half_end = half_code(learner, callback.task_list, sigma, args.seed)
    seconds = time.perf_counter() - started
    history = []
    for iteration, report in callback.history:
        row: Dict[str, Any] = {"iteration": iteration}
        for key, _ in TRACKED:
            if key in report:
                d = report[key]
                row[key] = {"value": float(d.value), "ci95": list(d.ci95) if d.ci95 else None}
        for key in ("code/L_preq", "code/L_theta", "code/L_unif"):
            if key in report:
                row[key] = {"value": float(report[key].value), "ci95": list(report[key].ci95) if report[key].ci95 else None}
        row["cka"] = {k.split("/", 1)[1]: float(d.value) for k, d in report.items() if k.startswith("cka/")}
        row["weight_information_by_layer"] = dict(report["weight_information"].by_layer or {})
        history.append(row)
    evals = [{"iteration": 0, "eval": start_eval}] + [r for r in trainer.history if "eval" in r]
    metric = "accuracy" if family == "synthetic" else "loss"
    test = [{"iteration": r["iteration"], **{k: v["mean"] for k, v in r["eval"][metric].items()}} for r in evals]
    inner_report = None
    if family == "sinusoid" and algo == "maml":
        inner_report = dg.diagnose(learner, callback.task_list, sigma=sigma, steps=10,
                                   which=["kl", "entropy", "weight_information", "representation"])
    label = family if family == "sinusoid" or args.synthetic_shots == 1 else f"{family}-{args.synthetic_shots}shot"
    return {"family": family, "label": label, "algo": algo, "seconds": seconds, "history": history, "test": test,
            "test_metric": metric, "fisher_start": fisher_start, "fisher_end": fisher_end,
            "half_code_start": half_start, "half_code_end": half_end,
            "notes": callback.history[-1][1].settings.get("notes", []), "inner_report": inner_report}


def fmt(entry: Dict[str, Any] | None, digits: int = 3) -> str:
    if entry is None:
        return "—"
    v, ci = entry["value"], entry["ci95"]
    if ci is None:
        return f"{v:.{digits}g}"
    return f"{v:.{digits}g} ± {(ci[1] - ci[0]) / 2:.2g}"


def plots(results: List[Dict[str, Any]], folder: Path) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plots; pip install 'diffopt[plot]')")
        return []
    saved = []
    colours = {"maml": "tab:blue", "fomaml": "tab:orange", "anil": "tab:green"}
    for family in FAMILIES:
        runs = [r for r in results if r["family"] == family]
        if not runs:
            continue
        fig, axes = plt.subplots(2, 5, figsize=(19, 6.6))
        panels = TRACKED + [("test", "test " + runs[0]["test_metric"] + " after 1 step"), ("cka", "CKA θ vs φ, last layer")]
        for ax, (key, title) in zip(axes.flat, panels):
            for r in runs:
                xs = [h["iteration"] for h in r["history"]]
                if key == "test":
                    ax.plot([t["iteration"] for t in r["test"]], [t["1"] for t in r["test"]], marker="o",
                            color=colours[r["algo"]], label=NAMES[r["algo"]])
                    continue
                if key == "cka":
                    last = list(r["history"][0]["cka"])[-1]
                    ax.plot(xs, [h["cka"][last] for h in r["history"]], marker="o", color=colours[r["algo"]],
                            label=NAMES[r["algo"]])
                    continue
                if key not in r["history"][-1]:
                    continue
                ys = [h[key]["value"] for h in r["history"]]
                ax.plot(xs, ys, marker="o", color=colours[r["algo"]], label=NAMES[r["algo"]])
                cis = [h[key]["ci95"] for h in r["history"]]
                if all(c is not None for c in cis):
                    ax.fill_between(xs, [c[0] for c in cis], [c[1] for c in cis], color=colours[r["algo"]], alpha=0.2)
            spread = [abs(h[key]["value"]) for r in runs for h in r["history"] if key in LOG_SCALE and key in h]
            if key in LOG_SCALE and spread and max(spread) > 50:
                ax.set_yscale("symlog", linthresh=1.0)  # one run far above the others: keep both readable
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("meta-iteration", fontsize=8)
            ax.tick_params(labelsize=7)
        axes.flat[0].legend(fontsize=8)
        fig.suptitle(f"diagnostics over meta-training, {runs[0]['label']} (mean ± 95% CI across the same held-out tasks at "
                     "every checkpoint; ANIL: head over body features)", fontsize=10)
        fig.tight_layout()
        path = folder / f"diagnostics_{runs[0]['label']}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        saved.append(str(path))
    # where the Fisher lands: share of the whole network's Fisher trace per layer, at phi, end of training
    present = [f for f in FAMILIES if any(r["family"] == f and r["algo"] in ("maml", "anil") for r in results)]
    fig, axes = plt.subplots(1, max(len(present), 1), figsize=(6 * max(len(present), 1), 3.6), squeeze=False)
    for ax, family in zip(axes.flat, present):
        runs = [r for r in results if r["family"] == family and r["algo"] in ("maml", "anil")]
        width = 0.38
        for j, r in enumerate(runs):
            layers = r["fisher_end"]["phi"]["by_layer"]
            weights = [k for k in layers if k.endswith("weight")]
            total = r["fisher_end"]["phi"]["total"]
            shares = [(layers[k] + layers.get(k[:-6] + "bias", 0.0)) / total for k in weights]
            ax.bar([i + (j - 0.5) * width for i in range(len(weights))], shares, width,
                   color=colours[r["algo"]], label=NAMES[r["algo"]])
        ax.set_xticks(range(len(weights)))
        ax.set_xticklabels([f"layer {i + 1}" for i in range(len(weights))])
        ax.set_ylabel("share of Fisher trace at φ")
        ax.set_title(f"{runs[0]['label']}: where the Fisher lands (whole network)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    labels = sorted({r["label"] for r in results if r["family"] == "synthetic"})
    path = folder / ("diagnostics_fisher_layers.png" if labels in ([], ["synthetic"]) else
                     f"diagnostics_fisher_layers_{labels[0]}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    saved.append(str(path))
    for r in results:
        if r["inner_report"] is not None:
            path = folder / "diagnostics_inner_steps.png"
            r["inner_report"].plot(str(path), keys=["kl/forward", "cross_entropy/delta", "weight_information",
                                                    "cka/4"])
            saved.append(str(path))
    return saved


def main(argv: List[str] | None = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _common.add_common_arguments(parser)
    parser.add_argument("--iterations", type=int, default=None, help="meta-iterations per run (both families)")
    parser.add_argument("--every", type=int, default=None, help="diagnose every n meta-iterations")
    parser.add_argument("--tasks", type=int, default=None, help="held-out tasks diagnosed at every checkpoint")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--plots", default=None,
                        help="folder for the PNG files (default benchmarks/; with --quick no plots unless given)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--synthetic-shots", type=int, default=1, help="shots of the synthetic family (protocol: 1)")
    args = parser.parse_args(argv)
    _common.set_threads(args.threads)
    default_iters = {"sinusoid": 300, "synthetic": 300} if args.quick else {"sinusoid": 3000, "synthetic": 1500}
    args.iterations = {f: args.iterations or default_iters[f] for f in FAMILIES}
    args.every = args.every or (100 if args.quick else 300)
    args.tasks = args.tasks or (10 if args.quick else 25)
    info = _common.machine_info()
    began = time.perf_counter()
    print(f"# diagnostics over meta-training\n\n{_common.describe_machine(info)}\n{_common.command_line()}\n"
          f"seed {args.seed}; iterations {args.iterations}; diagnostics every {args.every}; {args.tasks} fixed "
          f"held-out tasks; sinusoid sigma = {SIGMA}\n")
    results = []
    for family in args.families:
        for algo in args.algorithms:
            r = run_one(family, algo, args)
            results.append(r)
            first, last = r["history"][0], r["history"][-1]
            print(f"{r['label']:9s} {NAMES[algo]:7s} {r['seconds']:6.1f} s; " + "; ".join(
                f"{key}: {fmt(first.get(key))} -> {fmt(last.get(key))}" for key, _ in TRACKED[:3]))
    rows = []
    for r in results:
        first, last = r["history"][0], r["history"][-1]
        t1 = r["test"][-1]
        rows.append([r["label"], NAMES[r["algo"]], f"{r['test_metric']} {t1['0']:.3g} / {t1['1']:.3g}",
                     f"{fmt(first['kl/forward'])} → {fmt(last['kl/forward'])}",
                     f"{fmt(first['code/savings'])} → {fmt(last['code/savings'])}",
                     f"{fmt(last['fisher_theta/trace'])} / {fmt(last['fisher_phi/trace'])}",
                     f"{fmt(first['weight_information'])} → {fmt(last['weight_information'])}",
                     fmt(last.get("metagrad/cosine"), 4), fmt(last.get("curvature/stability_ratio")),
                     f"{r['fisher_end']['phi']['last_layer_share']:.2f}",
                     ", ".join(f"{v:.3f}" for v in last["cka"].values()),
                     " / ".join(f"{last[k]['value']:.4g}" for k in ("code/L_theta", "code/L_preq", "code/L_unif")
                                if k in last),
                     f"{fmt(r['half_code_start']['code/savings'])} → {fmt(r['half_code_end']['code/savings'])}"])
    print()
    print(_common.markdown_table(
        ["family", "learner", "test (0 / 1 step)", "KL start → end (nats)", "code savings start → end (bits)",
         "Fisher tr θ / φ (end)", "I_w start → end (nats)", "cos(g¹, g²) end", "ρ end",
         "last-layer Fisher share (φ)", "CKA per layer (end)", "L_θ / L_preq / L_unif end (bits)",
         "half/half code savings start → end (bits)"], rows))
    payload = {"machine": info, "command": _common.command_line(), "seed": args.seed, "sigma": SIGMA,
               "synthetic_shots": args.synthetic_shots, "seconds": time.perf_counter() - began,
               "iterations": args.iterations, "every": args.every, "tasks": args.tasks,
               "results": [{k: v for k, v in r.items() if k != "inner_report"} for r in results]}
    _common.write_json(args.json, payload)
    folder = args.plots or (None if args.quick else str(Path(__file__).resolve().parent))
    saved = [] if args.no_plots or folder is None else plots(results, Path(folder))
    if saved:
        print("\nplots: " + ", ".join(saved))
    print(f"\ntotal {time.perf_counter() - began:.0f} s wall-clock")
    return payload


if __name__ == "__main__":
    main()
