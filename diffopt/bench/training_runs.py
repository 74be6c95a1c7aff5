"""Meta-test loss or accuracy after a fixed budget of meta-training time and of meta-iterations,
every mode and baseline trained in interleaved rounds from the same weights on the same batches."""
from __future__ import annotations

import copy
import gc
import math
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..tasks import mean_ci95
from ..training import evaluate, iteration_generator
from .baselines import BASELINE_BUILDERS, Batch
from .implementations import _error, make_learner
from .measuring import discrepancy, fixed_batch
from .problems import Problem
from .settings import MODES, Settings


class _OneAdaptation:
    """``evaluate_steps`` for :func:`diffopt.training.evaluate` that adapts once and reads the
    per-task loss and accuracy from the same predictions (the learner's own adapts twice for
    classification: once for the loss, once for the accuracy); it keeps the per-task values for
    paired comparisons between runs."""

    def __init__(self, learner: Any) -> None:
        self.learner = learner
        self.values: dict[str, list[Tensor]] = {}

    def evaluate_steps(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, steps: Sequence[int]) -> dict[str, Tensor]:
        loop = self.learner.loop
        rows: dict[str, list[Tensor]] = {}
        for k in steps:
            adapted = loop.adapt_without_graph(sx, sy, k)
            with torch.no_grad():
                for name, value in self.learner.query_metrics(loop.predict(adapted, qx), qy).items():
                    rows.setdefault(name, []).append(value)  # (the learner's loss_fn; accuracy for labels)
        result = {name: torch.stack(values) for name, values in rows.items()}
        for name, value in result.items():
            self.values.setdefault(name, []).append(value[-1].double())
        return result


def _evaluate(learner: Any, problem: Problem, steps: int, per_task: bool = False) -> Any:
    """Mean and 95% CI (``diffopt.training.evaluate``) of the meta-test loss (and accuracy) after
    ``steps`` test-time steps; with ``per_task`` also the per-task values."""
    evaluator = _OneAdaptation(learner)
    summary = evaluate(evaluator, problem.source.test_batches(), (steps,))
    metrics = {name: values[str(steps)] for name, values in summary.items()}
    if per_task:
        return metrics, {name: torch.cat(values) for name, values in evaluator.values.items()}
    return metrics


class _TrainingRun:
    """One meta-training run (a mode, or a baseline loop) advanced one meta-iteration at a time."""

    def __init__(self, problem: Problem, steps: int, name: str, settings: Settings,
                 snapshot_times: Sequence[float]) -> None:
        self.problem, self.steps, self.name, self.settings = problem, steps, name, settings
        mode = name if name in MODES else "second_order"
        self.learner = make_learner(problem, problem.make_model(), steps, mode, settings)
        self.optimizer = torch.optim.Adam(self.learner.parameters(), lr=problem.outer_lr)
        if name in MODES:
            learner = self.learner

            def meta_step(batch: Batch) -> Tensor:
                loss = learner.meta_loss(*batch)
                loss.backward()
                return loss.detach()

            self.meta_step = meta_step
        else:
            self.meta_step = BASELINE_BUILDERS[name](self.learner.model, problem.loss_fn, problem.inner_lr, steps,
                                                     False)
        self.budget_iterations = settings.iteration_budget(problem.spec["kind"])
        self.cap = (max(snapshot_times) if snapshot_times else 0.0) * settings.train_cap_factor
        self.pending = sorted(snapshot_times)
        self.snapshots: list[dict[str, Any]] = []
        self.clock, self.i = 0.0, 0
        self.failure: str | None = None
        self.losses: list[float] = []
        self.done = False

    def advance(self) -> None:
        """One meta-iteration on the clock (data sampling and snapshots off it)."""
        batch = self.problem.source.train_batch(iteration_generator(self.settings.seed, self.i))
        started = time.perf_counter()
        try:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.meta_step(batch)
            self.optimizer.step()
        except Exception as error:  # noqa: BLE001 - a diverging or failing mode is a result too
            self.failure, self.done = _error(error), True
            return
        self.clock += time.perf_counter() - started
        self.i += 1
        value = float(loss)
        self.losses.append(value)
        if not math.isfinite(value):
            self.failure, self.done = f"meta-loss {value} at iteration {self.i}", True
            return
        if self.i == self.budget_iterations:
            self._snapshot({"kind": "iterations"})
        while self.pending and self.clock >= self.pending[0]:
            self._snapshot({"kind": "time", "budget": self.pending.pop(0)})
        if not self.pending and (self.i >= self.budget_iterations or self.clock >= self.cap):
            self.done = True

    def _snapshot(self, point: dict[str, Any]) -> None:
        point.update(iteration=self.i, seconds=self.clock, state=copy.deepcopy(self.learner.state_dict()))
        self.snapshots.append(point)

    def result(self) -> dict[str, Any]:
        """Evaluate the snapshots (off the clock)."""
        i, settings = self.i, self.settings
        result: dict[str, Any] = {"iterations": i, "seconds": self.clock,
                                  "seconds_per_iteration": self.clock / i if i else None,
                                  "final_train_loss": self.losses[-1] if self.losses else None, "points": []}
        if self.failure:
            result["failure"] = self.failure
        elif i < self.budget_iterations:
            result["iteration_budget_missed"] = (
                f"{i} of {self.budget_iterations} iterations in {self.clock:.1f} s (cap {self.cap:.1f} s = "
                f"{settings.train_cap_factor:g} × the time budget)")
        for snap in self.snapshots:
            self.learner.load_state_dict(snap["state"])
            metrics, per_task = _evaluate(self.learner, self.problem, self.steps, per_task=True)
            point = {k: v for k, v in snap.items() if k != "state"}
            point["metrics"], point["_per_task"] = metrics, per_task
            result["points"].append(point)
        result["at_time_budget"] = next((p for p in reversed(result["points"]) if p["kind"] == "time"), None)
        result["at_iteration_budget"] = next((p for p in result["points"] if p["kind"] == "iterations"), None)
        return result


def train_interleaved(problem: Problem, steps: int, names: Sequence[str], settings: Settings,
                      snapshot_times: Sequence[float], bar: Any = None) -> dict[str, dict[str, Any]]:
    """Meta-train every run in ``names`` from the same initial weights on the same meta-batches,
    advancing them in rounds of one meta-iteration each, in a freshly shuffled order per round, so
    that the load of a shared machine hits every run's clock alike (as the timing rounds do).

    Each run stops once its clock has passed the time budget and it has done the iteration budget
    (or its clock reached ``train_cap_factor`` × the time budget). Snapshots taken when the clock
    passes each of ``snapshot_times`` and at the iteration budget are evaluated afterwards.
    """
    runs = {name: _TrainingRun(problem, steps, name, settings, snapshot_times) for name in names}
    order = random.Random(settings.seed)
    gc.collect()
    gc.freeze()
    try:
        while not all(run.done for run in runs.values()):
            active = [run for run in runs.values() if not run.done]
            order.shuffle(active)
            for run in active:
                run.advance()
    finally:
        gc.unfreeze()
    out: dict[str, dict[str, Any]] = {}
    for name, run in runs.items():
        if bar is not None:
            bar.update(0, postfix=f"{problem.name} K={steps} evaluating {name}")
        out[name] = run.result()
        if name == "second_order" and out[name]["at_time_budget"] is not None:
            run.learner.load_state_dict(run.snapshots[_last_time_index(run.snapshots)]["state"])
            out[name]["_trained_model"] = run.learner.model
        if bar is not None:
            bar.update(1, postfix=f"{problem.name} K={steps} evaluated {name}")
    _paired_differences(out, problem.metric)
    for result in out.values():
        for point in result["points"]:
            point.pop("_per_task", None)
    return out


def _last_time_index(snapshots: Sequence[Mapping[str, Any]]) -> int:
    return max(j for j, snap in enumerate(snapshots) if snap["kind"] == "time")


def _paired_differences(runs: Mapping[str, dict[str, Any]], metric: str) -> None:
    """Each run's metric minus second order's on the same test tasks (mean, 95% CI of the per-task
    differences) at the time budget and at the iteration budget: whether a mode matches second order."""
    reference = runs.get("second_order")
    if reference is None:
        return
    for name, result in runs.items():
        for key in ("at_time_budget", "at_iteration_budget"):
            mine, theirs = result.get(key), reference.get(key)
            if not mine or not theirs or name == "second_order":
                continue
            a, b = mine["_per_task"].get(metric), theirs["_per_task"].get(metric)
            if a is None or b is None or a.shape != b.shape:
                continue
            mean, half = mean_ci95(a - b)
            result.setdefault("vs_second_order", {})[key] = {"mean": mean, "ci95": half,
                                                            "matches": abs(mean) <= half}


def initial_metrics(problem: Problem, steps: int, settings: Settings) -> dict[str, Any]:
    learner = make_learner(problem, problem.make_model(), steps, "second_order", settings)
    return _evaluate(learner, problem, steps)


def accuracy(problem: Problem, settings: Settings, bar: Any = None) -> dict[str, Any]:
    kind = problem.spec["kind"]
    budget = settings.time_budget(kind)
    count = settings.snapshot_count(kind)
    times = [budget * (j + 1) / count for j in range(count)]
    out: dict[str, Any] = {}
    for steps in settings.train_steps_for(kind):
        block: dict[str, Any] = {"time_budget_s": budget, "iteration_budget": settings.iteration_budget(kind),
                                 "initial": initial_metrics(problem, steps, settings), "runs": {}}
        if bar is not None:
            bar.update(1, postfix=f"{problem.name} K={steps} initial evaluation")
        names = list(settings.modes) + [b for b in settings.accuracy_baselines]
        if bar is not None:
            bar.update(0, postfix=f"{problem.name} K={steps} training {len(names)} runs, interleaved")
        block["runs"] = train_interleaved(problem, steps, names, settings, times, bar)
        trained = block["runs"].get("second_order", {}).pop("_trained_model", None)
        if trained is not None and settings.discrepancy:
            try:
                block["discrepancy_after_second_order_training"] = discrepancy(
                    problem, trained, steps, fixed_batch(problem, settings.seed), settings.discrepancy_tasks)
            except Exception as error:  # noqa: BLE001
                block["discrepancy_after_second_order_training"] = {"error": _error(error)}
        out[str(steps)] = block
    return out
