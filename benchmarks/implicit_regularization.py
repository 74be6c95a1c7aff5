"""Regularisation selection by implicit differentiation (issue 19, part 3): per-feature L2 weights of
logistic regression on scikit-learn's breast-cancer data, tuned by hypergradient descent on the
validation loss, against grid search, random search and torchopt's implicit API.

The bilevel problem (the benchopt "regularisation selection" benchmark)::

    min_λ  L_val(w*(λ))   with   w*(λ) = argmin_w  mean BCE(X_train w, y_train) + ½ Σ_j λ_j w_j²

over 30 per-feature weights λ = exp(log λ) (the intercept unpenalised). The inner problem is solved
by scipy's L-BFGS-B (warm-started from the previous solution); the hypergradient
``dL_val/dlog λ = −(∂F/∂log λ)ᵀ (∂F/∂w)⁻ᵀ ∇L_val`` comes from ``diffopt.implicit.custom_root`` (or
``torchopt.diff.implicit.custom_root``, same inner solver, same CG settings, same Adam steps) with
``F = ∇_w`` of the inner objective. Data: standardised on the training part; train / validation /
test = 50 / 25 / 25 %, a different stratified split per repeat.

Baselines in the same run: grid search over one shared λ (``--grid`` values, log-spaced
1e-4..1e2), random search over per-feature λ (log-uniform in the same range) for the same wall time
as the diffopt run; and, as a check of the optimisation, diffopt's hypergradient descent on one
shared λ (it should land where the grid's best value is). Reported: medians over ``--repeats`` of
the final validation and test loss and the wall time, ratios against the baselines, and the largest
relative difference between diffopt's and torchopt's hypergradients at the same point.

    python benchmarks/implicit_regularization.py [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (add_common_arguments, command_line, describe_machine, machine_info,  # noqa: E402
                                markdown_table, set_threads, write_json)
from diffopt.implicit import CG, custom_root  # noqa: E402

F64 = torch.float64
LOW, HIGH = math.log(1e-4), math.log(1e2)


def load(seed: int) -> dict[str, torch.Tensor]:
    """Breast cancer (569 x 30), stratified 50/25/25 split, standardised on train, intercept column appended."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.5, stratify=y, random_state=seed)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest,
                                                    random_state=seed)
    mean, std = x_train.mean(0), x_train.std(0)

    def prepare(features: np.ndarray) -> torch.Tensor:
        z = torch.from_numpy((features - mean) / std)
        return torch.cat([z, torch.ones(len(z), 1, dtype=F64)], 1)

    return {"x_train": prepare(x_train), "y_train": torch.from_numpy(y_train).to(F64),
            "x_val": prepare(x_val), "y_val": torch.from_numpy(y_val).to(F64),
            "x_test": prepare(x_test), "y_test": torch.from_numpy(y_test).to(F64)}


def penalty(log_lam: torch.Tensor, features: int) -> torch.Tensor:
    """Per-coefficient L2 weights: exp(log λ) for the features (one shared λ when log λ has one entry),
    0 for the intercept."""
    return torch.cat([log_lam.exp().expand(features), log_lam.new_zeros(1)])


def optimality(w: torch.Tensor, log_lam: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇_w of the inner objective: Xᵀ(σ(Xw) − y)/n + λ ⊙ w."""
    return x.T @ (torch.sigmoid(x @ w) - y) / x.shape[0] + penalty(log_lam, x.shape[1] - 1) * w


def lbfgs(init: torch.Tensor | None, log_lam: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The inner problem by scipy's L-BFGS-B (gradient norm ~1e-10), warm-started from ``init``."""
    xn, yn, lam = x.detach().numpy(), y.detach().numpy(), penalty(log_lam.detach(), x.shape[1] - 1).numpy()

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = xn @ w
        value = np.mean(np.logaddexp(0.0, z) - yn * z) + 0.5 * np.sum(lam * w * w)
        return value, xn.T @ (0.5 * (1 + np.tanh(0.5 * z)) - yn) / len(yn) + lam * w

    start = np.zeros(xn.shape[1]) if init is None else init.detach().numpy()
    result = minimize(fun, start, jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 0.0, "maxiter": 5000})
    return torch.from_numpy(result.x)


def bce(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y)


CG_ITERATIONS, CG_TOL = 100, 1e-10
diffopt_solver = custom_root(optimality, solve=CG(iterations=CG_ITERATIONS, tol=CG_TOL))(lbfgs)


def torchopt_solver() -> Any:
    import torchopt
    return torchopt.diff.implicit.custom_root(
        optimality, argnums=1,
        solve=torchopt.linear_solve.solve_cg(maxiter=CG_ITERATIONS, rtol=CG_TOL, atol=0.0))(lbfgs)


def losses(w: torch.Tensor, data: dict[str, torch.Tensor]) -> tuple[float, float]:
    return float(bce(w, data["x_val"], data["y_val"])), float(bce(w, data["x_test"], data["y_test"]))


def hypergradient_descent(solver: Any, data: dict[str, torch.Tensor], steps: int, lr: float,
                          shared: bool = False) -> dict[str, Any]:
    """Adam on log λ (start: λ = 1e-2 for every feature, or one shared λ), hypergradient through ``solver``."""
    size = 1 if shared else data["x_train"].shape[1] - 1
    log_lam = torch.full((size,), math.log(1e-2), dtype=F64, requires_grad=True)
    optimizer = torch.optim.Adam([log_lam], lr=lr)
    w = None
    start = time.perf_counter()
    backward = 0.0
    for _ in range(steps):
        w = solver(w, log_lam, data["x_train"], data["y_train"])
        loss = bce(w, data["x_val"], data["y_val"])
        optimizer.zero_grad()
        tick = time.perf_counter()
        loss.backward()
        backward += time.perf_counter() - tick
        optimizer.step()
        w = w.detach()
    w = lbfgs(w, log_lam, data["x_train"], data["y_train"])
    seconds = time.perf_counter() - start
    val, test = losses(w, data)
    return {"val": val, "test": test, "seconds": seconds, "backward_ms": 1e3 * backward / steps,
            "log_lam": log_lam.detach()}


def grid_search(data: dict[str, torch.Tensor], values: int) -> dict[str, Any]:
    start = time.perf_counter()
    best: tuple[float, float, float] | None = None
    w = None
    d = data["x_train"].shape[1] - 1
    for log_value in torch.linspace(LOW, HIGH, values, dtype=F64):
        w = lbfgs(w, torch.full((d,), float(log_value), dtype=F64), data["x_train"], data["y_train"])
        val, test = losses(w, data)
        if best is None or val < best[0]:
            best = (val, test, math.exp(float(log_value)))
    assert best is not None
    return {"val": best[0], "test": best[1], "lam": best[2], "seconds": time.perf_counter() - start}


def random_search(data: dict[str, torch.Tensor], budget: float, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    d = data["x_train"].shape[1] - 1
    start = time.perf_counter()
    best: tuple[float, float] | None = None
    trials = 0
    while trials == 0 or time.perf_counter() - start < budget:
        log_lam = LOW + (HIGH - LOW) * torch.rand(d, generator=g, dtype=F64)
        val, test = losses(lbfgs(None, log_lam, data["x_train"], data["y_train"]), data)
        trials += 1
        if best is None or val < best[0]:
            best = (val, test)
    assert best is not None
    return {"val": best[0], "test": best[1], "trials": trials, "seconds": time.perf_counter() - start}


def hypergradient_agreement(data: dict[str, torch.Tensor], seed: int) -> float:
    """Largest relative difference between diffopt's and torchopt's hypergradients at a random log λ."""
    g = torch.Generator().manual_seed(seed)
    log_lam = LOW / 2 + (HIGH - LOW) / 4 * torch.rand(data["x_train"].shape[1] - 1, generator=g, dtype=F64)
    grads = []
    for solver in (diffopt_solver, torchopt_solver()):
        v = log_lam.clone().requires_grad_()
        (grad,) = torch.autograd.grad(bce(solver(None, v, data["x_train"], data["y_train"]), data["x_val"],
                                          data["y_val"]), v)
        grads.append(grad)
    return float((grads[0] - grads[1]).abs().max() / grads[1].abs().max())


def run(repeats: int, steps: int, lr: float, grid: int, seed: int = 0, with_torchopt: bool = True) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {"diffopt": [], "torchopt": [], "diffopt_shared": [], "grid": [],
                                             "random": []}
    agreement = []
    warm = load(seed)
    for solver in [diffopt_solver] + ([torchopt_solver()] if with_torchopt else []):  # first calls: imports, caches
        hypergradient_descent(solver, warm, 2, lr)
    for r in range(repeats):
        data = load(seed + r)
        rows["diffopt"].append(hypergradient_descent(diffopt_solver, data, steps, lr))
        if with_torchopt:
            rows["torchopt"].append(hypergradient_descent(torchopt_solver(), data, steps, lr))
            agreement.append(hypergradient_agreement(data, seed + r))
        rows["diffopt_shared"].append(hypergradient_descent(diffopt_solver, data, steps, lr, shared=True))
        rows["grid"].append(grid_search(data, grid))
        rows["random"].append(random_search(data, rows["diffopt"][-1]["seconds"], seed + r))
    summary = {name: {key: statistics.median(row[key] for row in runs)
                      for key in ("val", "test", "seconds") if runs}
               for name, runs in rows.items() if runs}
    for name in ("diffopt", "torchopt", "diffopt_shared"):
        if rows[name]:
            summary[name]["backward_ms"] = statistics.median(row["backward_ms"] for row in rows[name])
    summary["random"]["trials"] = statistics.median(row["trials"] for row in rows["random"])
    summary["grid"]["lam"] = statistics.median(row["lam"] for row in rows["grid"])
    return {"summary": summary, "runs": {k: [{kk: vv for kk, vv in row.items() if kk != "log_lam"} for row in v]
                                         for k, v in rows.items()},
            "hypergradient_max_relative_difference": max(agreement) if agreement else None,
            "settings": {"repeats": repeats, "steps": steps, "lr": lr, "grid": grid, "cg_iterations": CG_ITERATIONS,
                         "cg_tol": CG_TOL}}


def report(result: dict[str, Any]) -> str:
    s = result["summary"]
    labels = {"diffopt": f"diffopt custom_root + Adam ({result['settings']['steps']} steps, per-feature λ)",
              "torchopt": "torchopt custom_root + Adam (same)",
              "diffopt_shared": "diffopt custom_root + Adam, one shared λ",
              "grid": f"grid search, one shared λ ({result['settings']['grid']} values)",
              "random": "random search, per-feature λ (diffopt's time)"}
    rows = []
    for name, label in labels.items():
        if name not in s:
            continue
        extra = ""
        if name == "random":
            extra = f"{s[name]['trials']:.0f} trials"
        elif name == "grid":
            extra = f"best λ = {s[name]['lam']:.3g}"
        elif "backward_ms" in s[name]:
            extra = f"hypergradient {s[name]['backward_ms']:.2f} ms/step"
        rows.append([label, f"{s[name]['val']:.4f}", f"{s[name]['test']:.4f}", f"{s[name]['seconds']:.2f} s",
                     f"{s[name]['seconds'] / s['diffopt']['seconds']:.2f}x", extra])
    table = markdown_table(["method", "validation loss", "test loss", "wall time", "time / diffopt's", "notes"], rows)
    lines = [table, ""]
    if result["hypergradient_max_relative_difference"] is not None:
        lines.append(f"diffopt vs torchopt hypergradient, largest relative difference: "
                     f"{result['hypergradient_max_relative_difference']:.1e}")
    if "torchopt" in s:
        per_step = s["diffopt"]["backward_ms"] / s["torchopt"]["backward_ms"]
        lines.append(f"hypergradient time diffopt / torchopt: {per_step:.2f}x")
    ours, grid, rand = s["diffopt"], s["grid"], s["random"]
    lines.append(f"validation loss diffopt / grid: {ours['val'] / grid['val']:.3f}, / random: "
                 f"{ours['val'] / rand['val']:.3f}; test loss diffopt / grid: {ours['test'] / grid['test']:.3f}, "
                 f"/ random: {ours['test'] / rand['test']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="outer Adam steps")
    parser.add_argument("--lr", type=float, default=0.1, help="outer Adam learning rate on log λ")
    parser.add_argument("--grid", type=int, default=10, help="grid-search values of the shared λ (>= 8)")
    parser.add_argument("--no-torchopt", action="store_true", help="skip torchopt (when it is not installed)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 5)
    steps = args.steps or (30 if args.quick else 100)
    result = run(repeats, steps, args.lr, args.grid, args.seed, with_torchopt=not args.no_torchopt)
    result["machine"] = machine_info()
    result["command"] = command_line()
    print(f"# {command_line()}\n# {describe_machine(result['machine'])}\n")
    print(report(result))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
