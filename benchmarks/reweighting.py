"""Learning to reweight examples on noisy labels: scikit-learn's digits with symmetric label noise.

Set-up (per seed): the 1,797 digits (8x8, standardised with the training inputs' mean and standard
deviation) are split into a clean validation (meta) set of 10 examples per class, a clean test set
of 500 and a training set of the rest (1,197), whose labels are corrupted with symmetric noise: with
probability ``noise`` a label is replaced by one of the 9 other classes, uniformly. An MLP
(64-``hidden``-10, ReLU) is trained for ``epochs`` epochs of mini-batches of 64 with SGD (lr 0.1,
weight decay 5e-4) with each momentum of ``--momentum`` (default 0.9 and 0: every method with
both, since L2RW concentrates its weights on few examples and is unstable with heavy momentum),
float32, one thread. Methods:

* ``plain (noisy)``: the mean loss over the noisy training set;
* ``plain (noisy + clean)``: the same, with the 100 clean examples added to the training set;
* ``L2RW``: :class:`diffopt.hyper.LearningToReweight` with the clean set as meta data;
* ``L2RW (SGD look-ahead)``: the same with ``lookahead="sgd"`` (the authors' plain-SGD look-ahead);
* ``MWN``: :class:`diffopt.hyper.MetaWeightNet` (1-100-1 weight net, Adam 1e-3, weight decay 1e-4).

Reported: test accuracy after the last epoch, mean ± 95% confidence half-width (t-distribution,
``n-1`` degrees of freedom) over seeds (a run whose losses become non-finite stops there — the
learners raise ``NonFiniteError`` — and counts with the accuracy it has then, marked as diverged);
wall time of the training run relative to ``plain (noisy)`` (median over seeds of the per-seed ratio,
diverged runs left out, all methods run in the same process, interleaved per seed); and for the
reweighting methods the mean weight (times the batch size: 1 = uniform) given to the examples whose
label is wrong and to those whose label is right, the fraction of wrong-label example weights that are
exactly 0, and the weights' effective sample size per batch, ``(Σw)² / (n Σw²)`` (1 = uniform),
averaged over steps.

    python benchmarks/reweighting.py            # 5 seeds, 20% and 40% noise, 30 epochs
    python benchmarks/reweighting.py --noise 0  # clean labels: how far from uniform the weights are
    python benchmarks/reweighting.py --quick    # 3 seeds, 10 epochs
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffopt._measure import command_line, describe_machine, machine_info, markdown_table, write_json  # noqa: E402
from diffopt.errors import NonFiniteError  # noqa: E402
from diffopt.hyper import LearningToReweight, MetaWeightNet  # noqa: E402

METHODS = ("plain (noisy)", "plain (noisy + clean)", "L2RW", "L2RW (SGD look-ahead)", "MWN")
CLASSES = 10


def split(seed: int, noise: float) -> dict[str, torch.Tensor]:
    """The digits split for ``seed``: clean meta set (10 per class), clean test set (500), noisy train set."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    meta = np.concatenate([order[y[order] == c][:10] for c in range(CLASSES)])
    rest = np.setdiff1d(order, meta, assume_unique=True)
    rest = rest[rng.permutation(len(rest))]
    test, train = rest[:500], rest[500:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-8
    noisy = y[train].copy()
    flip = rng.random(len(train)) < noise
    noisy[flip] = (noisy[flip] + rng.integers(1, CLASSES, flip.sum())) % CLASSES  # one of the 9 other classes
    as_x = lambda a: torch.tensor((x[a] - mean) / std, dtype=torch.float32)  # noqa: E731
    return {"x_train": as_x(train), "y_train": torch.tensor(noisy), "wrong": torch.tensor(noisy != y[train]),
            "x_meta": as_x(meta), "y_meta": torch.tensor(y[meta]),
            "x_test": as_x(test), "y_test": torch.tensor(y[test])}


def mlp(seed: int, hidden: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


def train(method: str, data: dict[str, torch.Tensor], seed: int, epochs: int, hidden: int, momentum: float,
          lr: float = 0.1, batch_size: int = 64) -> dict[str, Any]:
    """One training run; returns test accuracy, wall time and weight statistics."""
    model = mlp(seed, hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    x, y, wrong = data["x_train"], data["y_train"], data["wrong"]
    if method == "plain (noisy + clean)":
        x, y = torch.cat([x, data["x_meta"]]), torch.cat([y, data["y_meta"]])
        wrong = torch.cat([wrong, torch.zeros(len(data["y_meta"]), dtype=torch.bool)])
    meta = (data["x_meta"], data["y_meta"])
    learner: LearningToReweight | MetaWeightNet | None = None
    if method.startswith("L2RW"):
        learner = LearningToReweight(model, optimizer, loss_fn=loss_fn, meta_data=meta, seed=seed,
                                     lookahead="sgd" if "SGD" in method else "optimizer")
    elif method == "MWN":
        learner = MetaWeightNet(model, optimizer, loss_fn=loss_fn, meta_data=meta, seed=seed)
    order = torch.Generator().manual_seed(seed)
    weight_wrong, weight_right, zero_wrong, count_wrong, count_right = 0.0, 0.0, 0, 0, 0
    ess: list[float] = []
    diverged = False
    start = time.perf_counter()
    for _ in range(epochs):
        permutation = torch.randperm(len(y), generator=order)
        for k in range(0, len(y), batch_size):
            idx = permutation[k:k + batch_size]
            if learner is None:
                optimizer.zero_grad()
                loss_fn(model(x[idx]), y[idx]).mean().backward()
                optimizer.step()
                continue
            try:
                weights = learner.step(x[idx], y[idx]).weights * len(idx)
            except NonFiniteError:  # the learner refuses to go on from non-finite losses: the run diverged
                diverged = True
                break
            bad = wrong[idx]
            weight_wrong += float(weights[bad].sum())
            weight_right += float(weights[~bad].sum())
            zero_wrong += int((weights[bad] == 0).sum())
            count_wrong += int(bad.sum())
            count_right += int((~bad).sum())
            ess.append(float(weights.sum() ** 2 / (len(idx) * (weights ** 2).sum())) if weights.sum() > 0 else 0.0)
        if diverged:
            break
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((model(data["x_test"]).argmax(1) == data["y_test"]).double().mean())
    out: dict[str, Any] = {"accuracy": accuracy, "seconds": seconds, "diverged": diverged}
    if learner is not None:
        out["weight_wrong"] = weight_wrong / count_wrong if count_wrong else float("nan")
        out["weight_right"] = weight_right / max(count_right, 1)
        out["zero_wrong"] = zero_wrong / count_wrong if count_wrong else float("nan")
        out["ess"] = statistics.fmean(ess) if ess else float("nan")
    return out


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width with the t-distribution (n - 1 degrees of freedom)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan")
    return mean, float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(values) / n ** 0.5


def run(noises: Sequence[float], seeds: int, epochs: int, hidden: int, momenta: Sequence[float] = (0.9, 0.0),
        methods: Sequence[str] = METHODS, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Every method at every (noise, momentum) over ``seeds`` seeds; keys ``"<noise> <momentum>"``."""
    torch.set_num_threads(1)
    return {f"{noise:g} {momentum:g}": run_setting(noise, momentum, seeds, epochs, hidden, methods, progress)
            for noise in noises for momentum in momenta}


def run_setting(noise: float, momentum: float, seeds: int, epochs: int, hidden: int, methods: Sequence[str],
                progress: Callable[[str], None]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for seed in range(seeds):
        data = split(seed, noise)
        for method in methods:  # interleaved per seed, so the machine's load affects every method alike
            runs[method].append(train(method, data, seed, epochs, hidden, momentum))
        progress(f"noise {noise:.0%} momentum {momentum:g} seed {seed}: " + ", ".join(
            f"{m} {runs[m][-1]['accuracy']:.3f}" for m in methods))
    summary = {}
    for method in methods:
        finished = [(r, p) for r, p in zip(runs[method], runs[methods[0]]) if not r["diverged"]]
        ratios = [r["seconds"] / p["seconds"] for r, p in finished or zip(runs[method], runs[methods[0]])]
        entry = {"accuracy": mean_ci([r["accuracy"] for r in runs[method]]), "time_ratio": statistics.median(ratios),
                 "seconds": statistics.median(r["seconds"] for r in runs[method]), "runs": runs[method],
                 "diverged": sum(r["diverged"] for r in runs[method])}
        if "weight_wrong" in runs[method][0]:
            for key in ("weight_wrong", "weight_right", "zero_wrong", "ess"):
                entry[key] = statistics.fmean(r[key] for r in runs[method])
        summary[method] = entry
    return summary


def table(results: dict[str, Any]) -> str:
    rows = []
    for key, summary in results.items():
        noise, momentum = key.split()
        for method, entry in summary.items():
            mean, half = entry["accuracy"]
            weights = ("{:.2f} / {:.2f} / {:.0%} / {:.2f}".format(
                entry["weight_wrong"], entry["weight_right"], entry["zero_wrong"], entry["ess"])
                .replace("nan%", "–").replace("nan", "–") if "weight_wrong" in entry else "")
            diverged = f" ({entry['diverged']} of {len(entry['runs'])} diverged)" if entry["diverged"] else ""
            rows.append([f"{float(noise):.0%}", momentum, method, f"{100 * mean:.1f} ± {100 * half:.1f}{diverged}",
                         f"{entry['time_ratio']:.2f}x ({entry['seconds']:.1f} s)", weights])
    return markdown_table(["label noise", "momentum", "method", "test accuracy % (mean ± 95% CI)",
                           "time vs plain (median run)",
                           "weights: mean on wrong / right labels, wrong ones at 0, ESS"], rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, 10 epochs")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--momentum", type=float, nargs="+", default=[0.9, 0.0])
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    seeds = args.seeds or (3 if args.quick else 5)
    epochs = args.epochs or (10 if args.quick else 30)
    results = run(args.noise, seeds, epochs, args.hidden, args.momentum)
    print()
    print(f"digits, MLP 64-{args.hidden}-10, {epochs} epochs, {seeds} seeds; "
          f"{describe_machine(machine_info())}")
    print(table(results))
    write_json(args.json, {"benchmark": "reweighting", "machine": machine_info(), "command": command_line(),
                           "config": {"seeds": seeds, "epochs": epochs, "hidden": args.hidden, "noise": args.noise,
                                      "momentum": args.momentum}, "results": results})
    return results


if __name__ == "__main__":
    main()
