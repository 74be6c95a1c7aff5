"""Reproduce the sinusoid-regression results of MAML (Finn et al., 2017) and Meta-SGD (Li et al., 2017).

Subcommands (see benchmarks/REPRODUCTIONS.md for recorded results):

* ``maml``: MAML's protocol (1-40-40-1 ReLU MLP, K = 10 training points, one inner SGD step with
  α = 0.01, meta-batch 25, Adam 1e-3, 70,000 iterations), evaluated on 600 test tasks with 5 support
  points and 100 query points: query MSE after 0 / 1 / 5 / 10 SGD(α) steps, for MAML and for a
  network pretrained on all tasks (``diffopt.training.demo.pretrain``); paper: 0.67 / 0.38 / 0.35 and
  2.41 / 2.23 / 2.19.
* ``metasgd``: Meta-SGD against MAML under one protocol at K = 5, 10, 20 (K training and test
  support points, one inner step at train and test); paper: Meta-SGD 0.90 / 0.53 / 0.31, MAML
  1.13 / 0.77 / 0.48.
* ``family``: MAML, first-order MAML, ANIL and Reptile under MAML's protocol, in one table.
* ``anil-stability``: why ANIL diverges when fine-tuned past its one meta-trained step (default
  5,000 iterations): the head's inner loss is quadratic, and on some test tasks the learned
  features put ``alpha * lambda_max`` of its Hessian past 2, where gradient descent diverges.

Every run uses one thread (``torch.set_num_threads(1)``); ``--iterations`` shortens the schedule,
``--json PATH`` writes the results, ``--progress`` shows progress bars (off by default).

    python benchmarks/reproduce_sinusoid.py maml --json maml.json
    python benchmarks/reproduce_sinusoid.py metasgd --iterations 10000
    python benchmarks/reproduce_sinusoid.py family --iterations 10000
    python benchmarks/reproduce_sinusoid.py anil-stability
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from diffopt.algorithms import ANIL, FOMAML, MAML, MetaSGD, Reptile
from diffopt.training.demo import pretrain
from diffopt.recipes import SinusoidSource, sinusoid_mlp
from diffopt.training import Trainer, evaluate, outer_adam, summary_text

EVAL_STEPS = (0, 1, 5, 10)
PAPER_MAML = {"MAML": {"1": 0.67, "5": 0.38, "10": 0.35}, "pretrained": {"1": 2.41, "5": 2.23, "10": 2.19}}
PAPER_METASGD = {"Meta-SGD": {"5": 0.90, "10": 0.53, "20": 0.31}, "MAML": {"5": 1.13, "10": 0.77, "20": 0.48}}
PAPER_CI_METASGD = {"Meta-SGD": {"5": 0.16, "10": 0.09, "20": 0.05}, "MAML": {"5": 0.18, "10": 0.11, "20": 0.08}}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def build(method: str, inner_steps: int = 1, inner_lr: float = 0.01) -> tuple[Any, torch.optim.Optimizer]:
    """A learner by name on a fresh 1-40-40-1 MLP, and its outer optimizer."""
    model = sinusoid_mlp()
    if method == "MAML":
        learner = MAML(model, F.mse_loss, inner_lr=inner_lr, inner_steps=inner_steps)
    elif method == "FOMAML":
        learner = FOMAML(model, F.mse_loss, inner_lr=inner_lr, inner_steps=inner_steps)
    elif method == "Meta-SGD":
        learner = MetaSGD(model, F.mse_loss, inner_steps=inner_steps)
    elif method == "ANIL":
        learner = ANIL(model[:-1], model[-1], F.mse_loss, inner_lr=inner_lr, inner_steps=inner_steps)
    elif method == "Reptile":
        # Reptile has no support/query split in training: it trains on all 2K points of a task, takes
        # 5 inner SGD(α) steps (1 step would make it plain joint training) and moves θ towards the
        # mean adapted weights with ε decaying linearly from 1 to 0 (Nichol et al., 2018).
        learner = Reptile(model, F.mse_loss, inner_lr=inner_lr, inner_steps=5, outer_lr=1.0, outer_lr_final=0.0,
                          train_on_query=True)
        return learner, torch.optim.SGD(learner.parameters(), lr=1.0)
    else:
        raise ValueError(method)
    return learner, outer_adam(learner.parameters(), lr=1e-3)


def train(method: str, source: SinusoidSource, iterations: int, seed: int, progress: bool,
          steps: tuple[int, ...] = EVAL_STEPS) -> dict[str, Any]:
    torch.manual_seed(seed)
    learner, optimizer = build(method)
    started, cpu = time.perf_counter(), time.process_time()
    trainer = Trainer(learner, source, optimizer, iterations=iterations, seed=seed, eval_steps=steps,
                      progress=progress, log_every=max(iterations // 10, 1))
    trainer.fit()
    seconds = time.perf_counter() - started
    return {"mse": trainer.history[-1]["eval"]["loss"], "seconds": seconds, "cpu_seconds": time.process_time() - cpu}


def fmt(entry: dict[str, float]) -> str:
    return summary_text(entry)


# -- experiments ------------------------------------------------------------------------------
def run_maml(args: argparse.Namespace) -> dict[str, Any]:
    source = SinusoidSource(meta_batch=25, shots=10, test_tasks=args.test_tasks, test_shots=5, test_query=100)
    maml = train("MAML", source, args.iterations, args.seed, args.progress)
    started = time.perf_counter()
    baseline_model = pretrain(args.iterations, source, args.seed)
    pretrain_seconds = time.perf_counter() - started
    baseline = MAML(baseline_model, F.mse_loss, inner_lr=0.01, inner_steps=1)
    pre = evaluate(baseline, source.test_batches(), EVAL_STEPS)["loss"]
    results = {"MAML": maml["mse"], "pretrained": pre}
    lines = ["| method | 0 steps | 1 step | 5 steps | 10 steps | paper (1 / 5 / 10) |", "|---|---|---|---|---|---|"]
    for name, mse in results.items():
        paper = " / ".join(f"{PAPER_MAML[name][k]:.2f}" for k in ("1", "5", "10"))
        lines.append(f"| {name} | " + " | ".join(fmt(mse[str(k)]) for k in EVAL_STEPS) + f" | {paper} |")
    return {"results": results, "paper": PAPER_MAML, "table": "\n".join(lines),
            "seconds": {"MAML meta-training": maml["seconds"], "pretraining": pretrain_seconds},
            "cpu_seconds": {"MAML meta-training": maml["cpu_seconds"]},
            "protocol": {"train_shots": 10, "test_shots": 5, "test_query": 100, "inner_lr": 0.01, "inner_steps": 1,
                         "meta_batch": 25, "outer": "Adam 1e-3", "eval_steps": list(EVAL_STEPS)}}


def run_metasgd(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {"Meta-SGD": {}, "MAML": {}}
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for k in args.shots:
        source = SinusoidSource(meta_batch=25, shots=k, test_tasks=args.test_tasks, test_shots=k, test_query=100)
        for method in ("Meta-SGD", "MAML"):
            out = train(method, source, args.iterations, args.seed, args.progress, steps=(0, 1))
            results[method][str(k)] = out["mse"]
            seconds[f"{method} K={k}"] = out["seconds"]
            cpu[f"{method} K={k}"] = out["cpu_seconds"]
    lines = ["| method | " + " | ".join(f"K = {k}" for k in args.shots) + " |", "|---" * (len(args.shots) + 1) + "|"]
    for method in ("Meta-SGD", "MAML"):
        cells = [fmt(results[method][str(k)]["1"]) for k in args.shots]
        lines.append(f"| {method} (measured, 1 step) | " + " | ".join(cells) + " |")
    for method in ("Meta-SGD", "MAML"):
        cells = [f"{PAPER_METASGD[method].get(str(k), float('nan')):.2f} ± "
                 f"{PAPER_CI_METASGD[method].get(str(k), float('nan')):.2f}" for k in args.shots]
        lines.append(f"| {method} (paper) | " + " | ".join(cells) + " |")
    lower = {str(k): results["Meta-SGD"][str(k)]["1"]["mean"] < results["MAML"][str(k)]["1"]["mean"]
             for k in args.shots}
    return {"results": results, "paper": PAPER_METASGD, "metasgd_lower": lower, "table": "\n".join(lines),
            "seconds": seconds, "cpu_seconds": cpu,
            "protocol": {"train_shots": "K", "test_shots": "K", "test_query": 100, "inner_steps": 1,
                         "maml_inner_lr": 0.01, "metasgd_lr_init": "U[0.005, 0.1]", "meta_batch": 25,
                         "outer": "Adam 1e-3", "eval_steps": [0, 1]}}


def run_family(args: argparse.Namespace) -> dict[str, Any]:
    source = SinusoidSource(meta_batch=25, shots=10, test_tasks=args.test_tasks, test_shots=5, test_query=100)
    results, seconds, cpu = {}, {}, {}
    for method in args.methods:
        out = train(method, source, args.iterations, args.seed, args.progress)
        results[method], seconds[method], cpu[method] = out["mse"], out["seconds"], out["cpu_seconds"]
    lines = ["| method | 0 steps | 1 step | 5 steps | 10 steps | meta-training s |", "|---|---|---|---|---|---|"]
    for method, mse in results.items():
        cells = " | ".join(fmt(mse[str(k)]) for k in EVAL_STEPS)
        lines.append(f"| {method} | {cells} | {seconds[method]:.0f} |")
    return {"results": results, "paper": {"MAML": PAPER_MAML["MAML"]}, "table": "\n".join(lines), "seconds": seconds,
            "cpu_seconds": cpu,
            "protocol": {"train_shots": 10, "test_shots": 5, "test_query": 100, "inner_lr": 0.01,
                         "inner_steps": {"MAML": 1, "FOMAML": 1, "ANIL": 1, "Reptile": 5}, "meta_batch": 25,
                         "outer": "Adam 1e-3 (Reptile: SGD, ε 1 → 0 linearly)", "eval_steps": list(EVAL_STEPS)}}


def run_anil_stability(args: argparse.Namespace) -> dict[str, Any]:
    """Why ANIL diverges when fine-tuned for more than one step (the ``family`` table).

    ANIL adapts only the linear head on fixed features ``phi`` with MSE, so on a task's support set
    the inner loss is exactly quadratic in the head, with Hessian ``H = (2 / N) Phi^T Phi`` (``Phi``:
    the N x (D + 1) features with a bias column). Gradient descent with step ``alpha`` on a quadratic
    converges iff ``alpha * lambda_max(H) < 2``. Meta-training with one inner step never takes a
    second step, so nothing stops it from learning features that put some tasks past that bound.
    This trains ANIL under the family protocol, measures ``alpha * lambda_max`` on every test task
    and fine-tunes each head for 10 steps of plain gradient descent, split by the bound.
    """
    source = SinusoidSource(meta_batch=25, shots=10, test_tasks=args.test_tasks, test_shots=5, test_query=100)
    torch.manual_seed(args.seed)
    learner, optimizer = build("ANIL")
    started, cpu = time.perf_counter(), time.process_time()
    Trainer(learner, source, optimizer, iterations=args.iterations, seed=args.seed, eval_steps=(1,),
            progress=args.progress, log_every=max(args.iterations, 1)).fit()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    alpha, steps = 0.01, 10
    weight, bias = learner.head.weight.detach(), learner.head.bias.detach()
    curvature: list[float] = []
    query_mse: list[float] = []
    with torch.no_grad():
        for support_x, support_y, query_x, query_y in source.test_batches():
            phi, phi_query = learner.features(support_x), learner.features(query_x)
            design = torch.cat([phi, torch.ones_like(phi[..., :1])], -1)
            curvature += (alpha * 2 / design.shape[1] * torch.linalg.svdvals(design)[:, 0] ** 2).tolist()
            w = weight.expand(phi.shape[0], *weight.shape).clone()
            b = bias.expand(phi.shape[0], *bias.shape).clone()
            for _ in range(steps):  # the MSE gradient of the linear head, task by task (batched)
                residual = phi @ w.transpose(1, 2) + b[:, None, :] - support_y
                scale = 2 / residual[0].numel()
                w = w - alpha * scale * residual.transpose(1, 2) @ phi
                b = b - alpha * scale * residual.sum(1)
            errors = (phi_query @ w.transpose(1, 2) + b[:, None, :] - query_y) ** 2
            query_mse += errors.mean((1, 2)).tolist()
    # The loop above is ANIL's own fine-tuning written out: the library's evaluation must agree.
    library = evaluate(learner, source.test_batches(), (steps,))["loss"][str(steps)]["mean"]
    manual = sum(query_mse) / len(query_mse)

    def row(label: str, keep: Callable[[float], bool]) -> str:
        picked = [q for c, q in zip(curvature, query_mse) if keep(c)]
        values = torch.tensor(picked) if picked else torch.tensor([float("nan")])
        middle = torch.tensor([c for c in curvature if keep(c)] or [float("nan")]).median()
        return (f"| {label} | {len(picked)} | {float(middle):.2f} | {float(values.median()):.3g} | "
                f"{float(values.max()):.3g} |")

    table = "\n".join([
        "| test tasks | count | alpha * lambda_max (median) | query MSE after 10 steps: median | max |",
        "|---|---|---|---|---|",
        row("alpha * lambda_max < 2 (stable)", lambda c: c < 2),
        row("alpha * lambda_max >= 2 (diverges)", lambda c: c >= 2),
    ]) + (f"\n\nMean query MSE after {steps} steps over all test tasks: {manual:.6g} (this loop), "
          f"{library:.6g} (diffopt.training.evaluate)")
    unstable = sum(c >= 2 for c in curvature)
    return {"results": {"curvature": curvature, "query_mse_10_steps": query_mse,
                        "unstable_fraction": unstable / len(curvature), "mean_10_steps": manual,
                        "mean_10_steps_library": library},
            "table": table, "seconds": {"ANIL meta-training": seconds},
            "cpu_seconds": {"ANIL meta-training": cpu_seconds},
            "protocol": {"train_shots": 10, "test_shots": 5, "test_query": 100, "inner_lr": alpha, "inner_steps": 1,
                         "test_steps": steps, "meta_batch": 25, "outer": "Adam 1e-3"}}


EXPERIMENTS = {"maml": (run_maml, 70000), "metasgd": (run_metasgd, 70000), "family": (run_family, 70000),
               "anil-stability": (run_anil_stability, 5000)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--iterations", type=int, default=None, help="meta-iterations (default: the paper's 70,000)")
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shots", type=lambda s: [int(x) for x in s.split(",")], default=[5, 10, 20],
                   help="metasgd: comma-separated K values")
    p.add_argument("--methods", type=lambda s: s.split(","), default=["MAML", "FOMAML", "ANIL", "Reptile"],
                   help="family: comma-separated methods (MAML, FOMAML, ANIL, Reptile, Meta-SGD)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    function, default_iterations = EXPERIMENTS[args.experiment]
    args.iterations = default_iterations if args.iterations is None else args.iterations
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        out = function(args)
    finally:
        torch.set_num_threads(threads)
    out = {"experiment": args.experiment, "iterations": args.iterations, "test_tasks": args.test_tasks,
           "seed": args.seed, "machine": {**machine(), "threads": 1}, **out,
           "total_seconds": time.perf_counter() - started}
    print(f"sinusoid / {args.experiment}: {args.iterations} meta-iterations, {args.test_tasks} test tasks, "
          f"query MSE mean ± 95% CI\n")
    print(out["table"])
    print("\nwall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in out["seconds"].items())
          + f"; total {out['total_seconds']:.1f}")
    print("CPU time (s, one thread: the wall time on an idle core): "
          + ", ".join(f"{k} {v:.1f}" for k, v in out["cpu_seconds"].items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
