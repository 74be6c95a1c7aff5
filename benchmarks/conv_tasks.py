"""Conv-4 across tasks: task-batched grouped convolutions against the task loop and vmap (issue 16, item 4).

Problem: MAML's Omniglot Conv-4 (4 × [3×3 conv, 64 filters, BatchNorm, ReLU, 2×2 max-pool],
a 5-way head) on 28×28×1 inputs, 5-way 1-shot with 15 queries per class, inner SGD lr 0.4,
cross-entropy, transductive BatchNorm, K inner steps, float32, one thread, random data.
One meta-step is ``InnerLoop.meta_loss(...).backward()``.

Implementations, all ``diffopt.unroll.InnerLoop`` on the same model and batch:

``task loop``        ``vectorize=False``: one task after another (what ``"auto"`` picked for
                     convolutional models before the lowering).
``grouped conv``     ``vectorize=True``: the tasks folded into the channels of one grouped
                     convolution per layer, BatchNorm over ``T·C`` channels
                     (:mod:`diffopt.unroll.lowered`).
``vmap``             ``vectorize="vmap"``: the generic ``torch.func.vmap`` path.

For each meta-batch size (4, 16, 32 by default) the three are timed in interleaved rounds
(median ms; ratio = median of per-round ratios to the task loop) and their peak tensor
memory per meta-step is measured (``torch.profiler`` allocation events). Their
meta-gradients are compared in float64 first. The crossover (the smallest meta-batch at
which the grouped convolution is faster than the task loop) is what ``vectorize="auto"``
uses (``diffopt.unroll.functional.choose_vectorize``).

    python benchmarks/conv_tasks.py [--quick] [--clock cpu] [--json PATH]
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common  # noqa: E402

from diffopt.optim import SGD  # noqa: E402
from diffopt.recipes import conv4  # noqa: E402
from diffopt.unroll import InnerLoop  # noqa: E402

IMPLEMENTATIONS = {"task loop": False, "grouped conv": True, "vmap": "vmap"}


def make_batch(tasks: int, ways: int, shots: int, queries: int, size: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(tasks, ways * shots, 1, size, size, generator=g, dtype=dtype)
    qx = torch.randn(tasks, ways * queries, 1, size, size, generator=g, dtype=dtype)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return sx, sy, qx, qy


def meta_step(model: nn.Module, batch, steps: int, lr: float, order: str, vectorize: Any) -> Callable[[], None]:
    loop = InnerLoop(model, SGD(model.parameters(), lr=lr), F.cross_entropy, steps=steps, mode=order,
                     vectorize=vectorize, batchnorm="transductive")
    params = list(model.parameters())

    def step() -> None:
        _common.zero_grads(params)
        loop.meta_loss(*batch).backward()

    return step


def agreement(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(args.seed)
    model = conv4(args.ways, hidden=args.filters).double()
    batch = make_batch(3, args.ways, args.shots, 2, args.size, torch.float64, args.seed)
    grads = {}
    for name, vectorize in IMPLEMENTATIONS.items():
        meta_step(model, batch, 2, args.lr, "second_order", vectorize)()
        grads[name] = [p.grad.clone() for p in model.parameters()]
    return {name: max(float((a - b).abs().max()) for a, b in zip(g, grads["task loop"])) for name, g in grads.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_arguments(parser)
    parser.add_argument("--tasks", type=int, nargs="*", default=[4, 16, 32])
    parser.add_argument("--steps", type=int, nargs="*", default=[1, 5])
    parser.add_argument("--orders", nargs="*", default=["second_order", "first_order"])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--filters", type=int, default=64)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed rounds per configuration")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--clock", choices=_common.CLOCKS, default="wall",
                        help="cpu: each sample is this thread's CPU time (for a loaded machine)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = [1], args.repeats or 5
        args.budget = args.budget or 20.0
    args.repeats = args.repeats or 15
    _common.set_threads(args.threads)
    info = _common.machine_info()
    results: dict[str, Any] = {"agreement": agreement(args), "timing": {}, "memory": {}}
    torch.manual_seed(args.seed)
    model = conv4(args.ways, hidden=args.filters)
    rows = []
    for order in args.orders:
        for steps in args.steps:
            for tasks in args.tasks:
                key = f"{order}/K={steps}/T={tasks}"
                batch = make_batch(tasks, args.ways, args.shots, args.queries, args.size, torch.float32, args.seed)
                fns = {name: meta_step(model, batch, steps, args.lr, order, v) for name, v in IMPLEMENTATIONS.items()}
                measure = _common.interleave_cpu if args.clock == "cpu" else _common.interleave
                samples = measure(fns, repeats=args.repeats, warmup=1, seed=args.seed, budget_s=args.budget)
                base = samples["task loop"]
                timed = {name: {**_common.ms(_common.summarize(v)), "ratio": _common.paired_ratio(v, base)}
                         for name, v in samples.items()}
                results["timing"][key] = timed
                memory = {}
                if not args.no_memory:
                    for name, fn in fns.items():
                        memory[name] = _common.peak_tensor_bytes(fn)[1] / _common.MiB
                    results["memory"][key] = memory
                row = [order.replace("second_order", "SO").replace("first_order", "FO"), str(steps), str(tasks)]
                for name in IMPLEMENTATIONS:
                    cell = f"{timed[name]['median']:.1f} ({timed[name]['ratio']['median']:.2f}x)"
                    if memory:
                        cell += f" / {memory[name]:.0f} MiB"
                    row.append(cell)
                rows.append(row)
                print(f"timed {key}", file=sys.stderr)
    info["load_average_end"] = _common.load_average()
    headers = ["order", "K", "tasks"] + [f"{n}: ms (ratio) / peak" for n in IMPLEMENTATIONS]
    clock = " (this thread's CPU time)" if args.clock == "cpu" else ""
    text = (f"Median ms per meta-step{clock} (median of per-round ratios to the task loop) / peak tensor memory:\n\n"
            + _common.markdown_table(headers, rows))
    text += "\n\nMax abs difference of the meta-gradient from the task loop's (float64, 3 tasks, K=2): " + ", ".join(
        f"{name} {value:.1e}" for name, value in results["agreement"].items())
    crossover = {}
    for order in args.orders:
        for steps in args.steps:
            faster = [t for t in args.tasks
                      if results["timing"][f"{order}/K={steps}/T={t}"]["grouped conv"]["ratio"]["median"] < 1.0]
            crossover[f"{order}/K={steps}"] = min(faster) if faster else None
    results["crossover"] = crossover
    text += "\n\nSmallest meta-batch at which the grouped convolution beats the task loop: " + ", ".join(
        f"{k}: {v if v is not None else 'none measured'}" for k, v in crossover.items())
    _common.report(args, "conv_tasks", f"Conv-4 across tasks ({args.ways}-way {args.shots}-shot, {args.queries} "
                   f"queries per class, {args.filters} filters, {args.size}x{args.size}, float32)", info, results, text)
    return results


if __name__ == "__main__":
    main()
