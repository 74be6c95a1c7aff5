"""Diagnostics during meta-training: :class:`DiagnosticsCallback` for :class:`~diffopt.training.Trainer`.

::

    from diffopt.diagnostics import DiagnosticsCallback
    diag = DiagnosticsCallback(source, every=500, which=["kl", "prequential", "fisher"], sigma=0.5)
    Trainer(learner, source, optimizer, iterations=5000, log_every=500, callbacks=[diag]).fit()
    diag.plot("diagnostics.png")        # each scalar over meta-training (needs matplotlib)

Every ``every`` meta-iterations the callback runs :func:`diagnose` on a fixed
set of tasks (drawn once, from the source's held-out test tasks) and returns
scalar summaries — ``"diagnostics/<name>"`` (the mean over tasks) and
``"diagnostics/<name>/ci95"`` (``[lo, hi]``, or None) — which the trainer writes
into its JSON-lines metrics. It changes nothing training depends on: the
learner's weights, buffers, training flags and gradients, and the global RNG
stream are as they were (diagnostics sample with their own generator and run
under :func:`~diffopt.diagnostics._functional.evaluation`), so a run with the
callback ends with bit-identical weights to one without (on CPU).

The trainer writes a metrics line whenever a callback returns entries, and each
line restarts the running meta-loss average: choose ``every`` as a multiple of
the trainer's ``log_every`` for metrics identical to a run without the callback
apart from the added keys.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import Tensor

from .learner import diagnose, draw_tasks
from .report import DIAGNOSTICS, Report, plot_history

__all__ = ["DiagnosticsCallback"]

DEFAULT_WHICH = ("kl", "entropy", "fisher", "weight_information", "prequential")


class DiagnosticsCallback:
    """``f(trainer, iteration) -> dict | None`` logging diagnostics every ``every`` meta-iterations.

    Args:
        tasks_or_source: a batch of tasks ``(support_x, support_y, query_x, query_y)``
            (leading task dimension), a list of per-task tuples, or a task source
            (its first ``tasks`` test tasks).
        every: run every n meta-iterations (n ≥ 1).
        which: diagnostics (names of :data:`~diffopt.diagnostics.DIAGNOSTICS`);
            default kl, entropy, fisher, weight_information, prequential.
        tasks: how many tasks to use (default all given, or 25 from a source).
        sigma: the regression noise scale (required for real-valued targets).
        layers: also log ``"diagnostics/<name>/by_layer"`` (per-tensor values, e.g. Fisher).
        keep_reports: keep every :class:`Report` in ``self.history`` as
            ``(iteration, report)`` for plots (:meth:`plot`).
        prefix: the metrics key prefix.
        **options: passed to :func:`diagnose` (``steps``, ``orderings``, ``fisher_kind``, ``seed`` ...).
    """

    def __init__(self, tasks_or_source: Any, every: int = 100, which: Optional[Sequence[str]] = None, *,
                 tasks: Optional[int] = None, sigma: Optional[float] = None,
                 layers: bool = False, keep_reports: bool = True, prefix: str = "diagnostics",
                 **options: Any) -> None:
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = int(every)
        self.which = list(which) if which is not None else list(DEFAULT_WHICH)
        unknown = [w for w in self.which if w not in DIAGNOSTICS]
        if unknown:
            raise ValueError(f"unknown diagnostics {unknown}; choose among {DIAGNOSTICS}")
        self.task_list = draw_tasks(tasks_or_source, tasks)
        if not self.task_list:
            raise ValueError("DiagnosticsCallback: no tasks")
        self.sigma, self.layers = sigma, layers
        self.keep_reports, self.prefix, self.options = keep_reports, prefix, dict(options)
        self.history: List[Tuple[int, Report]] = []
        self._warned = False

    def run(self, learner: Any) -> Report:
        """The diagnostics of ``learner`` on the callback's tasks now."""
        return diagnose(learner, self.task_list, which=self.which, sigma=self.sigma, **self.options)

    def summary(self, report: Report) -> Dict[str, Any]:
        """Scalar summaries of a report as metrics entries."""
        out: Dict[str, Any] = {}
        for key, d in report.items():
            if isinstance(d.value, Tensor) and d.value.numel() != 1:
                continue  # matrices (cosine matrix) stay in the report
            name = f"{self.prefix}/{key}"
            out[name] = float(d.value)
            out[f"{name}/ci95"] = None if d.ci95 is None else [float(d.ci95[0]), float(d.ci95[1])]
            if self.layers and d.by_layer:
                out[f"{name}/by_layer"] = {k: float(v) for k, v in d.by_layer.items()}
        return out

    def __call__(self, trainer: Any, iteration: int) -> Optional[Dict[str, Any]]:
        if not getattr(trainer, "is_main", True):
            return None  # rank 0 alone logs metrics
        if not self._warned and self.every % max(int(getattr(trainer, "log_every", 1)), 1) != 0:
            self._warned = True
            warnings.warn(f"DiagnosticsCallback(every={self.every}) is not a multiple of the trainer's "
                          f"log_every={trainer.log_every}: every diagnostics record adds a metrics line and restarts "
                          "the running meta-loss average", stacklevel=2)
        if iteration % self.every != 0:
            return None
        return self.summary(self.record(trainer.learner, iteration))

    def record(self, learner: Any, iteration: int) -> Report:
        """Run now and keep the report in ``history`` as ``(iteration, report)`` (e.g. iteration 0 before
        ``fit()``, which calls back only after each meta-iteration)."""
        report = self.run(learner)
        if self.keep_reports:
            self.history.append((iteration, report))
        return report

    def plot(self, path: str, keys: Optional[Sequence[str]] = None) -> str:
        """Each scalar diagnostic over meta-training, mean ± 95% CI (needs matplotlib)."""
        if not self.history:
            raise ValueError("no diagnostics recorded yet")
        return plot_history([r for _, r in self.history], path, keys=keys, x=[i for i, _ in self.history])
