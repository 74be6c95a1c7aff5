"""Sinusoid MAML meta-step: diffopt's InnerLoop against a plain loop, higher, torch.func and a floor (issue 3).

Problem (MAML, Finn et al. 2017): MLP 1-40-40-1 with ReLU, meta-batch 25 tasks,
10 support + 10 query points per task, inner SGD with lr 0.01, K inner steps,
mean-squared error, float32, one thread. One *meta-step* is the meta-loss (the
mean query loss after K steps on every task) and ``backward()`` to the initial
weights.

Implementations (all in one process, interleaved in shuffled rounds):

``plain loop, backward per task``  per task: ``torch.func.functional_call`` +
                    ``torch.autograd.grad`` (``create_graph`` for second order) K times, then the
                    task's query loss / T and its ``backward()`` (what the peers' MAML examples do):
                    the headline baseline every ratio is divided by (issue 16).
``plain loop``      the same with one backward of the mean query loss.
``higher loop``     per task: ``higher.innerloop_ctx`` with torch.optim.SGD, backward per
                    task (higher's MAML example). First order: the gradients are
                    detached by ``grad_callback`` (higher has no first-order switch).
``torch.func``      ``vmap`` over tasks of K ``torch.func.grad`` steps (first order:
                    the gradients detached).
``baddbmm floor``   the MLP written by hand on task-batched weights (``torch.baddbmm``),
                    one ``autograd.grad`` of the summed task losses per step.
``diffopt vmap``    ``diffopt.unroll.InnerLoop(..., vectorize=True)`` (defaults,
                    so ``check_finite=True``), built once outside the timed region: the MLP
                    runs as task-batched kernels (``diffopt.unroll.lowered``, ``baddbmm``).
``diffopt vmap nocheck``  the same with ``check_finite=False``.
``diffopt vmap autograd HVP``  the same with the inner gradient written out but its second order and
                    the query loss's gradient left to autograd (``diffopt.unroll.lowered_hessian`` off).
``diffopt vmap autograd``  the same with autograd's inner gradient (``lowered_backprop`` off too).
``diffopt generic vmap``  ``vectorize="vmap"``: the model under ``torch.func.vmap`` (what
                    ``vectorize=True`` runs for a model that does not lower).
``diffopt loop``    ``InnerLoop(..., vectorize=False)``.

Task-by-task rows (issue 16; ``diffopt.bench.baselines.PEER_ROWS``, backward per task):
``diffopt.innerloop`` (the drop-in for higher's ``innerloop_ctx``, torch.optim.SGD),
``torchopt functional`` (``torchopt.sgd`` ``update`` / ``apply_updates``), ``learn2learn stand-in``
(learn2learn does not build on Python 3.11: its ``clone`` + ``maml_update`` written out). Target:
``diffopt.innerloop`` ≤ 1.10x the per-task-backward loop at every K, first and second order.

The vectorised path against the floor and torch.func (issue 16, item 3): ``diffopt vmap`` ≤ 1.25x
``baddbmm floor`` and ≥ 2x faster than ``torch.func vmap`` at every K, first and second order
(per-round ratios, in the "Vectorised path" table).

Each sample is the mean of as many back-to-back meta-steps as last ``--min-sample-ms`` (20 ms:
one call for the task loops, 3-25 for the vectorised rows), as ``timeit`` sizes its loops; the
garbage collector runs between samples. ``--min-sample-ms 0`` times single meta-steps, each right
after a full collection and the other rows' calls, so from cold caches: that reads the
millisecond-long vectorised meta-steps 1.4-1.75x slower than back to back, and code with more
Python per call (diffopt, torch.func) more so than the floor (``benchmarks/RESULTS.md`` section 10).

Before timing, every implementation's meta-gradient is compared with the plain
loop's in float64 (max abs difference printed). Ratios are against the per-task-backward
plain loop measured in the same run: the median over rounds of the per-round ratio. Targets: diffopt second order at K=5
≤ 0.2x that loop, first order ≤ 0.25x.

    python benchmarks/engine_sinusoid.py [--quick] [--clock cpu] [--json PATH]
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common  # noqa: E402

from diffopt.bench.baselines import PEER_ROWS, func_vmap_step, higher_step, peer_row_available, plain_loop_step  # noqa: E402
from diffopt.optim import SGD  # noqa: E402
from diffopt.unroll import InnerLoop  # noqa: E402

HEADLINE = "plain loop, backward per task"
TASK_LOOP_ROWS = ("diffopt.innerloop", "torchopt functional", "learn2learn stand-in")  # (and "higher loop")
IMPLEMENTATIONS = (
    "plain loop", HEADLINE, "higher loop", "torch.func vmap", "baddbmm floor", "diffopt vmap", "diffopt vmap nocheck",
    "diffopt vmap autograd HVP", "diffopt vmap autograd", "diffopt generic vmap", "diffopt loop", *TASK_LOOP_ROWS,
)
INNERLOOP_TARGET = 1.10
FLOOR_TARGET, TORCH_FUNC_SPEEDUP = 1.25, 2.0  # diffopt vmap / floor, torch.func / diffopt vmap
TARGETS = {("second_order", 5): 0.2, ("first_order", 5): 0.25}


def make_model(hidden: int = 40, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1)).to(dtype)


def make_data(tasks: int, shots: int, queries: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Sinusoid tasks y = A sin(x − b), A ~ U[0.1, 5], b ~ U[0, π], x ~ U[−5, 5]."""
    g = torch.Generator().manual_seed(seed)
    amplitude = torch.empty(tasks, 1, 1, dtype=dtype).uniform_(0.1, 5.0, generator=g)
    phase = torch.empty(tasks, 1, 1, dtype=dtype).uniform_(0.0, math.pi, generator=g)
    x = torch.empty(tasks, shots + queries, 1, dtype=dtype).uniform_(-5.0, 5.0, generator=g)
    y = amplitude * torch.sin(x - phase)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


# -- implementations ---------------------------------------------------------------------
# The three baselines are diffopt.bench's (one implementation, shared with ``diffopt bench``), here
# bound to this script's fixed meta-batch and the mean-squared error.
def plain_loop(model: nn.Module, data, steps: int, lr: float, first_order: bool) -> Callable[[], None]:
    step = plain_loop_step(model, F.mse_loss, lr, steps, first_order)
    return lambda: step(data)


def higher_loop(model: nn.Module, data, steps: int, lr: float, first_order: bool) -> Callable[[], None]:
    step = higher_step(model, F.mse_loss, lr, steps, first_order)
    return lambda: step(data)


def func_vmap(model: nn.Module, data, steps: int, lr: float, first_order: bool) -> Callable[[], None]:
    step = func_vmap_step(model, F.mse_loss, lr, steps, first_order)
    return lambda: step(data)


def baddbmm_floor(model: nn.Module, data, steps: int, lr: float, first_order: bool) -> Callable[[], None]:
    """The MLP by hand on weights with a task dimension: (T, in, out) matrices and baddbmm."""
    sx, sy, qx, qy = data
    linears = [m for m in model if isinstance(m, nn.Linear)]
    tasks = sx.shape[0]

    def forward(ws, x):
        h = x
        for i in range(0, len(ws), 2):
            h = torch.baddbmm(ws[i + 1], h, ws[i])
            if i + 2 < len(ws):
                h = torch.relu(h)
        return h

    def losses(ws, x, y):
        return ((forward(ws, x) - y) ** 2).mean(dim=(1, 2))

    def meta_step() -> None:
        ws = []
        for m in linears:
            ws.append(m.weight.t().unsqueeze(0).expand(tasks, *m.weight.t().shape))
            ws.append(m.bias.view(1, 1, -1).expand(tasks, 1, m.bias.shape[0]))
        for _ in range(steps):
            grads = torch.autograd.grad(losses(ws, sx, sy).sum(), ws, create_graph=not first_order)
            ws = [w - lr * g for w, g in zip(ws, grads)]
        losses(ws, qx, qy).mean().backward()

    return meta_step


def diffopt_loop(model: nn.Module, data, steps: int, lr: float, first_order: bool, vectorize: bool | str,
                 check_finite: bool = True, written_out: bool = True,
                 written_out_hvp: bool = True) -> Callable[[], None]:
    sx, sy, qx, qy = data
    loop = InnerLoop(model, SGD(model.parameters(), lr=lr), F.mse_loss, steps=steps,
                     mode="first_order" if first_order else "second_order", vectorize=vectorize,
                     check_finite=check_finite)
    if not written_out:  # the lowered forward with autograd's inner gradient (diffopt.unroll.lowered_backprop off)
        loop._backprop = None
    if not written_out_hvp:  # the inner gradient written out; its second order and the query loss's gradient
        # left to autograd (lowered_hessian off)
        loop._hessian = None

    def meta_step() -> None:
        loop.meta_loss(sx, sy, qx, qy).backward()

    return meta_step


def task_loop_row(name: str, model: nn.Module, data, steps: int, lr: float, first_order: bool) -> Callable[[], None]:
    """The per-task-backward rows of issue 16: the plain loop and ``PEER_ROWS`` (diffopt.bench.baselines)."""
    if name == HEADLINE:
        step = plain_loop_step(model, F.mse_loss, lr, steps, first_order, per_task_backward=True)
    else:
        step = PEER_ROWS[name](model, F.mse_loss, lr, steps, first_order)
    return lambda: step(data)


def build(name: str, model: nn.Module, data, steps: int, lr: float, first_order: bool) -> Callable[[], None]:
    if name == HEADLINE or name in TASK_LOOP_ROWS:
        return task_loop_row(name, model, data, steps, lr, first_order)
    if name == "plain loop":
        return plain_loop(model, data, steps, lr, first_order)
    if name == "higher loop":
        return higher_loop(model, data, steps, lr, first_order)
    if name == "torch.func vmap":
        return func_vmap(model, data, steps, lr, first_order)
    if name == "baddbmm floor":
        return baddbmm_floor(model, data, steps, lr, first_order)
    if name == "diffopt vmap":
        return diffopt_loop(model, data, steps, lr, first_order, vectorize=True)
    if name == "diffopt vmap nocheck":
        return diffopt_loop(model, data, steps, lr, first_order, vectorize=True, check_finite=False)
    if name == "diffopt vmap autograd HVP":
        return diffopt_loop(model, data, steps, lr, first_order, vectorize=True, written_out_hvp=False)
    if name == "diffopt vmap autograd":
        return diffopt_loop(model, data, steps, lr, first_order, vectorize=True, written_out=False)
    if name == "diffopt generic vmap":
        return diffopt_loop(model, data, steps, lr, first_order, vectorize="vmap")
    if name == "diffopt loop":
        return diffopt_loop(model, data, steps, lr, first_order, vectorize=False)
    raise ValueError(name)


def with_zeroed_grads(model: nn.Module, fn: Callable[[], None]) -> Callable[[], None]:
    params = list(model.parameters())

    def call() -> None:
        _common.zero_grads(params)
        fn()

    return call


# -- agreement check -----------------------------------------------------------------------
def meta_gradient(name: str, model: nn.Module, data, steps: int, lr: float, first_order: bool) -> list[torch.Tensor]:
    fn = build(name, model, data, steps, lr, first_order)
    _common.zero_grads(list(model.parameters()))
    fn()
    return [p.grad.detach().clone() for p in model.parameters()]


def agreement(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, float]]:
    """max |meta-gradient − plain loop's| in float64, per (order, K) and implementation."""
    model = make_model(args.hidden, torch.float64, args.seed)
    data = make_data(args.tasks, args.shots, args.queries, torch.float64, args.seed)
    out: dict[str, dict[str, float]] = {}
    for order in args.orders:
        for steps in args.steps:
            reference = meta_gradient("plain loop", model, data, steps, args.lr, order == "first_order")
            row = {}
            for name in names:
                grads = meta_gradient(name, model, data, steps, args.lr, order == "first_order")
                row[name] = max(float((a - b).abs().max()) for a, b in zip(grads, reference))
            out[f"{order}/K={steps}"] = row
    return out


# -- timing ----------------------------------------------------------------------------------
def timing(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    model = make_model(args.hidden, torch.float32, args.seed)
    data = make_data(args.tasks, args.shots, args.queries, torch.float32, args.seed)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for order in args.orders:
        for steps in args.steps:
            fns = {
                name: with_zeroed_grads(model, build(name, model, data, steps, args.lr, order == "first_order"))
                for name in names
            }
            measure = _common.interleave_cpu if args.clock == "cpu" else _common.interleave
            samples = measure(fns, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                              budget_s=args.budget, min_sample_s=args.min_sample_ms / 1e3 or None)
            base = samples[HEADLINE]
            out[f"{order}/K={steps}"] = {
                name: {**_common.summarize(v), "ratio": _common.paired_ratio(v, base), "samples": v}
                for name, v in samples.items()
            }
            if args.verbose:
                print(f"timed {order} K={steps}", file=sys.stderr)
    return out


def tables(results: dict[str, Any], args: argparse.Namespace) -> str:
    keys = [f"{o}/K={k}" for o in args.orders for k in args.steps]
    short = {"second_order": "SO", "first_order": "FO"}
    headers = ["implementation"] + [f"{short[k.split('/')[0]]} K={k.split('=')[1]}" for k in keys]
    timed = results["timing"]
    rows = []
    for name in results["implementations"]:
        row = [name]
        for key in keys:
            s = timed[key][name]
            row.append(f"{_common.fmt_ms(s)} ({_common.fmt_ratio(s['ratio']['median'])})")
        rows.append(row)
    clock = " (this thread's CPU time)" if args.clock == "cpu" else ""
    text = (f"Median ms per meta-step{clock} ±IQR/2 (median of the per-round ratios to the plain loop with a "
            "backward per task):\n\n") + _common.markdown_table(headers, rows)
    agree = results["agreement"]
    rows = [[name] + [f"{agree[key][name]:.1e}" for key in keys] for name in results["implementations"]]
    text += "\n\nMax abs difference of the meta-gradient from the plain loop's (float64):\n\n"
    text += _common.markdown_table(headers, rows)
    target_rows = []
    for (order, steps), bound in TARGETS.items():
        key = f"{order}/K={steps}"
        if key not in timed:
            continue
        for name in ("diffopt vmap", "diffopt vmap nocheck", "diffopt loop"):
            if name in timed[key]:
                q = timed[key][name]["ratio"]
                r = q["median"]
                target_rows.append([f"{short[order]} K={steps}", name,
                                    f"{r:.2f}x (IQR {q['q1']:.2f}–{q['q3']:.2f})", f"≤ {bound}x",
                                    "met" if r <= bound else "missed"])
    target_rows += innerloop_target_rows(timed, keys)
    vectorised = vectorised_path_rows(timed, keys)
    if vectorised:
        text += ("\n\nVectorised path (issue 16 item 3; per-round ratios):\n\n" + _common.markdown_table(
            ["case", "diffopt vmap / floor", f"target ≤ {FLOOR_TARGET}x", "torch.func / diffopt vmap",
             f"target ≥ {TORCH_FUNC_SPEEDUP}x", "autograd's Hessian-vector product / floor",
             "autograd's gradient / floor", "generic vmap / floor"], vectorised))
    if target_rows:
        text += "\n\nTargets:\n\n" + _common.markdown_table(["case", "implementation", "ratio to per-task loop",
                                                            "target", ""], target_rows)
    return text


def vectorised_path_rows(timed: dict[str, Any], keys: list[str]) -> list[list[str]]:
    """``diffopt vmap`` against the floor (≤ 1.25x) and torch.func (≥ 2x faster), per round (issue 16 item 3)."""
    short = {"second_order": "SO", "first_order": "FO"}
    rows = []
    for key in keys:
        cell = timed[key]
        if not all(name in cell for name in ("diffopt vmap", "baddbmm floor", "torch.func vmap")):
            continue
        ours, floor, func = (cell[n]["samples"] for n in ("diffopt vmap", "baddbmm floor", "torch.func vmap"))
        to_floor = _common.paired_ratio(ours, floor)["median"]
        speedup = _common.paired_ratio(func, ours)["median"]
        others = [f"{_common.paired_ratio(cell[name]['samples'], floor)['median']:.2f}x" if name in cell else "–"
                  for name in ("diffopt vmap autograd HVP", "diffopt vmap autograd", "diffopt generic vmap")]
        order, steps = key.split("/")
        rows.append([f"{short[order]} {steps}", f"{to_floor:.2f}x", "met" if to_floor <= FLOOR_TARGET else "missed",
                     f"{speedup:.2f}x", "met" if speedup >= TORCH_FUNC_SPEEDUP else "missed", *others])
    return rows


def innerloop_target_rows(timed: dict[str, Any], keys: list[str]) -> list[list[str]]:
    """diffopt.innerloop ≤ 1.10x the per-task-backward loop in every timed cell (issue 16 item 1)."""
    short = {"second_order": "SO", "first_order": "FO"}
    rows = []
    for key in keys:
        if "diffopt.innerloop" in timed[key]:
            q = timed[key]["diffopt.innerloop"]["ratio"]
            order, steps = key.split("/")
            rows.append([f"{short[order]} {steps}", "diffopt.innerloop", f"{q['median']:.2f}x (IQR {q['q1']:.2f}–"
                         f"{q['q3']:.2f})", f"≤ {INNERLOOP_TARGET}x", "met" if q["median"] <= INNERLOOP_TARGET else "missed"])
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_arguments(parser)
    parser.add_argument("--steps", type=int, nargs="*", default=[1, 5, 10], help="inner steps K")
    parser.add_argument("--orders", nargs="*", default=["second_order", "first_order"],
                        choices=["second_order", "first_order"])
    parser.add_argument("--tasks", type=int, default=25)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed rounds per configuration")
    parser.add_argument("--implementations", nargs="*", choices=IMPLEMENTATIONS, default=None)
    parser.add_argument("--clock", choices=_common.CLOCKS, default="wall",
                        help="time per meta-step as wall time or as this thread's CPU time (a loaded machine)")
    parser.add_argument("--min-sample-ms", type=float, default=20.0,
                        help="each sample the mean of as many back-to-back meta-steps as last this long "
                             "(default 20; 0: one meta-step per sample, after a full garbage collection)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 10 if args.quick else 40
    if args.budget is None and args.quick:
        args.budget = 3.0
    _common.set_threads(args.threads)
    names = args.implementations or list(IMPLEMENTATIONS)
    for name in [n for n in names if peer_row_available(n) is not None]:
        print(f"# {name} left out: {peer_row_available(name)}")
        names.remove(name)
    for required in (HEADLINE, "plain loop"):  # (the ratios' and the agreement's references)
        if required not in names:
            names = [required] + names
    info = _common.machine_info()
    results: dict[str, Any] = {"implementations": names}
    results["agreement"] = agreement(args, names)
    results["timing"] = timing(args, names)
    info["load_average_end"] = _common.load_average()
    text = tables(results, args)
    _common.report(args, "engine_sinusoid", f"Sinusoid MAML meta-step (MLP 1-{args.hidden}-{args.hidden}-1, "
                   f"{args.tasks} tasks, {args.shots} support + {args.queries} query, inner SGD lr {args.lr}, float32)",
                   info, results, text)
    return results


if __name__ == "__main__":
    main()
