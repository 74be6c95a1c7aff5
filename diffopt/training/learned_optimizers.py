r"""Meta-training learned update rules with truncated unrolls, and evaluating optimizers.

An *unroll* trains a batch of freshly initialised optimizees (a task family's
tasks, :mod:`.families`) for ``unroll`` = T steps with the rule. It is cut into
truncations of ``truncation`` = k steps; the optimizee weights **and the rule's
state** (LSTM hidden states, momenta, the hypergradient learning rate) are
carried from one truncation to the next, cut from the graph, and the rule's
tensors take one meta-update per truncation (truncated backpropagation through
time, as Andrychowicz et al. and Metz et al.). The meta-objective of a
truncation is the mean over its k steps of the optimizees' training loss after
each step — its logarithm by default (``objective="log"``), so that tasks of
different loss scales weigh alike.

Meta-gradient modes, all through :class:`diffopt.unroll.InnerLoop`'s steps
(the optimizees run vectorised over the task batch):

=================  ========================================================
``second_order``   exact gradient of the truncation's objective (the graph
                   of every step, second derivatives of the optimizee
                   included): the engine's ``"full"`` step.
``first_order``    the optimizee's gradients are treated as constants
                   (Andrychowicz et al.'s simplification); the rule's own
                   computation stays differentiable: ``"first_order"`` steps.
``pes``            persistent evolution strategies (Vicol et al., 2021): N
                   antithetic particle pairs, each with its own optimizee
                   carried across the truncations, perturbed by fresh noise
                   ε every truncation; the estimate
                   :math:`\frac{1}{2\sigma^2 N}\sum_i (L_i^+ - L_i^-)\,\xi_i` with
                   :math:`\xi_i` the noise accumulated so far. Unbiased for the
                   whole unroll, no backpropagation.
=================  ========================================================

The meta-optimizer is Adam at ``meta_lr``. The hypergradient rules' tensors (α₀ and β,
step sizes of very different scales) take relative steps and relative PES noise
(:data:`RELATIVE_STEP_RULES`), and SGD-HD starts from β = 1e-6 unless told
otherwise (:data:`TRAINING_DEFAULTS`). A diverging optimizee stops the run with
the meta-iteration, the truncation and the rule's step-size options
(:data:`STEP_SIZE_OPTIONS`).

Exact resume: the tasks (and PES noise) of iteration ``i`` come from a
generator seeded by ``(seed, i)``; a checkpoint (written atomically with
:func:`diffopt.training.save_checkpoint`) holds the rule's tensors, the
meta-optimizer, the RNG state, the history and the iteration, so resuming
reproduces the uninterrupted run bit for bit on CPU.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import unroll
from .._io import check_writable
from .._progress import Progress
from ..optim import DifferentiableOptimizer
from ..optim.learned.factory import RULES, make_rule
from ..optim.learned.serialization import live_tensors, save, to_payload
from ..unroll import Carry, InnerLoop
from ..unroll.carry import detached
from .families import TaskBatch, TaskFamily, family
from ..errors import CheckpointError, NonFiniteError
from .trainer import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, iteration_generator, load_checkpoint, save_checkpoint

__all__ = ["MODES", "OBJECTIVES", "RULES", "OptimizerTrainer", "TrainConfig", "loss_curves", "make_rule", "Unroll"]

# The modes one truncation's meta-gradient can take here: the exact gradient, the first-order one, and
# PES, which this trainer runs itself across truncations (the engine's other modes differentiate one
# InnerLoop run, not a truncation whose rule state carries on to the next).
TRUNCATION_MODES = frozenset({"second_order", "first_order", "pes"})
MODES = tuple(mode for mode in unroll.MODES if mode in TRUNCATION_MODES)
OBJECTIVES = ("log", "loss")
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Rules whose learnable tensors are step sizes spanning orders of magnitude (the hypergradient rules' α₀ = 1e-2
# and β = 1e-3 ... 1e-7). Adam moves every tensor by about meta_lr per update whatever its scale, which took
# β = 1e-5 to 3e-3 in one meta-update; these take relative steps: Adam's rate for each tensor is meta_lr·|w|
# at each update (Adam on log w to first order), so a step size changes by ~meta_lr of itself and stays positive.
RELATIVE_STEP_RULES = frozenset({"hypergradient_sgd", "hypergradient_adam"})

# Rule options meta-training starts from where the rule's own default does not survive an unroll. SGD-HD's
# β = 1e-3 (Baydin et al.'s) is for losses of order 1: its hypergradient ∇f_t·∇f_{t−1} sums over every weight,
# on the sinusoid family it reaches 1e2–1e3, so α jumps from 0.01 to 0.1–1, overshoots, turns negative and the
# optimizees diverge within 3–36 steps (10 of 10 task batches; 4 of 10 at β = 1e-4; 10 of 100 at 4e-5, none at
# 2e-5). Meta-training then raises α₀ and β steadily (the truncated objective favours larger steps): from
# β = 1e-5 a task diverged at meta-iteration 75 (β ≈ 2.4e-5); from 1e-6, 100 meta-iterations of every family
# end at β ≈ 3.3e-6 (the first divergence, seed 0 on the sinusoid, at meta-iteration 173).
TRAINING_DEFAULTS: dict[str, dict[str, Any]] = {"hypergradient_sgd": {"hyper_lr": 1e-6}}

# The options that set a rule's step size: what a diverging unroll's message tells the user to lower.
STEP_SIZE_OPTIONS = {"lstm": ("output_scale",), "mlp": ("lr", "magnitude_scale"), "meta_curvature": ("lr",),
                     "meta_sgd": ("init",), "per_layer_per_step": ("init",),
                     "hypergradient_sgd": ("lr", "hyper_lr"), "hypergradient_adam": ("lr", "hyper_lr")}


# -- unrolling optimizees ------------------------------------------------------------------
def _log_or_plain(losses: Tensor, objective: str) -> Tensor:
    return torch.log(losses + 1e-12).mean() if objective == "log" else losses.mean()


class Unroll:
    """Optimizees of a task family stepped by a differentiable optimizer through the engine.

    Args:
        model: the family's architecture; ``optimizer`` must be built on ``model.parameters()``.
        optimizer: the rule (learned or not).
        loss_fn: the family's loss.
        vectorize: as :class:`~diffopt.unroll.InnerLoop`.
        check_finite: raise on a non-finite optimizee loss (training); evaluation turns it off.
    """

    def __init__(self, model: nn.Module, optimizer: DifferentiableOptimizer, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 *, vectorize: bool | str = "auto", check_finite: bool = True) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loop = InnerLoop(model, optimizer, loss_fn, steps=1, vectorize=vectorize, check_finite=check_finite)

    def start(self, batch: TaskBatch) -> Carry:
        """The carry at step 0: each task's own initial weights, fresh rule state."""
        expected = [tuple(p.shape) for p in self.model.parameters()]
        got = [tuple(t.shape[1:]) for t in batch.init]
        if expected != got:
            raise ValueError(f"task initial weights have shapes {got}, the model's are {expected}")
        params = [t.detach().clone().requires_grad_() for t in batch.init]
        states = self.optimizer.initial_states(params)
        return Carry(params, states, self.loop.patched.initial_buffers(batch.num_tasks), 0)

    def losses(self, carry: Carry, x: Tensor, y: Tensor) -> Tensor:
        """Per-task loss ``(T,)`` at the carry's weights."""
        losses, _ = self.loop.task_losses(carry.params, carry.buffers, x, y, "outer")
        return losses

    def step(self, carry: Carry, batch: TaskBatch, graph: str) -> Carry:
        return self.loop.step(carry, batch.x, batch.y, graph)

    def truncation(self, carry: Carry, batch: TaskBatch, steps: int, graph: str,
                   objective: str = "log") -> tuple[Carry, Tensor, Tensor]:
        """``steps`` steps from ``carry`` (cut from any earlier graph).

        Returns the new carry, the objective (mean over the steps of the mean
        per-task training loss, or its log) with the graph ``graph`` implies, and
        the per-task losses after the last step.
        """
        if graph != "none":
            carry = detached(carry, requires_grad=True)  # a fresh graph for this truncation
        total: Tensor | float = 0.0
        last = None
        for _ in range(steps):
            carry = self.step(carry, batch, graph)
            if graph == "none":
                with torch.no_grad():
                    last = self.losses(carry, batch.x, batch.y)
            else:
                last = self.losses(carry, batch.x, batch.y)
            total = total + _log_or_plain(last, objective)
        assert last is not None
        return carry, total / steps, last.detach()


def loss_curves(optimizer: DifferentiableOptimizer, model: nn.Module, task_family: TaskFamily, batch: TaskBatch,
                steps: int, *, vectorize: bool | str = "auto", held_out: bool = True) -> dict[str, Tensor]:
    """Training and held-out losses of every task after 0..steps steps: ``{"train", "eval"}`` of shape ``(steps+1, T)``
    (``"eval"`` only if ``held_out``).

    No graph is built. Once a task's training loss is non-finite (the optimizee
    diverged) its losses are reported as ``inf`` from then on; tasks are
    independent, so the others are unaffected.
    """
    unroll = Unroll(model, optimizer, task_family.loss_fn, vectorize=vectorize, check_finite=False)
    carry = unroll.start(batch)
    train: list[Tensor] = []
    evaluations: list[Tensor] = []
    dead = torch.zeros(batch.num_tasks, dtype=torch.bool)
    for k in range(steps + 1):
        with torch.no_grad():
            losses = unroll.losses(carry, batch.x, batch.y)
            dead = dead | ~torch.isfinite(losses)
            train.append(torch.where(dead, torch.full_like(losses, math.inf), losses))
            if held_out:
                evaluated = unroll.losses(carry, batch.eval_x, batch.eval_y)
                evaluations.append(torch.where(dead | ~torch.isfinite(evaluated), torch.full_like(evaluated, math.inf),
                                               evaluated))
        if k < steps:
            carry = unroll.step(carry, batch, "none")
    out = {"train": torch.stack(train)}
    if held_out:
        out["eval"] = torch.stack(evaluations)
    return out


# -- meta-training -------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """What a meta-training run is (saved in checkpoints; a resume must match it)."""

    rule: str = "mlp"
    task: str = "sinusoid"
    unroll: int = 50
    truncation: int = 10
    iterations: int = 100
    meta_batch: int = 8
    meta_lr: float = 3e-3
    mode: str = "first_order"
    objective: str = "log"
    meta_clip: float = 1.0
    pes_samples: int = 4
    pes_sigma: float = 0.01
    seed: int = 0
    dtype: str = "float32"
    vectorize: Any = "auto"
    rule_options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule={self.rule!r}: choose one of {', '.join(RULES)}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: choose one of {', '.join(MODES)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        for name in ("unroll", "truncation", "meta_batch", "pes_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if self.truncation > self.unroll:
            raise ValueError(f"truncation ({self.truncation}) must not exceed the unroll length ({self.unroll})")
        if not self.meta_lr > 0 or not self.pes_sigma > 0 or not self.meta_clip > 0:
            raise ValueError("meta_lr, pes_sigma and meta_clip must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: everything but ``iterations`` (a run may be extended)."""
        return {k: v for k, v in self.to_dict().items() if k != "iterations"}


class OptimizerTrainer:
    """Meta-trains a learned rule on a task family (see the module docstring).

    Args:
        config: the run (:class:`TrainConfig`).
        checkpoint: path of the checkpoint, written every ``checkpoint_every`` iterations and at the end.
        resume: continue from ``checkpoint`` if it exists (it must come from the same config).
        progress: show a progress bar.
        metrics: a JSON-lines file of per-iteration records.

    After :meth:`fit`, ``trainer.optimizer`` is the trained differentiable rule
    (on the family's model), :meth:`save_rule` writes it for
    :func:`diffopt.optim.learned.load`.
    """

    def __init__(self, config: TrainConfig, *, checkpoint: str | os.PathLike[str] | None = None,
                 checkpoint_every: int = 50, resume: bool = False, progress: bool = True,
                 metrics: str | os.PathLike[str] | None = None) -> None:
        config.validate()
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.config = config
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.checkpoint_every, self.resume, self.progress = checkpoint_every, resume, progress
        self.metrics = Path(metrics) if metrics is not None else None
        self.family = family(config.task, **config.task_options)
        self.dtype = DTYPES[config.dtype]
        self.model = self.family.model(self.dtype)
        generator = torch.Generator().manual_seed(config.seed)
        options = {**TRAINING_DEFAULTS.get(config.rule, {}), **config.rule_options}
        self.optimizer = make_rule(config.rule, self.model.parameters(), generator=generator, steps=config.unroll,
                                   **options)
        self.meta_params = self.optimizer.hyperparameter_tensors()
        if not self.meta_params:
            raise ValueError(f"the {config.rule} rule has no learnable tensors to meta-train")
        self.relative_steps = config.rule in RELATIVE_STEP_RULES
        groups = [{"params": [w]} for w in self.meta_params] if self.relative_steps else self.meta_params
        self.meta_optimizer = torch.optim.Adam(groups, lr=config.meta_lr)
        self.unroll = Unroll(self.model, self.optimizer, self.family.loss_fn, vectorize=config.vectorize)
        self.iteration = 0
        self.saved_iteration: int | None = None  # the iteration of the last checkpoint written or restored
        self.history: list[dict[str, Any]] = []

    # -- checkpoints -------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": self.config.identity(),
                "iteration": self.iteration, "rule": to_payload(self.optimizer),
                "meta_optimizer": self.meta_optimizer.state_dict(), "rng": torch.get_rng_state(),
                "history": json.dumps(self.history)}

    def restore(self, payload: dict[str, Any]) -> None:
        """Load a checkpoint's rule, meta-optimizer, RNG and history; one that does not fit this rule
        raises :class:`CheckpointError` in one line and changes nothing."""
        where = self.checkpoint or "the checkpoint"
        missing = [k for k in ("rule", "meta_optimizer", "rng", "iteration", "history") if k not in payload]
        rule = payload.get("rule")
        if missing or not isinstance(rule, dict) or not isinstance(rule.get("tensors"), dict):
            raise CheckpointError(f"{where} is not a complete train-optimizer checkpoint (it has no "
                                  f"{', '.join(missing) or 'rule tensors'})")
        saved = rule["tensors"]
        live = live_tensors(self.optimizer)
        wrong = [name for name, tensor in live.items()
                 if not isinstance(saved.get(name), torch.Tensor) or saved[name].shape != tensor.shape]
        if wrong or sorted(saved) != sorted(live):
            raise CheckpointError(f"{where} holds another rule's tensors (differing: {', '.join(wrong) or 'names'})")
        before = self.meta_optimizer.state_dict()
        try:
            self.meta_optimizer.load_state_dict(payload["meta_optimizer"])
            history = json.loads(payload["history"])
            torch.set_rng_state(payload["rng"])
        except Exception as error:  # noqa: BLE001 - a damaged or foreign checkpoint: one line
            self.meta_optimizer.load_state_dict(before)
            reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{where} does not fit this rule's meta-optimizer ({reason})") from None
        with torch.no_grad():
            for name, tensor in live.items():
                tensor.copy_(saved[name])
        self.iteration = int(payload["iteration"])
        self.saved_iteration = self.iteration
        self.history = history

    def save_checkpoint(self) -> None:
        if self.checkpoint is not None:
            save_checkpoint(self.checkpoint, self.state())
            self.saved_iteration = self.iteration

    def save_rule(self, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> None:
        """Write the trained rule (loadable by :func:`diffopt.optim.learned.load`)."""
        save(self.optimizer, path, metadata={"training": self.config.to_dict(), "iterations": self.iteration,
                                             **(metadata or {})})

    # -- one meta-iteration ------------------------------------------------------------
    def _meta_step(self, grads: Sequence[Tensor | None]) -> None:
        for p, g in zip(self.meta_params, grads):
            p.grad = None if g is None else g.detach().clone()
        torch.nn.utils.clip_grad_norm_(self.meta_params, self.config.meta_clip)
        if self.relative_steps:  # RELATIVE_STEP_RULES: a step of ~meta_lr·|w| (a zero stays zero)
            for group, w in zip(self.meta_optimizer.param_groups, self.meta_params):
                group["lr"] = self.config.meta_lr * float(w.detach().abs().max())
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)

    def train_iteration(self, i: int) -> dict[str, Any]:
        """One unroll of ``unroll`` steps on a fresh task batch, a meta-update per truncation."""
        cfg = self.config
        generator = iteration_generator(cfg.seed, i)
        batch = self.family.sample(cfg.meta_batch, generator, "train", self.dtype)
        bounds = list(range(0, cfg.unroll, cfg.truncation))
        if cfg.mode == "pes":
            return self._pes_iteration(batch, bounds, generator, i)
        graph = "full" if cfg.mode == "second_order" else "first_order"
        carry = self.unroll.start(batch)
        objectives, last = [], None
        for start in bounds:
            length = min(cfg.truncation, cfg.unroll - start)
            try:
                carry, objective, last = self.unroll.truncation(carry, batch, length, graph, cfg.objective)
            except FloatingPointError as error:  # the engine's words are for an inner loop with a fixed rate
                raise NonFiniteError(self._diverged(i, start, str(error).split(";")[0])) from error
            if not torch.isfinite(objective.detach()):
                raise NonFiniteError(self._diverged(i, start, f"the meta-objective is {float(objective.detach())}"))
            grads = torch.autograd.grad(objective, self.meta_params, allow_unused=True)
            self._meta_step(grads)
            objectives.append(float(objective.detach()))
        assert last is not None
        return {"iteration": i, "objective": sum(objectives) / len(objectives), "final_loss": float(last.mean())}

    def _diverged(self, i: int, start: int, what: str, pes: bool = False) -> str:
        """The message of an unroll that diverged: where, and the options that lower the step size."""
        rule = self.config.rule
        options = " or ".join(f"rule_options {name}= (--rule-option {name}=...)"
                              for name in STEP_SIZE_OPTIONS.get(rule, ()))
        first = i == 0 and start == 0
        after = "at the rule's initial weights" if first else "after meta-updates"
        also = ([] if first else ["meta_lr (--meta-lr)"]) + (["pes_sigma (--pes-sigma)"] if pes else [])
        return (f"the optimizees diverged under the {rule} rule at meta-iteration {i}, in the truncation from "
                f"step {start} ({after}): {what}; lower the rule's step size ({options or 'its options'})"
                + "".join(f" or {item}" for item in also))

    def _pes_iteration(self, batch: TaskBatch, bounds: list[int], generator: torch.Generator,
                       i: int) -> dict[str, Any]:
        cfg = self.config
        n, sigma = cfg.pes_samples, cfg.pes_sigma
        # RELATIVE_STEP_RULES: tensor j is perturbed by σ·s_j·ε (s_j = its magnitude at the unroll's start), the
        # smoothing N(0, σ²S²), whose PES estimate divides the accumulated noise by s_j² (s_j = 1: Vicol et al.'s)
        scales = ([float(w.detach().abs().max()) or 1.0 for w in self.meta_params] if self.relative_steps
                  else [1.0] * len(self.meta_params))
        carries = [self.unroll.start(batch) for _ in range(2 * n)]
        accumulated = [[torch.zeros_like(w) for w in self.meta_params] for _ in range(n)]
        objectives, finals = [], []  # finals: every particle's final loss (antithetic pairs: about the centre's)
        for start in bounds:
            length = min(cfg.truncation, cfg.unroll - start)
            estimate = [torch.zeros_like(w) for w in self.meta_params]
            values = []
            originals = [w.detach().clone() for w in self.meta_params]
            try:
                for k in range(n):
                    noise = [torch.randn(w.shape, generator=generator, dtype=w.dtype) * sigma
                             for w in self.meta_params]
                    if self.relative_steps:
                        noise = [e * scale for e, scale in zip(noise, scales)]
                    pair = []
                    for sign, index in ((1.0, 2 * k), (-1.0, 2 * k + 1)):
                        with torch.no_grad():
                            for w, w0, e in zip(self.meta_params, originals, noise):
                                w.copy_(w0 + sign * e)
                        try:
                            carries[index], value, last = self.unroll.truncation(
                                carries[index], batch, length, "none", cfg.objective)
                        except FloatingPointError as error:
                            raise NonFiniteError(self._diverged(
                                i, start, str(error).split(";")[0], pes=True)) from error
                        pair.append(float(value))
                        if start == bounds[-1]:
                            finals.append(float(last.mean()))
                    accumulated[k] = [a + e for a, e in zip(accumulated[k], noise)]
                    difference = (pair[0] - pair[1]) / (2 * sigma**2 * n)
                    if not math.isfinite(difference):
                        raise NonFiniteError(self._diverged(
                            i, start, "PES: a perturbed truncation's objective is not finite", pes=True))
                    if self.relative_steps:
                        estimate = [e + difference * a / scale**2
                                    for e, a, scale in zip(estimate, accumulated[k], scales)]
                    else:
                        estimate = [e + difference * a for e, a in zip(estimate, accumulated[k])]
                    values.extend(pair)
            finally:
                with torch.no_grad():
                    for w, w0 in zip(self.meta_params, originals):
                        w.copy_(w0)
            self._meta_step(estimate)
            objectives.append(sum(values) / len(values))
        return {"iteration": i, "objective": sum(objectives) / len(objectives), "final_loss": sum(finals) / len(finals)}

    # -- the loop ----------------------------------------------------------------------
    def fit(self, callback: Callable[["OptimizerTrainer", dict[str, Any]], None] | None = None) -> DifferentiableOptimizer:
        """Run the remaining meta-iterations; returns the trained rule (``self.optimizer``)."""
        cfg = self.config
        for path, what in ((self.checkpoint, "checkpoint"), (self.metrics, "metrics")):
            if path is not None:
                check_writable(path, what)  # now, not after the first meta-iterations
        if self.resume and self.checkpoint is not None and self.checkpoint.exists():
            self.restore(load_checkpoint(self.checkpoint, cfg.identity()))
            self._truncate_metrics()
        else:
            torch.manual_seed(cfg.seed)
            if self.metrics is not None and self.metrics.exists():
                self.metrics.unlink()
        bar = Progress(cfg.iterations, f"train-optimizer {cfg.rule}", start=self.iteration, enabled=self.progress)
        started = time.perf_counter()
        while self.iteration < cfg.iterations:
            i = self.iteration
            record = self.train_iteration(i)
            record["iteration"] = i
            self.history.append(record)
            self.iteration = i + 1
            if self.metrics is not None:
                self.metrics.parent.mkdir(parents=True, exist_ok=True)
                with self.metrics.open("a") as stream:
                    stream.write(json.dumps(record) + "\n")
            if callback is not None:
                callback(self, record)
            bar.update(1, postfix=f"objective {record['objective']:.4g} final loss {record['final_loss']:.4g}")
            if self.checkpoint is not None and (self.iteration % self.checkpoint_every == 0
                                                or self.iteration == cfg.iterations):
                self.save_checkpoint()
        bar.close()
        self.elapsed = time.perf_counter() - started
        return self.optimizer

    def _truncate_metrics(self) -> None:
        if self.metrics is None or not self.metrics.exists():
            return
        kept = [line for line in self.metrics.read_text().splitlines()
                if line.strip() and json.loads(line).get("iteration", 0) < self.iteration]
        self.metrics.write_text("".join(line + "\n" for line in kept))
