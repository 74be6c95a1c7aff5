"""The ``diffopt demo`` experiment: meta-train MAML on sinusoid regression and compare it with pretraining.

MAML's protocol (Finn et al., 2017): 1-40-40-1 ReLU network, K = 10 support
points, one inner SGD step with α = 0.01, meta-batch 25, Adam 1e-3. The demo
runs a shortened schedule (``--iterations``, default 10,000 instead of
70,000), then evaluates on 600 held-out tasks with 5 support points: query MSE
after 0, 1, 5 and 10 steps of SGD(α), with 95% confidence intervals, for MAML
and for a network pretrained on all tasks at once (the paper's baseline).

:func:`run` returns the results; :mod:`diffopt.cli.demo` prints them.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..algorithms import MAML
from ..diagnostics import headline
from ..recipes import SinusoidSource, sinusoid_mlp
from .trainer import Trainer, evaluate, iteration_generator, outer_adam

EVAL_STEPS = (0, 1, 5, 10)
PROTOCOL = "MAML protocol: 1 inner step, alpha 0.01, meta-batch 25, K = 10; paper: 70,000 iterations"
PAPER = "MAML 0.67 / 0.38 / 0.35 after 1 / 5 / 10 steps; pretrained 2.41 / 2.23 / 2.19"  # 70,000 iterations


@dataclasses.dataclass
class DemoResult:
    """What :func:`run` measured: query MSE summaries per method (``{"MAML": {"0": {"mean", "ci95"}, ...},
    "pretrained": ...}``), the diagnostics' headline table of what adaptation did (50 test tasks,
    Gaussian likelihood with σ = 0.5), the plot written (None when none was asked for or matplotlib
    is missing), the two learners and the task source, and times."""

    results: dict[str, dict[str, Any]]
    headline: str
    plot: str | None
    learner: MAML
    baseline: MAML
    source: SinusoidSource
    maml_seconds: float
    seconds: float


def pretrain(iterations: int, source: SinusoidSource, seed: int) -> torch.nn.Module:
    """The baseline: one network regressed on the points of all tasks (no adaptation in training)."""
    torch.manual_seed(seed + 1)
    model = sinusoid_mlp()
    optimizer = outer_adam(model.parameters(), lr=1e-3)
    for i in range(iterations):
        sx, sy, qx, qy = source.train_batch(iteration_generator(seed + 1, i))
        optimizer.zero_grad()
        F.mse_loss(model(torch.cat([sx, qx], 1)), torch.cat([sy, qy], 1)).backward()
        optimizer.step()
    return model


def run(iterations: int = 10000, seed: int = 0, plot: str | None = "diffopt-demo.png",
        progress: bool = True) -> DemoResult:
    """Meta-train MAML (``iterations`` meta-iterations, one torch thread), pretrain the baseline for as
    many iterations, evaluate both on 600 held-out tasks with 5 support points, diagnose what
    adaptation did and save a plot of adapted fits to ``plot`` (None: no plot)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(iterations, seed, plot, progress)
    finally:
        torch.set_num_threads(threads)


def _run(iterations: int, seed: int, plot: str | None, progress: bool) -> DemoResult:
    started = time.perf_counter()
    source = SinusoidSource(meta_batch=25, shots=10, test_tasks=600, test_shots=5, test_query=100)
    torch.manual_seed(seed)
    learner = MAML(sinusoid_mlp(), F.mse_loss, inner_lr=0.01, inner_steps=1)
    trainer = Trainer(learner, source, outer_adam(learner.parameters(), lr=1e-3), iterations=iterations,
                      seed=seed, progress=progress, log_every=max(iterations // 10, 1))
    trainer.fit()
    maml_seconds = time.perf_counter() - started
    baseline = MAML(pretrain(iterations, source, seed), F.mse_loss, inner_lr=0.01, inner_steps=1)
    results = {
        "MAML": trainer.history[-1]["eval"]["loss"],
        "pretrained": evaluate(baseline, source.test_batches(), EVAL_STEPS)["loss"],
    }
    summary = headline(learner, source, sigma=0.5, max_tasks=50)
    saved = save_plot(learner, baseline, source, plot) if plot else None
    return DemoResult(results, summary, saved, learner, baseline, source, maml_seconds,
                      time.perf_counter() - started)


def save_plot(learner: MAML, baseline: MAML, source: SinusoidSource, path: str) -> str | None:
    """Adapted fits on three test tasks; returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    batch = source.sampler.test_set(3, 5, 0)
    grid_x, grid_y = batch.grid(200)
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for t, axis in enumerate(axes):
        sx, sy = batch.support_x[t:t + 1], batch.support_y[t:t + 1]
        axis.plot(grid_x[t].squeeze(-1), grid_y[t].squeeze(-1), "k-", label="true")
        axis.plot(sx[0].squeeze(-1), sy[0].squeeze(-1), "k^", label="support")
        for model, name, style in ((learner, "MAML", "-"), (baseline, "pretrained", "--")):
            for steps, colour in ((1, "tab:blue"), (10, "tab:red")):
                prediction = model.predict(sx, sy, grid_x[t:t + 1], steps=steps)[0].squeeze(-1)
                axis.plot(grid_x[t].squeeze(-1), prediction, style, color=colour, label=f"{name}, {steps} step(s)")
        axis.set_title(f"task {t}")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
