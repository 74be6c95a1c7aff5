"""Conv-4 Omniglot-shaped MAML meta-step: diffopt's InnerLoop against a plain task loop (time and memory).

Problem: 4 × [3×3 conv with 64 filters, BatchNorm, ReLU, 2×2 max-pool] on 28×28×1
inputs, a 5-way linear head; 5-way 1-shot (5 support images per task), 15 query
images per class (75), meta-batch 4 tasks, inner SGD lr 0.4, cross-entropy,
second order, K inner steps, float32, one thread, random data of those shapes.
BatchNorm is transductive (batch statistics everywhere, no running statistics),
as in MAML's published Omniglot numbers.

Implementations:

``plain loop``            per task ``functional_call`` + ``autograd.grad(create_graph=True)``,
                          the mean query loss over tasks, one ``backward()`` (the same
                          contract as ``InnerLoop.meta_loss(...).backward()``).
``plain loop, backward per task``  the same, but ``backward()`` after every task, so only
                          one task's graph is alive at a time (the memory-frugal loop).
``diffopt loop``          ``InnerLoop(..., vectorize=False, batchnorm="transductive")``,
                          ``meta_loss(...).backward()`` (one backward of the mean).
``diffopt vmap``          ``InnerLoop(..., vectorize=True, batchnorm="transductive")``, the same.
``diffopt MAML step``     ``MAML(..., vectorize=False).train_step(...)``: what ``Trainer`` and
                          ``diffopt train`` run, back-propagating task by task (issue 16).

Task-by-task rows (issue 16; ``diffopt.bench.baselines.PEER_ROWS``, backward per task):
``diffopt.innerloop`` (the drop-in for higher's ``innerloop_ctx``, torch.optim.SGD; target
≤ 1.03x the per-task-backward loop's time), ``higher loop`` (``higher.innerloop_ctx``),
``torchopt functional`` (``torchopt.sgd`` ``update`` / ``apply_updates``), ``learn2learn
stand-in`` (learn2learn does not build on Python 3.11: its ``clone`` + ``maml_update`` written out).

The headline baseline is the per-task-backward loop (what the peers' examples do); ratios to
it are the targets. The single-backward plain loop stays beside it.

Time: median per meta-step, implementations interleaved in one process; a
time ratio is the median over rounds of the per-round ratio to the plain loop.
Memory: each configuration runs in a fresh process (``--worker``): one warm-up
meta-step, then the peak RSS increase during one meta-step (``malloc_trim``,
``VmRSS`` before, peak mark reset, ``VmHWM`` after), then the peak of tensor
allocations during another (``torch.profiler`` memory events, cumulative sum in
time order, max; see ``_common``). The tensor peak is the number compared.
Targets: diffopt ≤ 1.05x the per-task-backward loop's time and ≤ 1.1x its memory.

    python benchmarks/engine_conv4.py [--quick] [--clock cpu] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common  # noqa: E402
from benchmarks._common import MEMORY_METHOD  # noqa: E402

from diffopt.algorithms import MAML  # noqa: E402
from diffopt.bench.baselines import PEER_ROWS, peer_row_available, plain_loop_step  # noqa: E402
from diffopt.optim import SGD  # noqa: E402
from diffopt.unroll import InnerLoop  # noqa: E402

TASK_LOOP_ROWS = ("diffopt.innerloop", "higher loop", "torchopt functional", "learn2learn stand-in")
IMPLEMENTATIONS = ("plain loop", "plain loop, backward per task", "diffopt loop", "diffopt vmap", "diffopt MAML step",
                   *TASK_LOOP_ROWS)
INNERLOOP_TIME_TARGET = 1.03
HEADLINE = "plain loop, backward per task"
TIME_TARGET, MEMORY_TARGET = 1.05, 1.10


def make_model(ways: int = 5, filters: int = 64, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, filters, 3, padding=1), nn.BatchNorm2d(filters, track_running_stats=False),
                   nn.ReLU(), nn.MaxPool2d(2)]
        channels = filters
    layers += [nn.Flatten(), nn.Linear(filters, ways)]  # 28 -> 14 -> 7 -> 3 -> 1
    return nn.Sequential(*layers).to(dtype)


def make_data(tasks: int, ways: int, shots: int, queries: int, size: int = 28,
              dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(tasks, ways * shots, 1, size, size, generator=g, dtype=dtype)
    qx = torch.randn(tasks, ways * queries, 1, size, size, generator=g, dtype=dtype)
    sy = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    return sx, sy, qx, qy


def plain_loop(model: nn.Module, data, steps: int, lr: float, per_task_backward: bool) -> Callable[[], None]:
    """diffopt.bench's plain loop (second order, cross-entropy) on this script's fixed meta-batch."""
    step = plain_loop_step(model, F.cross_entropy, lr, steps, first_order=False, per_task_backward=per_task_backward)
    return lambda: step(data)


def diffopt_loop(model: nn.Module, data, steps: int, lr: float, vectorize: bool) -> Callable[[], None]:
    sx, sy, qx, qy = data
    loop = InnerLoop(model, SGD(model.parameters(), lr=lr), F.cross_entropy, steps=steps, mode="second_order",
                     vectorize=vectorize, batchnorm="transductive")

    def meta_step() -> None:
        loop.meta_loss(sx, sy, qx, qy).backward()

    return meta_step


def maml_step(model: nn.Module, data, steps: int, lr: float) -> Callable[[], None]:
    """``MAML.train_step`` with an outer optimizer of lr 0 (the gradient without moving θ)."""
    learner = MAML(model, F.cross_entropy, inner_lr=lr, inner_steps=steps, vectorize=False, batchnorm="transductive")
    outer = torch.optim.SGD(learner.parameters(), lr=0.0)
    return lambda: learner.train_step(data, outer)


def task_loop_row(name: str, model: nn.Module, data, steps: int, lr: float) -> Callable[[], None]:
    """A per-task-backward row of issue 16 (``PEER_ROWS`` of diffopt.bench.baselines), second order."""
    step = PEER_ROWS[name](model, F.cross_entropy, lr, steps, False)
    return lambda: step(data)


def build(name: str, model: nn.Module, data, steps: int, lr: float) -> Callable[[], None]:
    params = list(model.parameters())
    if name == "plain loop":
        fn = plain_loop(model, data, steps, lr, per_task_backward=False)
    elif name == "plain loop, backward per task":
        fn = plain_loop(model, data, steps, lr, per_task_backward=True)
    elif name == "diffopt loop":
        fn = diffopt_loop(model, data, steps, lr, vectorize=False)
    elif name == "diffopt vmap":
        fn = diffopt_loop(model, data, steps, lr, vectorize=True)
    elif name == "diffopt MAML step":
        fn = maml_step(model, data, steps, lr)
    elif name in TASK_LOOP_ROWS:
        fn = task_loop_row(name, model, data, steps, lr)
    else:
        raise ValueError(name)

    def call() -> None:
        _common.zero_grads(params)
        fn()

    return call


def problem(args: Any, dtype: torch.dtype = torch.float32):
    model = make_model(args.ways, args.filters, dtype, args.seed)
    data = make_data(args.tasks, args.ways, args.shots, args.queries, args.size, dtype, args.seed)
    return model, data


# -- memory worker (a fresh process per configuration) -------------------------------------------
def worker(config: dict[str, Any]) -> dict[str, Any]:
    args = argparse.Namespace(**config)
    _common.set_threads(args.threads)
    model, data = problem(args)
    fn = build(args.implementation, model, data, args.steps_k, args.lr)
    fn()  # warm-up: library code pages, thread pools and caches are not charged
    _, rss, method = _common.peak_rss_increase(fn)
    _, peak = _common.peak_tensor_bytes(fn)
    return {"tensor_peak_bytes": peak, "rss_peak_bytes": rss, "rss_method": method}


def memory(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    config = {k: v for k, v in vars(args).items() if k in ("ways", "filters", "tasks", "shots", "queries", "size",
                                                          "seed", "lr", "threads")}
    for steps in args.steps:
        row: dict[str, dict[str, Any]] = {}
        for name in names:
            job = {**config, "implementation": name, "steps_k": steps}
            row[name] = entry = worker(job) if args.in_process else _common.run_worker(
                __file__, job, timeout=args.worker_timeout, threads=args.threads)
            if args.verbose:
                print(f"memory K={steps} {name}: {entry}", file=sys.stderr)
        out[f"K={steps}"] = row
    return out


def agreement(args: argparse.Namespace, names: list[str]) -> dict[str, float]:
    """max |meta-gradient − plain loop's| in float64 at K=1 (two tasks, to keep it short)."""
    small = argparse.Namespace(**{**vars(args), "tasks": min(args.tasks, 2)})
    model, data = problem(small, torch.float64)
    grads = {}
    for name in names:
        build(name, model, data, 1, args.lr)()
        grads[name] = [p.grad.detach().clone() for p in model.parameters()]
    ref = grads["plain loop"]
    return {name: max(float((a - b).abs().max()) for a, b in zip(g, ref)) for name, g in grads.items()}


def timing(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    model, data = problem(args)
    out = {}
    for steps in args.steps:
        fns = {name: build(name, model, data, steps, args.lr) for name in names}
        measure = _common.interleave_cpu if args.clock == "cpu" else _common.interleave
        samples = measure(fns, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                                     budget_s=args.budget)
        base = samples[HEADLINE if HEADLINE in samples else "plain loop"]
        out[f"K={steps}"] = {
            name: {**_common.summarize(v), "ratio": _common.paired_ratio(v, base), "samples": v}
            for name, v in samples.items()
        }
        if args.verbose:
            print(f"timed K={steps}", file=sys.stderr)
    return out


def tables(results: dict[str, Any], args: argparse.Namespace) -> str:
    headers = ["K", "implementation", "CPU ms per meta-step" if args.clock == "cpu" else "ms per meta-step", "time / per-task-backward loop", "tensor peak MiB",
               "memory / plain loop (one backward)", "memory / per-task-backward loop", "RSS peak increase MiB",
               "meta-grad max abs diff (float64, K=1)"]
    rows = []
    summary = []
    for steps in args.steps:
        key = f"K={steps}"
        timed, mem = results["timing"][key], results["memory"][key]
        base_m = mem["plain loop"].get("tensor_peak_bytes")
        base_m2 = mem.get("plain loop, backward per task", {}).get("tensor_peak_bytes")
        for name in results["implementations"]:
            m = mem[name]
            peak = m.get("tensor_peak_bytes")
            rss = m.get("rss_peak_bytes")
            tr = timed[name]["ratio"]["median"]
            mr = _common.ratio(peak, base_m2 if base_m2 is not None else base_m)
            rows.append([
                steps, name, _common.fmt_ms(timed[name]), _common.fmt_ratio(tr),
                "error" if peak is None else f"{peak / _common.MiB:.1f}", _common.fmt_ratio(_common.ratio(peak, base_m)),
                _common.fmt_ratio(_common.ratio(peak, base_m2)),
                "error" if rss is None else f"{rss / _common.MiB:.0f}",
                f"{results['agreement'].get(name, float('nan')):.1e}",
            ])
            if name.startswith("diffopt") and name not in TASK_LOOP_ROWS:
                q = timed[name]["ratio"]
                summary.append([f"K={steps}", name, f"{tr:.2f}x (IQR {q['q1']:.2f}–{q['q3']:.2f})",
                                "met" if tr is not None and tr <= TIME_TARGET else "missed",
                                _common.fmt_ratio(mr), "met" if mr is not None and mr <= MEMORY_TARGET else "missed"])
    text = _common.markdown_table(headers, rows)
    summary += innerloop_target_rows(results, args)
    text += "\n\nTargets (time ≤ 1.05x, memory ≤ 1.1x the per-task-backward loop; diffopt.innerloop's time ≤ 1.03x):\n\n"
    text += _common.markdown_table(["case", "implementation", "time ratio", "", "memory ratio", ""], summary)
    return text


def innerloop_target_rows(results: dict[str, Any], args: argparse.Namespace) -> list[list[str]]:
    """diffopt.innerloop ≤ 1.03x the per-task-backward loop's time at every K (issue 16 item 1)."""
    rows = []
    for steps in args.steps:
        timed, mem = results["timing"][f"K={steps}"], results["memory"][f"K={steps}"]
        if "diffopt.innerloop" not in timed:
            continue
        q = timed["diffopt.innerloop"]["ratio"]
        mr = _common.ratio(mem["diffopt.innerloop"].get("tensor_peak_bytes"), mem[HEADLINE].get("tensor_peak_bytes"))
        rows.append([f"K={steps}", "diffopt.innerloop (time ≤ 1.03x)", f"{q['median']:.2f}x (IQR {q['q1']:.2f}–"
                     f"{q['q3']:.2f})", "met" if q["median"] <= INNERLOOP_TIME_TARGET else "missed", _common.fmt_ratio(mr),
                     "met" if mr is not None and mr <= MEMORY_TARGET else "missed"])
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_arguments(parser)
    parser.add_argument("--steps", type=int, nargs="*", default=None, help="inner steps K (default 1 5; quick: 1)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15, help="query images per class")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--filters", type=int, default=64)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed rounds per K")
    parser.add_argument("--implementations", nargs="*", choices=IMPLEMENTATIONS, default=None)
    parser.add_argument("--worker-timeout", type=float, default=600)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--clock", choices=_common.CLOCKS, default="wall",
                        help="time per meta-step as wall time or as this thread's CPU time (a loaded machine)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--in-process", action="store_true",
                        help="measure memory in this process instead of a fresh one per configuration (tests)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _common.worker_reply(worker(json.loads(args.worker)))
        return {}
    if args.steps is None:
        args.steps = [1] if args.quick else [1, 5]
    if args.repeats is None:
        args.repeats = 4 if args.quick else 10
    _common.set_threads(args.threads)
    info = _common.machine_info()
    names = args.implementations or list(IMPLEMENTATIONS)
    for name in [n for n in names if peer_row_available(n) is not None]:
        print(f"# {name} left out: {peer_row_available(name)}")
        names.remove(name)
    for required in (HEADLINE, "plain loop"):  # the baselines every ratio needs
        if required not in names:
            names = [required] + names
    results: dict[str, Any] = {"implementations": names}
    results["agreement"] = agreement(args, names)
    results["timing"] = timing(args, names)
    if args.no_memory:
        results["memory"] = {f"K={k}": {n: {} for n in names} for k in args.steps}
    else:
        results["memory"] = memory(args, names)
    info["load_average_end"] = _common.load_average()
    text = tables(results, args)
    _common.report(args, "engine_conv4", f"Conv-4 MAML meta-step ({args.ways}-way {args.shots}-shot, {args.queries} "
                   f"query per class, meta-batch {args.tasks}, {args.filters} filters, transductive BatchNorm, second "
                   f"order, inner lr {args.lr}, float32)", info, results, text, exclude=("json", "worker"),
                   memory_method=MEMORY_METHOD)
    return results


if __name__ == "__main__":
    main()
