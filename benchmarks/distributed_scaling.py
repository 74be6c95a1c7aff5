"""Meta-steps per second with 1 and 2 processes (gloo, CPU) and communication per meta-step.

Each process runs one torch thread; the global meta-batch is fixed, so two
processes each adapt half of the tasks. Communication per meta-step is the
gradient all-reduce payload (every meta-parameter once, plus one scalar for the
loss), counted by DistributedContext.

    python benchmarks/distributed_scaling.py [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from diffopt import distributed
from diffopt.algorithms import MAML
from diffopt.recipes import SinusoidSource, sinusoid_mlp
from diffopt.training import Trainer


def trainer(iterations: int, meta_batch: int, inner_steps: int, context=None) -> Trainer:
    torch.manual_seed(0)
    learner = MAML(sinusoid_mlp(), F.mse_loss, inner_lr=0.01, inner_steps=inner_steps, vectorize=True)
    source = SinusoidSource(meta_batch=meta_batch, shots=10, test_tasks=10)
    return Trainer(learner, source, torch.optim.Adam(learner.parameters(), lr=1e-3), iterations=iterations,
                   progress=False, log_every=iterations, distributed=context)


def _worker(rank: int, world: int, port: int, iterations: int, meta_batch: int, inner_steps: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    context = distributed.initialize("gloo", timeout=120, rank=rank, world_size=world) if world > 1 else None
    run = trainer(iterations, meta_batch, inner_steps, context)
    run.evaluate = lambda: {}  # time the meta-steps only
    started = time.perf_counter()
    run.fit()
    seconds = time.perf_counter() - started
    if rank == 0:
        sent = context.bytes_communicated / iterations if context else 0
        Path(out).write_text(json.dumps({"seconds": seconds, "bytes_per_step": sent}))
    if context:
        distributed.shutdown()


def measure(world: int, iterations: int, meta_batch: int, inner_steps: int, folder: Path) -> dict:
    out = folder / f"w{world}.json"
    mp.start_processes(_worker, args=(world, distributed.free_port(), iterations, meta_batch, inner_steps, str(out)),
                       nprocs=world, start_method="spawn")
    result = json.loads(out.read_text())
    return {"processes": world, "steps_per_second": iterations / result["seconds"],
            "bytes_per_step": result["bytes_per_step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--meta-batch", type=int, default=50)
    parser.add_argument("--inner-steps", type=int, default=5)
    args = parser.parse_args()
    iterations = 30 if args.quick else 200
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"diffopt-scaling-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [measure(w, iterations, args.meta_batch, args.inner_steps, folder) for w in (1, 2)]
    base = rows[0]["steps_per_second"]
    parameters = sum(p.numel() for p in sinusoid_mlp().parameters())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"sinusoid MAML, meta-batch {args.meta_batch}, {args.inner_steps} inner steps, second order, "
          f"{parameters} meta-parameters, {iterations} meta-steps\n")
    print("| processes | meta-steps/s | speed-up | all-reduce bytes / meta-step |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['processes']} | {row['steps_per_second']:.1f} | {row['steps_per_second'] / base:.2f}x | "
              f"{row['bytes_per_step']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
