"""Dispatched ATen operations and median time per sinusoid meta-step of ``InnerLoop`` (issue 13).

A deterministic companion of ``engine_sinusoid.py``: the number of ATen operations one
meta-step dispatches (forward, inner steps and backward) does not depend on the load of the
machine, so comparing it between two commits shows whether a change added tensor work to the
engine; the median wall time beside it shows the Python overhead, to be read as a ratio between
commits run interleaved on the same machine (the restructuring of issue 13 was checked this way).

Problem: MLP 1-40-40-1, meta-batch 25, 10 support + 10 query points, inner SGD lr 0.01,
vectorised, float32, one thread.

    python benchmarks/engine_dispatch.py [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffopt.optim import SGD  # noqa: E402
from diffopt.unroll import InnerLoop  # noqa: E402

CASES = (("second_order", 1), ("second_order", 5), ("first_order", 1), ("first_order", 5))


class CountOps(TorchDispatchMode):
    """Counts every ATen operation dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def meta_step(mode: str, steps: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.01), F.mse_loss, steps=steps, mode=mode, vectorize=True)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(25, 10, 1, generator=g) for _ in range(4)]
    return lambda: loop.meta_loss(*data).backward()


def measure(mode: str, steps: int, repeats: int) -> dict[str, Any]:
    step = meta_step(mode, steps)
    step()  # warm-up
    with CountOps() as counter:
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"mode": mode, "steps": steps, "aten_ops": counter.count, "median_ms": 1e3 * statistics.median(times)}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 timed repeats instead of 60")
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(mode, steps, 5 if args.quick else 60) for mode, steps in CASES]
    print("| mode | K | ATen ops per meta-step | median ms |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['steps']} | {row['aten_ops']} | {row['median_ms']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
