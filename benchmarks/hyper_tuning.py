"""Online learning-rate tuning (diffopt.hyper.OnlineTuner) against a grid search, the default and
hypergradient descent (issue 19, part 1).

Two problems, Adam on a one-hidden-layer MLP, minibatches of 64, float32, one thread:

* **digits**: scikit-learn's handwritten digits (1797 images of 8x8), standardised on the training
  split; train / validation / test = 1000 / 300 / 497 (drawn per seed); cross-entropy; MLP 64-64-10.
* **regression**: a synthetic regression: 20 Gaussian inputs, targets from a random tanh teacher
  (20-32-1) plus noise of standard deviation 0.1; 1000 / 300 / 1000; mean squared error; MLP 20-64-1.

Methods, each for the same number of training steps on the same batches:
(a) Adam at its default lr 1e-3; (b) the best fixed lr (by final validation loss) of a grid of
``--grid`` log-spaced values from 1e-4 to 1 (torch.optim.Adam, the cheapest implementation: the grid's
cost is counted conservatively); (c) Adam-HD (Baydin et al., 2018; diffopt.optim.learned.HypergradientAdam
at its default hyper_lr 1e-7, which barely moves the lr here, and at 1e-5) from the lr 10x above and
10x below the grid's best; (d) the tuner from the same two starts: log-lr tuned every ``--every`` steps
through a window of the last ``--window`` steps (reverse mode) on the whole validation split, Adam on
log-lr with lr ``--meta-lr``, backtracking at its default (restarts from the first step while the first
period's hypergradient says lower the lr; restarted steps count among the run's steps and CPU time);
(d0) the same without backtracking (``backtrack=0``); with ``--pes-samples N``, (e) the tuner in PES
mode from the same starts.

Reported per problem: medians over the seeds of the final validation and test loss, the tuned lr, the
CPU time of the process (one thread: robust to other jobs on the machine, unlike wall time); the grid's
total cost in training steps and CPU seconds, and the tuner's as a fraction of the grid's. Goal: the
tuner's test loss within 5% of the grid's best at <= 1/4 of its CPU time (medians over the seeds of
the per-seed ratios, each seed's tuner against the same seed's grid).

    python benchmarks/hyper_tuning.py            # 3 seeds, 8-value grid, 600 steps
    python benchmarks/hyper_tuning.py --pes-samples 2   # and PES with 2 antithetic pairs
    python benchmarks/hyper_tuning.py --quick    # 1 seed, 8-value grid, 150 steps
    python benchmarks/hyper_tuning.py --seeds 5 --restart-warmup 300 --restart-delay 150   # RESULTS.md 8b
    python benchmarks/hyper_tuning.py --seeds 5 --warmup 300 --warmup-start 0 --delay 150 --backtrack 0
        # a warm-up for every run (its base rate tuned) and the grid under the same warm-up (b+)
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffopt.hyper import OnlineTuner  # noqa: E402
from diffopt.optim import Adam  # noqa: E402
from diffopt.optim.lr_scheduler import LambdaLR  # noqa: E402
from diffopt.optim.learned import HypergradientAdam  # noqa: E402

Params = list[Tensor]
Split = tuple[Tensor, Tensor]


@dataclass
class Problem:
    name: str
    train: Split
    val: Split
    test: Split
    sizes: tuple[int, ...]
    classify: bool

    def loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        out = torch.tanh(x @ params[0].T + params[1]) @ params[2].T + params[3]
        return F.cross_entropy(out, y) if self.classify else F.mse_loss(out, y)


def digits(seed: int) -> Problem:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = torch.tensor(x, dtype=torch.float32)[order], torch.tensor(y)[order]
    mean, std = x[:1000].mean(0), x[:1000].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return Problem("digits", (x[:1000], y[:1000]), (x[1000:1300], y[1000:1300]), (x[1300:], y[1300:]),
                   (64, 64, 10), True)


def regression(seed: int) -> Problem:
    g = torch.Generator().manual_seed(1000 + seed)
    w1, w2 = torch.randn(32, 20, generator=g) / math.sqrt(20), torch.randn(1, 32, generator=g) / math.sqrt(32) * 2
    x = torch.randn(2300, 20, generator=g)
    y = torch.tanh(x @ w1.T) @ w2.T + 0.1 * torch.randn(2300, 1, generator=g)
    return Problem("regression", (x[:1000], y[:1000]), (x[1000:1300], y[1000:1300]), (x[1300:], y[1300:]),
                   (20, 64, 1), False)


def initial_weights(problem: Problem, seed: int) -> Params:
    g = torch.Generator().manual_seed(seed)
    n_in, hidden, n_out = problem.sizes
    return [torch.randn(hidden, n_in, generator=g) / math.sqrt(n_in), torch.zeros(hidden),
            torch.randn(n_out, hidden, generator=g) / math.sqrt(hidden), torch.zeros(n_out)]


def batches(problem: Problem, steps: int, seed: int, size: int = 64) -> list[Split]:
    g = torch.Generator().manual_seed(2000 + seed)
    x, y = problem.train
    out: list[Split] = []
    while len(out) < steps:
        order = torch.randperm(len(x), generator=g)
        out += [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(x) - size + 1, size)]
    return out[:steps]


def evaluate(problem: Problem, params: Params) -> tuple[float, float]:
    with torch.no_grad():
        return float(problem.loss(params, *problem.val)), float(problem.loss(params, *problem.test))


Warmup = tuple[int, float, str]


def warmup_factor(steps: int, start: float, shape: str = "linear") -> Callable[[int], float]:
    """The learning-rate factor of step t under a warm-up (LambdaLR's lr_lambda): ``"linear"``, from
    ``start`` at step 0 to 1 at step ``steps``, then 1; ``"exponential"``, 1 - (1 - start) e^(-t/steps)
    (Ma & Yarats, 2021: with start 0 and steps 1 / (1 - beta2), their "untuned exponential warm-up")."""
    if shape == "linear":
        return lambda t: min(1.0, start + (1.0 - start) * t / steps)
    if shape == "exponential":
        return lambda t: 1.0 - (1.0 - start) * math.exp(-t / steps)
    raise ValueError(f"warmup_factor: shape must be 'linear' or 'exponential', got {shape!r}")


def fixed_lr(problem: Problem, lr: float, data: list[Split], seed: int,
             warmup: Warmup | None = None) -> dict[str, Any]:
    """Adam at the fixed (base) rate ``lr``; with ``warmup=(steps, start)`` under torch's LambdaLR warm-up."""
    params = [w.requires_grad_() for w in initial_weights(problem, seed)]
    opt = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, warmup_factor(*warmup)) if warmup else None
    start = time.process_time()
    for x, y in data:
        opt.zero_grad()
        problem.loss(params, x, y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    seconds = time.process_time() - start
    val, test = evaluate(problem, params)
    return {"lr": lr, "val": val, "test": test, "seconds": seconds, "steps": len(data)}


def hypergradient_descent(problem: Problem, lr: float, data: list[Split], seed: int,
                          hyper_lr: float = 1e-7) -> dict[str, Any]:
    params = initial_weights(problem, seed)
    opt = HypergradientAdam(params, lr=lr, hyper_lr=hyper_lr)
    start = time.process_time()
    for x, y in data:
        current = [p.detach().requires_grad_() for p in opt.params]
        grads = torch.autograd.grad(problem.loss(current, x, y), current)
        with torch.no_grad():
            opt.step(params=current, grads=grads)
        opt.params = [p.detach() for p in opt.params]
    seconds = time.process_time() - start
    val, test = evaluate(problem, opt.params)
    final_lr = float(opt.state[0]["lr"]) if math.isfinite(val) else float("nan")
    return {"lr": final_lr, "val": val, "test": test, "seconds": seconds, "steps": len(data)}


def tuned(problem: Problem, lr: float, data: list[Split], seed: int, every: int, window: int,
          meta_lr: float, first_order: bool = False, pes_samples: int = 0, backtrack: int = 8,
          warmup: Warmup | None = None, delay: int = 0, restart_warmup: int = 0,
          restart_delay: int | None = None) -> dict[str, Any]:
    """The tuner in reverse mode, or in PES mode with ``pes_samples`` antithetic pairs (sigma 0.3 on
    log-lr, particles never restarted: the horizon is the whole run); ``backtrack``: the tuner's
    restarts while the lr is too high (its default 8; 0: none). Restarted steps are among ``data``'s.
    With ``warmup=(steps, start)`` the rates follow diffopt's LambdaLR warm-up and the tuner tunes its
    base rate (``"lr"`` under a LambdaLR); ``delay``: the tuner's steps held back at the start of each run;
    ``restart_warmup``, ``restart_delay``: the tuner's warm-up after a backtracking restart."""
    opt = Adam(initial_weights(problem, seed), lr=lr)
    scheduler = LambdaLR(opt, warmup_factor(*warmup)) if warmup else None
    mode = {"mode": "pes", "pes_samples": pes_samples, "pes_sigma": 0.3} if pes_samples else {
        "window": window, "first_order": first_order}
    mode.update(backtrack=backtrack, delay=delay, restart_warmup=restart_warmup if backtrack else 0,
                restart_delay=restart_delay)
    tuner = OnlineTuner(opt, lambda p, b: problem.loss(p, *b), lambda p: problem.loss(p, *problem.val), "lr",
                        every=every, meta_lr=meta_lr, scheduler=scheduler, **mode)
    start = time.process_time()
    for batch in data:
        tuner.step(batch)
    seconds = time.process_time() - start
    val, test = evaluate(problem, tuner.params)
    replayed = (2 * pes_samples * every if pes_samples else window) * len(tuner.history)
    return {"lr": tuner.values()["lr"], "val": val, "test": test, "seconds": seconds, "steps": len(data),
            "replayed": replayed, "restarts": tuner.restarts}


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def run(seeds: int, steps: int, grid_size: int, every: int, window: int, meta_lr: float,
        hd_hyper_lrs: tuple[float, ...] = (1e-7, 1e-5), pes_samples: int = 0,
        problems: tuple[Callable[[int], Problem], ...] = (digits, regression),
        warmup: Warmup | None = None, delay: int = 0, backtrack: int = 8, first_seed: int = 0,
        restart_warmup: int = 0, restart_delay: int | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """With ``warmup=(steps, start, shape)``, (d) and (d0) are the tuner under that warm-up (tuning its
    base rate) with ``delay``, (d-) the tuner without either (the default setting), and (b+) the grid
    under the same warm-up; the starts stay 10x off the best rate of the grid without warm-up (b), the
    headline. ``backtrack``: (d)'s (with 0, (d0) is not run again); seeds ``first_seed`` onwards.
    ``restart_warmup``/``restart_delay``: (d)'s and (d0)'s warm-up after a backtracking restart (none in
    (d0), which never restarts), beside (d-)."""
    torch.set_num_threads(1)
    grid = [10 ** (-4 + 4 * k / (grid_size - 1)) for k in range(grid_size)]
    report: dict[str, Any] = {}
    for make in problems:
        rows: dict[str, list[dict[str, Any]]] = {}
        for seed in range(first_seed, first_seed + seeds):
            problem = make(seed)
            data = batches(problem, steps, seed)
            results = [fixed_lr(problem, lr, data, seed) for lr in grid]
            finite = [r for r in results if math.isfinite(r["val"])]
            best = min(finite, key=lambda r: r["val"])
            cost = {"lr": best["lr"], "val": best["val"], "test": best["test"], "steps": steps * len(grid),
                    "seconds": sum(r["seconds"] for r in results)}
            rows.setdefault("(a) default lr 1e-3", []).append(fixed_lr(problem, 1e-3, data, seed))
            rows.setdefault(f"(b) grid best of {len(grid)} (total cost)", []).append(cost)
            if warmup:
                warm = [fixed_lr(problem, lr, data, seed, warmup) for lr in grid]
                best_warm = min([r for r in warm if math.isfinite(r["val"])], key=lambda r: r["val"])
                rows.setdefault(f"(b+) grid best of {len(grid)} under the warm-up (total cost)", []).append(
                    {"lr": best_warm["lr"], "val": best_warm["val"], "test": best_warm["test"],
                     "steps": steps * len(grid), "seconds": sum(r["seconds"] for r in warm)})
            for factor, tag in ((10.0, "10x high"), (0.1, "10x low")):
                start_lr = best["lr"] * factor
                for hyper_lr in hd_hyper_lrs:
                    rows.setdefault(f"(c) Adam-HD (hyper_lr {hyper_lr:g}) from {tag}", []).append(
                        hypergradient_descent(problem, start_lr, data, seed, hyper_lr))
                under = (f", {warmup[2]} warm-up {warmup[0]} steps from {warmup[1]:g}x" if warmup else "") + (
                    f", delay {delay}" if delay else "")
                rows.setdefault(f"(d) tuner from {tag}", []).append(
                    tuned(problem, start_lr, data, seed, every, window, meta_lr, warmup=warmup, delay=delay,
                          backtrack=backtrack, restart_warmup=restart_warmup, restart_delay=restart_delay))
                if backtrack:
                    rows.setdefault(f"(d0) tuner without backtracking (backtrack=0){under} from {tag}", []).append(
                        tuned(problem, start_lr, data, seed, every, window, meta_lr, backtrack=0, warmup=warmup,
                              delay=delay))
                if warmup or delay or restart_warmup:
                    rows.setdefault(f"(d-) tuner without warm-up or delay from {tag}", []).append(
                        tuned(problem, start_lr, data, seed, every, window, meta_lr))
                if pes_samples:
                    rows.setdefault(f"(e) tuner, PES ({pes_samples} pairs), from {tag}", []).append(
                        tuned(problem, start_lr, data, seed, every, window, meta_lr, pes_samples=pes_samples))
            log(f"  {problem.name} seed {seed}: grid best lr {best['lr']:.3g} (val {best['val']:.4f}, test "
                f"{best['test']:.4f}); tuner from 10x high -> lr {rows['(d) tuner from 10x high'][-1]['lr']:.3g} "
                f"test {rows['(d) tuner from 10x high'][-1]['test']:.4f}, from 10x low -> lr "
                f"{rows['(d) tuner from 10x low'][-1]['lr']:.3g} test {rows['(d) tuner from 10x low'][-1]['test']:.4f}")
        grid_seconds = median(rows[f"(b) grid best of {len(grid)} (total cost)"], "seconds")
        grid_test = median(rows[f"(b) grid best of {len(grid)} (total cost)"], "test")
        table = ["| method | lr (final) | val loss | test loss | CPU seconds | training steps | CPU time / grid's |",
                 "|---|---|---|---|---|---|---|"]
        for method, results in rows.items():
            steps_text = str(results[0]["steps"]) + (f" + {median(results, 'replayed'):g} replayed" if "replayed" in
                                                     results[0] else "")
            if "restarts" in results[0]:
                steps_text += f" (restarts per seed: {', '.join(str(r['restarts']) for r in results)})"
            table.append(f"| {method} | {median(results, 'lr'):.3g} | {median(results, 'val'):.4f} | "
                         f"{median(results, 'test'):.4f} | {median(results, 'seconds'):.2f} | {steps_text} | "
                         f"{median(results, 'seconds') / grid_seconds:.2f} |")
        grid_rows = rows[f"(b) grid best of {len(grid)} (total cost)"]
        warm_rows = rows.get(f"(b+) grid best of {len(grid)} under the warm-up (total cost)")
        goals: dict[str, dict[str, Any]] = {}
        for prefix in ("(d) tuner", "(d-) tuner without warm-up or delay"):
            for tag in ("10x high", "10x low"):
                tuner_rows = rows.get(f"{prefix} from {tag}")
                if tuner_rows is None:
                    continue
                goal = goals[tag if prefix == "(d) tuner" else f"{tag}, without warm-up or delay"] = {
                    "per_seed": [t["test"] / g["test"] for t, g in zip(tuner_rows, grid_rows)],
                    "test_ratio": statistics.median(t["test"] / g["test"] for t, g in zip(tuner_rows, grid_rows)),
                    "test_ratio_of_medians": median(tuner_rows, "test") / grid_test,
                    "val_ratio": statistics.median(t["val"] / g["val"] for t, g in zip(tuner_rows, grid_rows)),
                    "time_ratio": statistics.median(t["seconds"] / g["seconds"] for t, g in zip(tuner_rows, grid_rows))}
                if warm_rows:
                    goal["test_ratio_warm_grid"] = statistics.median(
                        t["test"] / g["test"] for t, g in zip(tuner_rows, warm_rows))
                    goal["time_ratio_warm_grid"] = statistics.median(
                        t["seconds"] / g["seconds"] for t, g in zip(tuner_rows, warm_rows))
        report[make.__name__] = {"table": "\n".join(table), "rows": rows, "goals": goals}
        log(f"\n{make.__name__}: medians over {seeds} seed(s), {steps} steps\n" + "\n".join(table))
        for tag, goal in goals.items():
            met = goal["test_ratio"] <= 1.05 and goal["time_ratio"] <= 0.25
            log(f"  tuner from {tag}: test loss {goal['test_ratio']:.3f}x the grid's best (median of the per-seed "
                f"ratios; ratio of the medians {goal['test_ratio_of_medians']:.3f}x) at {goal['time_ratio']:.3f}x "
                f"its CPU time -> goal {'met' if met else 'NOT met'} (per seed: "
                f"{', '.join(f'{r:.3f}' for r in goal['per_seed'])}); validation loss {goal['val_ratio']:.3f}x the "
                f"grid's" + (f"; against the grid under the same warm-up: test {goal['test_ratio_warm_grid']:.3f}x at "
                             f"{goal['time_ratio_warm_grid']:.3f}x its CPU time" if warm_rows else ""))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 150 steps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--grid", type=int, default=8, help="values in the lr grid (>= 8 for the issue's goal)")
    parser.add_argument("--every", type=int, default=20, help="training steps between tuning steps")
    parser.add_argument("--window", type=int, default=5, help="steps each hypergradient differentiates through")
    parser.add_argument("--meta-lr", type=float, default=0.3, help="Adam's lr on log-lr")
    parser.add_argument("--pes-samples", type=int, default=0,
                        help="also run the tuner in PES mode with this many antithetic pairs (0: not)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="also run the tuner and the grid under a linear lr warm-up over this many steps "
                             "(the tuner tunes its base rate; 0: not)")
    parser.add_argument("--warmup-start", type=float, default=0.1, help="the warm-up's factor at step 0")
    parser.add_argument("--backtrack", type=int, default=8, help="the tuner's (d) backtracking restarts (0: none)")
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--restart-warmup", type=int, default=0,
                        help="the tuner's linear warm-up (steps) after a backtracking restart (0: none)")
    parser.add_argument("--restart-delay", type=int, default=None,
                        help="the restarted run's steps before its first tuning step (default: half the warm-up)")
    parser.add_argument("--delay", type=int, default=0,
                        help="the tuner's training steps before its first period (and after each restart)")
    parser.add_argument("--warmup-shape", choices=("linear", "exponential"), default="linear",
                        help="linear: to 1 at step --warmup; exponential: 1 - (1 - start) exp(-t / --warmup)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 1, 150
    import platform

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    run(args.seeds, args.steps, args.grid, args.every, args.window, args.meta_lr, pes_samples=args.pes_samples,
        warmup=(args.warmup, args.warmup_start, args.warmup_shape) if args.warmup else None, delay=args.delay,
        backtrack=args.backtrack, first_seed=args.first_seed, restart_warmup=args.restart_warmup,
        restart_delay=args.restart_delay)


if __name__ == "__main__":
    main()
