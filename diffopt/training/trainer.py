"""Meta-training: the loop, evaluation with confidence intervals, atomic checkpoints
and exact resume, JSON-lines metrics.

Exact resume: the meta-batch of iteration ``i`` is drawn from a generator
seeded by ``(seed, i)``, and a checkpoint holds the learner, the outer
optimizer, the global RNG state (for dropout) and the iteration. Resuming from
the checkpoint of iteration ``i`` therefore reproduces the uninterrupted run
bit for bit on CPU. Checkpoints are written to a temporary file in the same
folder and moved into place with ``os.replace`` (atomic on POSIX), and loaded
with ``torch.load(weights_only=True)``: no pickled code ever runs.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from .._io import atomic_save, check_writable, describe_os_error, non_finite_tensors, safe_load
from .._progress import Progress
from ..algorithms import MetaLearner
from ..tasks import mean_ci95
from ..errors import CheckpointError, NonFiniteError
from ..optim._gradients import all_finite

CHECKPOINT_FORMAT = "diffopt-checkpoint"
CHECKPOINT_VERSION = 1
Batch = tuple[Tensor, Tensor, Tensor, Tensor]


class TaskSource(Protocol):
    """Where meta-batches come from."""

    def train_batch(self, generator: torch.Generator) -> Batch: ...

    def test_batches(self) -> Iterable[Batch]: ...

    def config(self) -> dict[str, Any]: ...


def iteration_generator(seed: int, iteration: int, generator: torch.Generator | None = None) -> torch.Generator:
    """The generator of iteration ``iteration``: independent of any other iteration. ``generator``:
    a CPU generator to reseed and return instead of making a new one (the same stream, cheaper)."""
    return (generator or torch.Generator()).manual_seed((seed * 1_000_003 + iteration) % (2**63 - 1))


def outer_adam(parameters: Any, lr: float) -> torch.optim.Adam:
    """``torch.optim.Adam(parameters, lr)`` for an outer loop, with torch's fused kernel where it
    runs (floating-point parameters on CPU or CUDA): the same update rule, one kernel per tensor
    instead of torch's default per-tensor Python loop on CPU (measured 3x faster per step on the
    sinusoid MLP; ``benchmarks/RESULTS.md``)."""
    params = list(parameters)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = bool(tensors) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically: a temporary file in the same folder, fsync, ``os.replace``."""
    atomic_save(path, payload)


def load_checkpoint(path: str | os.PathLike[str], config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint safely and check that it belongs to ``config``.

    Every problem is a :class:`CheckpointError` with one line: a missing file is
    ``FileNotFoundError``; a folder, an empty, truncated or corrupt file, a file that
    is not a diffopt checkpoint, one that contains code (refused unread), one of
    another version, one with a negative or non-integer iteration, one whose
    weights hold NaN or infinity, and one from another configuration are refused.
    """
    payload = safe_load(path, "diffopt checkpoint", CheckpointError)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a diffopt checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {payload.get('version')}, this diffopt reads version {CHECKPOINT_VERSION}"
        )
    iteration = payload.get("iteration")
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise CheckpointError(f"{path} is corrupt: its iteration is {iteration!r}, not an integer >= 0")
    if not isinstance(payload.get("config", {}), dict):
        raise CheckpointError(f"{path} is corrupt: its configuration is not a dictionary")
    bad = non_finite_tensors({k: v for k, v in payload.items() if k != "rng"})
    if bad:
        raise CheckpointError(
            f"{path} holds non-finite values (NaN or infinity) in {', '.join(bad[:5])}"
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            + "; it was saved after training diverged: resume from an earlier checkpoint or start a new run"
        )
    if config is not None:
        mismatch = config_differences(payload.get("config", {}), config)
        if mismatch:
            raise CheckpointError(
                f"{path} was written by another configuration: " + "; ".join(mismatch)
                + ". Resume with the same settings or start a new run."
            )
    return payload


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two nested configurations."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if key not in saved:
            out.append(f"{name} is new (= {current[key]!r})")
        elif key not in current:
            out.append(f"{name} is missing (checkpoint has {saved[key]!r})")
        elif isinstance(saved[key], dict) and isinstance(current[key], dict):
            out.extend(config_differences(saved[key], current[key], name + "."))
        elif _normal(saved[key]) != _normal(current[key]):
            out.append(f"{name} differs (checkpoint {saved[key]!r}, now {current[key]!r})")
    return out


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def optimizer_settings(optimizer: Any) -> list[dict[str, Any]]:
    """Every parameter group's hyperparameters (a tensor as its shape and sum), for the ranks of a
    distributed run to compare: a rank with another learning rate would silently mix its gradients
    into the average."""
    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return [list(value.shape), float(value.detach().double().sum())]
        if isinstance(value, (list, tuple)):
            return [describe(v) for v in value]
        return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)
    return [{k: describe(v) for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


#: param-group entries that choose an implementation, not the maths, and may differ between runs
#: (another device, another torch); load_state_dict restores them too
IMPLEMENTATION_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})


def optimizer_settings_differences(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> list[str]:
    """``param_groups[i].name: checkpoint X, now Y`` for each hyperparameter that differs between two
    :func:`optimizer_settings` (implementation flags such as ``foreach`` left out)."""
    if len(saved) != len(current):
        return [f"parameter groups: checkpoint {len(saved)}, now {len(current)}"]
    out = []
    for i, (old, new) in enumerate(zip(saved, current)):
        for key in sorted((set(old) | set(new)) - IMPLEMENTATION_FLAGS):
            before, after = old.get(key, "(unset)"), new.get(key, "(unset)")
            if _normal(before) != _normal(after):
                out.append(f"param_groups[{i}].{key}: checkpoint {before!r}, now {after!r}")
    return out


class Trainer:
    """The meta-training loop.

    Args:
        learner: a :class:`~diffopt.algorithms.MetaLearner`.
        tasks: a :class:`TaskSource`.
        optimizer: the outer optimizer over ``learner.parameters()``.
        iterations: total meta-iterations.
        seed: seeds the per-iteration task generators (and the global RNG at the start).
        eval_every: evaluate on ``tasks.test_batches()`` every n iterations (0: only at the end).
        eval_steps: test-time inner steps for gradient-based learners.
        checkpoint: path of the checkpoint, written every ``checkpoint_every`` iterations and at the end.
        resume: continue from ``checkpoint`` if it exists (same configuration and the same outer-optimizer
            hyperparameters as built; a difference is refused, naming it: see :meth:`restore`).
        metrics: path of a JSON-lines metrics file.
        callbacks: ``f(trainer, iteration) -> dict | None``, run after every iteration;
            returned entries go into the metrics stream.
        progress: show a progress bar.
        before_step: ``f(learner, iteration)`` before each step (for example MAML++'s epoch).
        distributed: a :class:`~diffopt.distributed.DistributedContext`: shard each meta-batch over
            the ranks and all-reduce the meta-gradients; rank 0 alone writes checkpoints and metrics.
    """

    def __init__(
        self,
        learner: MetaLearner,
        tasks: TaskSource,
        optimizer: torch.optim.Optimizer,
        *,
        iterations: int,
        seed: int = 0,
        eval_every: int = 0,
        eval_steps: Sequence[int] = (0, 1, 5, 10),
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 1000,
        resume: bool = False,
        metrics: str | os.PathLike[str] | None = None,
        log_every: int = 100,
        callbacks: Sequence[Callable[["Trainer", int], dict[str, Any] | None]] = (),
        progress: bool = True,
        config: dict[str, Any] | None = None,
        before_step: Callable[[MetaLearner, int], None] | None = None,
        distributed: Any = None,
    ) -> None:
        for name, value in (("iterations", iterations), ("log_every", log_every),
                            ("checkpoint_every", checkpoint_every), ("eval_every", eval_every)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        if log_every < 1 or checkpoint_every < 1 or eval_every < 0:
            raise ValueError("log_every and checkpoint_every must be >= 1 and eval_every >= 0")
        eval_steps = tuple(eval_steps)
        if not eval_steps or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0
                                 for k in eval_steps):
            raise ValueError(f"eval_steps must be one or more integers >= 0 (test-time inner steps), got "
                             f"{list(eval_steps)}")
        self.learner, self.tasks, self.optimizer = learner, tasks, optimizer
        self.iterations, self.seed = iterations, seed
        self.eval_every, self.eval_steps = eval_every, tuple(int(k) for k in eval_steps)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.checkpoint_every, self.resume = checkpoint_every, resume
        self.metrics = Path(metrics) if metrics is not None else None
        self.log_every = log_every
        self.callbacks = list(callbacks)
        self.progress = progress
        self.before_step = before_step
        self.distributed = distributed
        self.is_main = distributed is None or distributed.is_main
        self.iteration = 0
        self.seconds = 0.0  # training time before this process (restored on resume)
        self._running: list[float] = []  # meta-losses since the last metrics line
        self.history: list[dict[str, Any]] = []
        self.config = {
            "learner": learner.config(), "tasks": tasks.config(), "seed": seed, "iterations": iterations,
            "optimizer": type(optimizer).__name__, **(config or {}),
        }
        # the outer optimizer's hyperparameters as built, saved with every checkpoint and compared on resume:
        # optimizer.load_state_dict restores the checkpoint's param_groups, so a changed lr would be dropped
        self.optimizer_settings = optimizer_settings(optimizer)

    # -- checkpoints ---------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": self.config,
            "iteration": self.iteration, "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(), "optimizer_settings": self.optimizer_settings,
            "rng": torch.get_rng_state(),
            "running": list(self._running), "seconds": self._elapsed(),
        }

    def _elapsed(self) -> float:
        started = getattr(self, "_started", None)
        return self.seconds + (time.perf_counter() - started if started is not None else 0.0)

    def save(self) -> None:
        """Write the checkpoint (rank 0). A failed write keeps the previous checkpoint and raises
        ``OSError`` with one line naming the path and the reason (for example a full disk)."""
        if self.checkpoint is not None and self.is_main:
            try:
                save_checkpoint(self.checkpoint, self.state())
            except OSError as error:
                raise OSError(error.errno, f"could not write the checkpoint {self.checkpoint} at iteration "
                              f"{self.iteration}: {describe_os_error(error)}; the previous checkpoint is kept"
                              ) from error

    def restore(self, payload: dict[str, Any]) -> None:
        """Load a checkpoint's learner, optimizer, RNG and position; a checkpoint that does not fit
        this learner or optimizer, or was written with other outer-optimizer hyperparameters than this
        optimizer was built with, raises :class:`CheckpointError` and changes nothing.

        To change a hyperparameter mid-run on purpose, build the optimizer as the run began, ``restore``
        (``Trainer(..., resume=False)``, then ``trainer.restore(load_checkpoint(path, trainer.config))``),
        set the new value in ``optimizer.param_groups`` and call ``fit``."""
        where = self.checkpoint or "the checkpoint"
        missing = [k for k in ("learner", "optimizer", "rng", "iteration") if k not in payload]
        if missing:
            raise CheckpointError(f"{where} is not a complete diffopt training checkpoint (it has no "
                                  f"{', '.join(missing)})")
        changed = optimizer_settings_differences(payload.get("optimizer_settings", self.optimizer_settings),
                                                 self.optimizer_settings)  # an older checkpoint has none to compare
        kind, now = payload.get("config", {}).get("optimizer"), self.config.get("optimizer")
        if kind is not None and _normal(kind) != _normal(now):
            raise CheckpointError(f"{where} was written with the outer optimizer {kind!r}, this trainer's is "
                                  f"{now!r}: build that optimizer with the run's settings to resume it, or start "
                                  "a new run")
        if changed:
            raise CheckpointError(
                f"{where} was written by a run whose {type(self.optimizer).__name__} had other settings: "
                + "; ".join(changed) + ". Resuming would silently continue with the checkpoint's values "
                "(optimizer.load_state_dict restores them): build the optimizer with the checkpoint's settings "
                "to continue the run, or start a new run (another checkpoint path, or resume=False) to train "
                "with yours; to change a setting mid-run, restore() first, then set it in optimizer.param_groups")
        learner_before = {k: v.clone() for k, v in self.learner.state_dict().items()}
        optimizer_before = self.optimizer.state_dict()
        try:
            self.learner.load_state_dict(payload["learner"])
            self.optimizer.load_state_dict(payload["optimizer"])
            torch.set_rng_state(payload["rng"])
        except Exception as error:  # noqa: BLE001 - size mismatch, missing keys, wrong groups: one line
            self.learner.load_state_dict(learner_before)
            self.optimizer.load_state_dict(optimizer_before)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{where} does not fit this learner and optimizer ({reason[:300]})") from None
        self.iteration = int(payload["iteration"])
        self._running = [float(v) for v in payload.get("running", [])]
        self.seconds = float(payload.get("seconds", 0.0))

    def _truncate_metrics(self) -> None:
        """Drop metric lines written after the checkpoint (a crash between log and save), and the
        final record of a finished run: ``fit`` writes it again when it ends."""
        if self.metrics is None or not self.metrics.exists() or not self.is_main:
            return
        records = [(line, json.loads(line)) for line in self.metrics.read_text().splitlines() if line.strip()]
        kept = [line for line, record in records
                if record.get("iteration", 0) <= self.iteration and not record.get("final", False)]
        self.metrics.write_text("".join(line + "\n" for line in kept))

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.metrics is not None and self.is_main:
            self.metrics.parent.mkdir(parents=True, exist_ok=True)
            with self.metrics.open("a") as stream:
                stream.write(json.dumps(record, default=float) + "\n")

    # -- evaluation ----------------------------------------------------------------
    def _train_step(self, batch: Batch, i: int) -> dict[str, Any]:
        context = self.distributed
        if context is None:
            return self.learner.train_step(batch, self.optimizer, i, self.iterations)
        shard_batch, shard = context.shard_batch(batch)

        def reduce(parameters: list[Tensor]) -> None:
            context.all_reduce_gradients(parameters, shard.weight, i)

        stats = self.learner.train_step(shard_batch, self.optimizer, i, self.iterations, reduce=reduce)
        stats["meta_loss"] = context.all_reduce_scalar(stats["meta_loss"], shard.weight, i)
        return stats

    def evaluate(self) -> dict[str, Any]:
        """Mean and 95% confidence half-width of the test metrics over the test tasks."""
        return evaluate(self.learner, self.tasks.test_batches(), self.eval_steps)

    # -- the loop ------------------------------------------------------------------
    def fit(self) -> list[dict[str, Any]]:
        """Train to ``iterations``, then save the checkpoint and only then run the final evaluation
        (a failing evaluation never loses the run)."""
        if self.is_main:
            for path, what in ((self.checkpoint, "checkpoint"), (self.metrics, "metrics")):
                if path is not None:
                    check_writable(path, what)
        if self.resume and self.checkpoint is not None and self.checkpoint.exists():
            self.restore(load_checkpoint(self.checkpoint, self.config))
            self._truncate_metrics()
        elif self.iteration == 0:
            torch.manual_seed(self.seed)
            if self.metrics is not None and self.metrics.exists() and self.is_main:
                self.metrics.unlink()
        if self.distributed is not None:
            inner = getattr(getattr(self.learner, "loop", None), "optimizer", None)
            self.distributed.check_consistent({
                **self.config, "resumed_at": self.iteration, "outer optimizer": optimizer_settings(self.optimizer),
                "inner optimizer": None if inner is None else optimizer_settings(inner)})
        bar = Progress(self.iterations, type(self.learner).__name__, start=self.iteration,
                       enabled=self.progress and self.is_main)
        self._started = time.perf_counter()
        self._generator = torch.Generator()  # reseeded every iteration (iteration_generator)
        saved_at = None
        try:
            while self.iteration < self.iterations:
                i = self.iteration
                if self.before_step is not None:
                    self.before_step(self.learner, i)
                batch = self.tasks.train_batch(iteration_generator(self.seed, i, self._generator))
                stats = self._checked_step(batch, i)
                self.iteration = i + 1
                self._running.append(stats["meta_loss"])
                record: dict[str, Any] = {}
                for callback in self.callbacks:
                    record.update(callback(self, self.iteration) or {})
                if self.iteration % self.log_every == 0 or record:
                    self._log({"iteration": self.iteration, "meta_loss": sum(self._running) / len(self._running),
                               "seconds": self._elapsed(), **record})
                    self._running = []
                evaluating = bool(self.eval_every) and self.iteration % self.eval_every == 0 \
                    and self.iteration < self.iterations
                saving = self.checkpoint is not None and self.iteration % self.checkpoint_every == 0
                if evaluating or saving:
                    self._check_weights()
                if evaluating:
                    self._log({"iteration": self.iteration, "eval": self._evaluate("evaluation")})
                if saving:
                    self.save()
                    saved_at = self.iteration
                bar.update(1, postfix=f"loss {stats['meta_loss']:.4f}")
        finally:
            bar.close()
        self._check_weights()
        if saved_at != self.iteration:
            self.save()
        final = {"iteration": self.iteration, "eval": self._evaluate("final evaluation"), "final": True}
        self._log(final)
        return self.history

    def _checked_step(self, batch: Batch, i: int) -> dict[str, Any]:
        """One meta-step; divergence raises :class:`NonFiniteError` naming the meta-iteration, the
        task and inner step when known, and the likely cause (inner or outer learning rate)."""
        try:
            stats = self._train_step(batch, i)
        except FloatingPointError as error:
            if i > 0:
                self._check_weights()  # non-finite weights from the last outer step explain it best
            raise NonFiniteError(f"diverged at meta-iteration {i}: {_explain(str(error), i)}") from error
        if not math.isfinite(stats["meta_loss"]):
            if i > 0:
                self._check_weights()
            raise NonFiniteError(
                f"meta-loss is {stats['meta_loss']} at iteration {i} (diverged at meta-iteration {i}); likely "
                + ("cause: the outer learning rate (--outer-lr): the weights the previous outer steps made give a "
                   "non-finite query loss; lower it" if i > 0 else
                   "cause: the initial weights or the data, or the inner learning rate (--inner-lr); lower the "
                   "outer or inner learning rate")
            )
        return stats

    def _check_weights(self) -> None:
        """Refuse non-finite weights, naming the outer step that made them.

        Not read after every outer step: weights the inner loop adapts are checked by the next
        meta-step (``InnerLoop``'s one read, which sees them through the adapted weights), and a
        learner's non-finite weights give a non-finite meta-loss; either calls this. It also runs
        before every checkpoint and evaluation and after the last iteration, so nothing is saved
        or evaluated with weights the last outer step broke."""
        if all_finite(list(self.learner.parameters())):  # one read; the names only on failure
            return
        bad = [name for name, p in self.learner.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
        if self.iteration == 0:
            raise NonFiniteError(f"the initial weights {', '.join(bad[:3])} are not finite; check the model's "
                                 "initialisation or the checkpoint it was loaded from")
        raise NonFiniteError(
            f"diverged at meta-iteration {self.iteration - 1}: the outer step made the weights {', '.join(bad[:3])} "
            "non-finite; likely cause: the outer learning rate (--outer-lr) is too large; lower it"
        )

    def _evaluate(self, what: str) -> dict[str, Any]:
        try:
            return self.evaluate()
        except FloatingPointError as error:
            saved = (f"; the checkpoint of iteration {self.iteration} was saved" if self.checkpoint is not None
                     and self.is_main else "")
            raise NonFiniteError(f"{what} after meta-iteration {self.iteration} diverged: "
                                 f"{_explain(str(error), None)}{saved}") from error


def _explain(message: str, iteration: int | None) -> str:
    """An inner loop's divergence message with its generic advice replaced by the likely cause."""
    fact = message.split("; lower", 1)[0].split("; clip", 1)[0].rstrip(". ")
    found = re.search(r"inner step (\d+)", message)
    if found is None:
        return f"{fact}; lower the inner (--inner-lr) or outer (--outer-lr) learning rate"
    if int(found.group(1)) == 0 and iteration:
        cause = ("the loss is already non-finite at the meta-learned weights, before any inner step: likely "
                 "cause: the outer learning rate (--outer-lr) is too large; lower it")
    elif int(found.group(1)) == 0:
        cause = "the loss is non-finite before any inner step: check the data and the initial weights"
    else:
        cause = "likely cause: the inner learning rate (--inner-lr) is too large; lower it or clip gradients"
    return f"{fact}; {cause}"


def evaluate(learner: MetaLearner, batches: Iterable[Batch], steps: Sequence[int] = (0, 1, 5, 10)) -> dict[str, Any]:
    """Per-metric mean and 95% CI over all test tasks; per test-time step for inner-loop learners.

    Test-time fine-tuning that diverges on a test task is a result, not a crash: that batch
    is evaluated again without the inner loop's non-finite checks, the task's loss counts as
    ``inf`` from the step where it diverged (so the mean is ``inf``) and its other metrics
    (accuracy, computed from non-finite predictions) as ``nan`` (so their mean is ``nan``),
    the step's summary of every metric gets ``"diverged"``: the number of such tasks, and a
    :class:`RuntimeWarning` repeats the inner loop's error (which step, which task).
    Training's own divergence still raises.
    """
    per_task: dict[str, list[Tensor]] = {}
    stepwise = hasattr(learner, "evaluate_steps")
    for sx, sy, qx, qy in batches:
        values = _evaluate_steps(learner, (sx, sy, qx, qy), steps) if stepwise else learner.evaluate(sx, sy, qx, qy)
        for name, value in values.items():
            per_task.setdefault(name, []).append(value.detach())
    summary: dict[str, Any] = {}
    for name, chunks in per_task.items():
        values = torch.cat(chunks, dim=-1).double()
        if stepwise:
            summary[name] = {str(k): _summary(values[j]) for j, k in enumerate(steps)}
        else:
            summary[name] = _summary(values)
    return summary


def _evaluate_steps(learner: MetaLearner, batch: Batch, steps: Sequence[int]) -> dict[str, Tensor]:
    """``learner.evaluate_steps`` on one batch, a diverging test task reported (see :func:`evaluate`)."""
    try:
        return learner.evaluate_steps(*batch, steps)  # type: ignore[attr-defined]
    except NonFiniteError as error:
        loop = getattr(learner, "loop", None)
        if loop is None or not getattr(loop, "check_finite", False):
            raise
        warnings.warn(f"evaluation: test-time fine-tuning diverged: {error}. That task's loss counts as inf "
                      "from there on (the summary's 'diverged' counts such tasks)", RuntimeWarning, stacklevel=3)
        loop.check_finite = False
        try:
            values = learner.evaluate_steps(*batch, steps)  # type: ignore[attr-defined]
        finally:
            loop.check_finite = True
    finite = torch.isfinite(values["loss"])
    # a diverged task's other metrics (accuracy) were computed from non-finite predictions: NaN, counted
    return {name: torch.where(finite, value, torch.inf if name == "loss" else torch.nan)
            for name, value in values.items()}


def summary_text(entry: dict[str, float]) -> str:
    """One :func:`evaluate` summary as text: ``"0.596 ± 0.057"``, or ``"inf (3 of 600 tasks diverged)"``
    (``"nan (…)"`` for an accuracy)."""
    if entry.get("diverged"):
        return f"{entry['mean']} ({entry['diverged']} of {entry['tasks']} tasks diverged)"
    return f"{entry['mean']:.3f} ± {entry['ci95']:.3f}"


def _summary(values: Tensor) -> dict[str, float]:
    diverged = int((~torch.isfinite(values)).sum())
    if diverged:  # the mean is inf (a loss) or nan (another metric): no interval to give
        mean = math.inf if bool((values == math.inf).any()) and not bool(values.isnan().any()) else math.nan
        return {"mean": mean, "ci95": math.nan, "tasks": int(values.numel()), "diverged": diverged}
    mean, half = mean_ci95(values)
    return {"mean": mean, "ci95": half, "tasks": int(values.numel())}
