"""Cost of one meta-training iteration of MAML's sinusoid protocol: the library's loop against a hand-written one.

The 70,000-iteration reproduction (``benchmarks/reproduce_sinusoid.py maml``) is this
iteration 70,000 times. Both sides below run MAML's protocol (1-40-40-1 ReLU MLP, meta-batch
25, 10 support + 10 query points, one inner SGD step with α = 0.01, second order, Adam 1e-3):

``diffopt Trainer``  ``Trainer(MAML(...), SinusoidSource(...), outer_adam(...))``, exactly as the
                     reproduction runs it (task sampling, the meta-step, the outer step, the
                     divergence checks and the running log), in chunks of ``--chunk`` iterations.
``hand-written``     a batched implementation written for this one model: the tasks drawn with
                     ``torch.rand``, the MLP on task-batched weights with ``baddbmm``, one
                     ``autograd.grad(create_graph=True)``, the query loss, ``backward()`` and
                     ``torch.optim.Adam(fused=True)``; no checks.

The two alternate chunk by chunk (``--rounds`` rounds); reported: median ms per iteration,
the median of the per-round ratios, and each side's projected time for 70,000 iterations.

    python benchmarks/maml_iteration.py [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common  # noqa: E402

from diffopt.algorithms import MAML  # noqa: E402
from diffopt.recipes import SinusoidSource, sinusoid_mlp  # noqa: E402
from diffopt.training import Trainer, outer_adam  # noqa: E402

ITERATIONS = 70_000


def library(seed: int) -> Callable[[int], None]:
    """``chunk -> None``: ``chunk`` more iterations of the reproduction's Trainer."""
    torch.manual_seed(seed)
    learner = MAML(sinusoid_mlp(), F.mse_loss, inner_lr=0.01, inner_steps=1)
    source = SinusoidSource(meta_batch=25, shots=10, test_tasks=1, test_shots=5, test_query=100)
    state = {"done": 0}
    optimizer = outer_adam(learner.parameters(), lr=1e-3)

    def run(chunk: int) -> None:
        state["done"] += chunk
        trainer = Trainer(learner, source, optimizer, iterations=state["done"], seed=seed, progress=False,
                          log_every=1000, eval_steps=(0,))
        trainer.iteration = state["done"] - chunk
        trainer.evaluate = lambda: {}  # the final evaluation is not part of an iteration
        trainer.fit()

    return run


def hand_written(seed: int) -> Callable[[int], None]:
    torch.manual_seed(seed)
    model = sinusoid_mlp()
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    weights = [p for m in linears for p in (m.weight, m.bias)]
    optimizer = torch.optim.Adam(weights, lr=1e-3, fused=True)
    generator = torch.Generator().manual_seed(seed)

    def forward(ws: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(0, len(ws), 2):
            h = torch.baddbmm(ws[i + 1].unsqueeze(1), h, ws[i].transpose(1, 2))
            if i + 2 < len(ws):
                h = torch.relu(h)
        return h

    def run(chunk: int) -> None:
        for _ in range(chunk):
            amplitude = torch.rand(25, 1, 1, generator=generator) * 4.9 + 0.1
            phase = torch.rand(25, 1, 1, generator=generator) * math.pi
            x = torch.rand(25, 20, 1, generator=generator) * 10 - 5
            y = amplitude * torch.sin(x - phase)
            ws = [w.unsqueeze(0).expand(25, *w.shape) for w in weights]
            inner = ((forward(ws, x[:, :10]) - y[:, :10]) ** 2).mean(dim=(1, 2)).sum()
            grads = torch.autograd.grad(inner, ws, create_graph=True)
            ws = [w - 0.01 * g for w, g in zip(ws, grads)]
            optimizer.zero_grad()
            loss = ((forward(ws, x[:, 10:]) - y[:, 10:]) ** 2).mean()
            loss.backward()
            optimizer.step()

    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_arguments(parser)
    parser.add_argument("--chunk", type=int, default=500, help="iterations per timed chunk")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    if args.quick:
        args.chunk, args.rounds = min(args.chunk, 200), min(args.rounds, 4)
    _common.set_threads(args.threads)
    info = _common.machine_info()
    runs = {"diffopt Trainer": library(args.seed), "hand-written": hand_written(args.seed)}
    for run in runs.values():
        run(20)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            started = time.perf_counter()
            runs[name](args.chunk)
            samples[name].append((time.perf_counter() - started) / args.chunk)
    info["load_average_end"] = _common.load_average()
    base = samples["hand-written"]
    results = {}
    rows = []
    for name, values in samples.items():
        ratio = statistics.median(a / b for a, b in zip(values, base))
        ms = statistics.median(values) * 1e3
        results[name] = {"ms_per_iteration": ms, "ratio": ratio, "projected_70k_s": ms * ITERATIONS / 1e3,
                         "samples_ms": [v * 1e3 for v in values]}
        rows.append([name, f"{ms:.2f}", f"{ratio:.2f}x", f"{ms * ITERATIONS / 1e3:.0f} s"])
    text = _common.markdown_table(["implementation", "ms / iteration", "ratio to hand-written",
                                   "projected 70,000 iterations"], rows)
    _common.report(args, "maml_iteration",
                   f"MAML sinusoid meta-training iteration ({args.rounds} rounds of {args.chunk} iterations)", info,
                   results, text)
    return results


if __name__ == "__main__":
    main()
