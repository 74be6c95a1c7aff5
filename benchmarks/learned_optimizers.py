"""Learned optimizers against tuned SGD, Adam and hypergradient descent (issue: learned update rules).

Training family: a ReLU MLP 1-20-20-1 trained from scratch, full batch, on 20
points of a MAML sinusoid ``A·sin(x − b)`` (``SinusoidFamily``). The learned
rules (the per-coordinate MLP and the coordinate-wise LSTM of
``diffopt.optim.learned``) are meta-trained on it with truncated unrolls:
horizon T steps in truncations of k, a meta-update per truncation,
first-order meta-gradients (Andrychowicz et al.), mean log training loss over
the steps as meta-objective. Every ``val_every`` meta-iterations the rule is
scored on validation tasks of the training split (never the test tasks) and
the best snapshot is kept.

Baselines, each tuned on the same validation tasks by the mean training loss
at step T over a small grid: SGD (lr), Adam (lr), SGD-HD and Adam-HD (α₀ and
β of Baydin et al., 2018).

Evaluation: the training loss of fresh optimizees on held-out tasks (the test
split, several evaluation seeds) after T, 2T and 4T steps — T is the trained
horizon, beyond it the learned rules run outside what they were trained on.
Also on a task *outside* the family: an MLP classifier 8-16-10 (cross-entropy)
on 10-way 30-shot episodes of ``synthetic_vectors`` (8 dimensions, 4 informative,
overlapping classes: 300 examples it cannot fit exactly), baselines re-tuned on
that family's training classes; the learned rules are used as trained.

Reported: mean ± 95% CI (Student t over tasks, t₀.₉₇₅ · sample sd / √n, pooled over evaluation seeds
and training seeds) of the training loss, the mean log₁₀ loss, and the paired
mean log₁₀(L_rule / L_Adam) on the same tasks with its CI (< 0: better than
tuned Adam). A diverged optimizee counts as loss = inf (then the mean is inf).

    python benchmarks/learned_optimizers.py [--quick] [--json PATH] [--plot PATH] [--markdown PATH]
"""
from __future__ import annotations

import argparse
import copy
import itertools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import command_line, describe_machine, machine_info, markdown_table, write_json  # noqa: E402

import diffopt.optim.learned as L  # noqa: E402
from diffopt.optim import SGD, Adam  # noqa: E402
from diffopt.tasks import mean_ci95  # noqa: E402

FULL = {
    "T": 40, "k": 10, "meta_batch": 8, "val_every": 10, "val_tasks": 32,
    "rules": {"mlp": {"iterations": 100, "meta_lr": 1e-2, "options": {"hidden": [16, 16], "lr": 1e-2}},
              "lstm": {"iterations": 50, "meta_lr": 1e-2, "options": {"hidden_size": 20, "layers": 2}}},
    "train_seeds": 2, "eval_seeds": 3, "eval_tasks": 50, "horizons": (1, 2, 4),
}
QUICK = {
    "T": 20, "k": 10, "meta_batch": 8, "val_every": 5, "val_tasks": 16,
    "rules": {"mlp": {"iterations": 30, "meta_lr": 1e-2, "options": {"hidden": [16, 16], "lr": 1e-2}},
              "lstm": {"iterations": 15, "meta_lr": 1e-2, "options": {"hidden_size": 20, "layers": 2}}},
    "train_seeds": 1, "eval_seeds": 1, "eval_tasks": 40, "horizons": (1, 2),
}
GRIDS = {
    "SGD": [{"lr": v} for v in (0.01, 0.03, 0.1, 0.3)],
    "Adam": [{"lr": v} for v in (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)],
    "SGD-HD": [{"lr": a, "hyper_lr": b} for a, b in itertools.product((0.01, 0.03, 0.1), (1e-4, 1e-3, 1e-2))],
    "Adam-HD": [{"lr": a, "hyper_lr": b} for a, b in itertools.product((3e-3, 1e-2, 3e-2, 0.1), (1e-4, 1e-3, 1e-2))],
}
BASELINES: dict[str, Callable[..., Any]] = {
    "SGD": lambda p, **hp: SGD(p, **hp),
    "Adam": lambda p, **hp: Adam(p, **hp),
    "SGD-HD": lambda p, **hp: L.HypergradientSGD(p, **hp),
    "Adam-HD": lambda p, **hp: L.HypergradientAdam(p, **hp),
}
LABELS = {"mlp": "learned MLP", "lstm": "learned LSTM"}


def families() -> dict[str, L.TaskFamily]:
    return {"sinusoid": L.SinusoidFamily(hidden=(20, 20), points=20, eval_points=20),
            "synthetic (outside)": L.FewShotFamily(ways=10, shots=30, query=5, hidden=(16,), dim=8, informative_dim=4,
                                                   within=1.0)}


def final_train_loss(opt_factory, family: L.TaskFamily, tasks: L.TaskBatch, steps: int) -> torch.Tensor:
    model = family.model()
    return L.loss_curves(opt_factory(model.parameters()), model, family, tasks, steps, held_out=False)["train"]


def tune(name: str, family: L.TaskFamily, tasks: L.TaskBatch, T: int) -> tuple[dict[str, Any], list]:
    scores = []
    for hp in GRIDS[name]:
        curve = final_train_loss(lambda p, hp=hp: BASELINES[name](p, **hp), family, tasks, T)
        scores.append((float(curve[T].mean()), hp))
    best = min(scores, key=lambda s: (math.isnan(s[0]), s[0]))
    return best[1], scores


def meta_train(rule: str, spec: dict[str, Any], cfg: dict[str, Any], seed: int, family: L.TaskFamily,
               val: L.TaskBatch, progress: bool) -> tuple[Any, list[dict[str, Any]], float]:
    config = L.TrainConfig(rule=rule, task="sinusoid", unroll=cfg["T"], truncation=cfg["k"],
                           iterations=spec["iterations"], meta_batch=cfg["meta_batch"], meta_lr=spec["meta_lr"],
                           mode="first_order", objective="log", seed=seed, rule_options=dict(spec["options"]),
                           task_options={"hidden": [20, 20], "points": 20, "eval_points": 20})
    trainer = L.OptimizerTrainer(config, progress=progress)
    best: dict[str, Any] = {"score": math.inf, "iteration": -1, "rule": None}
    log: list[dict[str, Any]] = []

    def validate(tr: L.OptimizerTrainer, record: dict[str, Any] | None) -> None:
        model = family.model()
        curve = L.loss_curves(L.transfer(tr.optimizer, model.parameters()), model, family, val, cfg["T"],
                              held_out=False)["train"]
        score = float(curve[cfg["T"]].mean())
        log.append({"iteration": tr.iteration, "val_final_loss": score,
                    "objective": None if record is None else record["objective"]})
        if score < best["score"]:
            best.update(score=score, iteration=tr.iteration, rule=copy.deepcopy(tr.optimizer))

    started = time.perf_counter()
    validate(trainer, None)
    trainer.fit(lambda tr, rec: validate(tr, rec) if tr.iteration % cfg["val_every"] == 0 else None)
    elapsed = time.perf_counter() - started
    log.append({"selected_iteration": best["iteration"], "selected_val_loss": best["score"]})
    return best["rule"], log, elapsed


def summarize(losses: torch.Tensor, adam: torch.Tensor) -> dict[str, Any]:
    finite = torch.isfinite(losses)
    mean, half = mean_ci95(losses) if bool(finite.all()) else (math.inf, math.nan)
    log10 = torch.log10(losses.clamp_min(1e-30))
    log_mean, log_half = mean_ci95(log10) if bool(finite.all()) else (math.inf, math.nan)
    ratio = log10 - torch.log10(adam.clamp_min(1e-30))
    paired, paired_half = mean_ci95(ratio) if bool(finite.all() and torch.isfinite(adam).all()) else (math.nan, math.nan)
    wins = float((losses < adam).double().mean())
    return {"mean": mean, "ci95": half, "median": float(losses.median()), "log10_mean": log_mean, "log10_ci95": log_half,
            "paired_log10_vs_adam": paired, "paired_ci95": paired_half, "fraction_better_than_adam": wins,
            "diverged": int((~finite).sum())}


def fmt(stats: dict[str, Any]) -> str:
    if not math.isfinite(stats["mean"]):
        return f"{stats['diverged']} diverged (median {stats['median']:.3g})"
    return f"{stats['mean']:.3g} ± {stats['ci95']:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (about 2 minutes)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the results section as Markdown")
    parser.add_argument("--plot", metavar="PATH", default=None, help="PNG of the loss curves (needs matplotlib)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rules", default="mlp,lstm", help="learned rules to train (comma-separated)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    T = cfg["T"]
    horizons = [h * T for h in cfg["horizons"]]
    steps = max(horizons)
    info = machine_info()
    started = time.perf_counter()
    fams = families()
    results: dict[str, Any] = {"machine": info, "command": command_line(), "config": {**cfg, "grids": GRIDS},
                               "families": {}, "training": {}}

    # 1. tune baselines on validation tasks of each family's training split
    tuned: dict[str, dict[str, Any]] = {}
    for fname, family in fams.items():
        val = family.sample(cfg["val_tasks"], torch.Generator().manual_seed(10_000), "train")
        tuned[fname] = {}
        for name in BASELINES:
            hp, scores = tune(name, family, val, T)
            tuned[fname][name] = hp
            results["families"].setdefault(fname, {}).setdefault("tuning", {})[name] = {
                "best": hp, "grid": [{"val_final_loss": s, **h} for s, h in scores]}
            print(f"[{time.perf_counter() - started:6.0f}s] tuned {name} on {fname}: {hp}", flush=True)

    # 2. meta-train the learned rules on the sinusoid family
    family = fams["sinusoid"]
    val = family.sample(cfg["val_tasks"], torch.Generator().manual_seed(10_000), "train")
    trained: dict[str, list[Any]] = {}
    for rule in [r.strip() for r in args.rules.split(",") if r.strip()]:
        spec = cfg["rules"][rule]
        trained[rule] = []
        for seed in range(cfg["train_seeds"]):
            opt, log, elapsed = meta_train(rule, spec, cfg, seed, family, val, not args.no_progress)
            trained[rule].append(opt)
            results["training"].setdefault(rule, []).append({"seed": seed, "seconds": elapsed, "log": log,
                                                             **spec})
            print(f"[{time.perf_counter() - started:6.0f}s] trained {rule} seed {seed} in {elapsed:.0f}s; "
                  f"selected iteration {log[-1]['selected_iteration']} (val loss {log[-1]['selected_val_loss']:.4f})",
                  flush=True)

    # 3. evaluate on held-out tasks (and outside the family)
    curves: dict[str, dict[str, torch.Tensor]] = {}
    for fname, fam in fams.items():
        tests = [fam.sample(cfg["eval_tasks"], torch.Generator().manual_seed(1000 + s), "test")
                 for s in range(cfg["eval_seeds"])]
        curves[fname] = {}
        for name in BASELINES:
            hp = tuned[fname][name]
            curves[fname][name] = torch.cat([
                final_train_loss(lambda p, hp=hp, name=name: BASELINES[name](p, **hp), fam, t, steps) for t in tests
            ], 1)
        for rule, rules in trained.items():
            per_seed = []
            for opt in rules:
                per_seed.append(torch.cat([final_train_loss(lambda p, opt=opt: L.transfer(opt, p), fam, t, steps)
                                           for t in tests], 1))
            curves[fname][LABELS[rule]] = torch.cat(per_seed, 1)
        print(f"[{time.perf_counter() - started:6.0f}s] evaluated on {fname}", flush=True)

    # 4. tables
    sections = []
    for fname, table in curves.items():
        rows = []
        stats_out: dict[str, Any] = {}
        for name, curve in table.items():
            adam = curves[fname]["Adam"]
            if curve.shape[1] != adam.shape[1]:  # several training seeds: pair each with the same tasks
                adam = adam.repeat(1, curve.shape[1] // adam.shape[1])
            entry = {}
            for h in horizons:
                entry[h] = summarize(curve[h].double(), adam[h].double())
            stats_out[name] = {str(h): v for h, v in entry.items()}
            hp = tuned[fname].get(name, "meta-trained on sinusoid")
            row = [name, hp if isinstance(hp, str) else ", ".join(f"{k}={v:g}" for k, v in hp.items())]
            for h in horizons:
                row.append(fmt(entry[h]))
            st = entry[T]
            row.append(f"{st['log10_mean']:.3f} ± {st['log10_ci95']:.3f}" if math.isfinite(st["log10_mean"]) else "—")
            row.append("—" if name == "Adam" or not math.isfinite(st["paired_log10_vs_adam"]) else
                       f"{st['paired_log10_vs_adam']:+.3f} ± {st['paired_ci95']:.3f} ({100 * st['fraction_better_than_adam']:.0f}%)")
            rows.append(row)
        for rule, rules in trained.items():
            per = table[LABELS[rule]][T].double().reshape(len(rules), -1)  # (training seed, task)
            stats_out[LABELS[rule]]["per_training_seed_mean_at_T"] = [float(x) for x in per.mean(1)]
            rows.append([f"{LABELS[rule]}, per training seed", "", ", ".join(f"{float(x):.3g}" for x in per.mean(1))]
                        + [""] * (len(horizons) + 1))
        results["families"][fname]["stats"] = stats_out
        results["families"][fname]["mean_curves"] = {k: [float(x) for x in v.double().mean(1)] for k, v in table.items()}
        headers = ["optimizer", "tuned / source"] + [f"loss @ {h} {'(T)' if h == T else ''}".strip() for h in horizons] \
            + ["log10 loss @ T", "log10(L/L_Adam) @ T (tasks better)"]
        n = next(iter(table.values())).shape[1]
        sections.append(f"**{fname}** — training loss of fresh optimizees on {cfg['eval_seeds']}×{cfg['eval_tasks']} "
                        f"held-out tasks (learned rules: ×{cfg['train_seeds']} training seeds; n = {n})\n\n"
                        + markdown_table(headers, rows))
    elapsed = time.perf_counter() - started
    results["seconds"] = elapsed
    text = (f"Machine: {describe_machine(info)}\n\nCommand: `{command_line()}` ({elapsed:.0f} s)\n\n"
            + "\n\n".join(sections))
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    write_json(args.json, results)
    if args.plot:
        plot(curves, horizons, T, args.plot)


def plot(curves: dict[str, dict[str, torch.Tensor]], horizons: list[int], T: int, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4))
    for ax, (fname, table) in zip(list(axes) if len(curves) > 1 else [axes], curves.items()):
        for name, curve in table.items():
            ax.plot(curve.double().median(1).values.numpy(), label=name)
        ax.axvline(T, color="grey", linestyle=":", label="trained horizon T")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (median over tasks)")
        ax.set_title(fname)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
