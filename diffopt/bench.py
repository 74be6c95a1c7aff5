r"""Benchmarks of the inner-loop modes against plain PyTorch: time, memory and accuracy.

For each problem (MAML's sinusoid MLP, the Conv-4 network on synthetic glyphs,
or a user's model), each number of inner steps K and each engine mode
(``first_order``, ``second_order``, ``truncated``, ``checkpointed``,
``implicit``, ``forward``, ``es``, ``pes``) this measures

* the **time per meta-step** (meta-loss and ``backward()`` to every
  meta-parameter): median and interquartile range over rounds in which every
  implementation runs once, in a freshly shuffled order (``interleave`` of
  :mod:`diffopt._measure`), so that the drifts of a shared machine hit all
  alike. The same rounds time the **baselines**: a plain PyTorch loop over
  tasks (``torch.func.functional_call`` + ``torch.autograd.grad``), a
  ``higher.innerloop_ctx`` loop, ``torch.func.vmap`` over tasks of
  ``torch.func.grad`` steps (each second and first order) and torchopt's
  ``MetaSGD`` loop when torchopt is installed. Every figure is also given as a
  ratio to the plain loop of the same order measured in the same rounds
  (first order against the first-order loop, every other mode against the
  second-order loop, the exact meta-gradient's reference);
* the **peak memory** of one meta-step: the peak of CPU tensor memory
  allocated during the call above what was allocated when it started, from
  ``torch.profiler.profile(profile_memory=True)`` allocation and free events
  summed in time order (``_measure.peak_tensor_bytes``), taken in the
  timing process after a warm-up call (``memory="profiler"``), or in a fresh
  Python process per configuration together with the peak resident-set
  increase (``memory="subprocess"``);
* how far each mode's meta-gradient is from the exact one: the cosine and
  relative error against the plain loop's second-order meta-gradient on the
  same meta-batch, and the first- versus second-order **meta-gradient
  discrepancy** of :func:`diffopt.diagnostics.metagradient_discrepancy`
  (cosine and relative error per task, mean and 95% CI) at the initial weights
  and at the weights second-order training reached;
* the **meta-test loss or accuracy** (mean and 95% CI over the test tasks,
  after K test-time steps) after a fixed budget of meta-training *time* and
  after a fixed budget of meta-*iterations*, for every mode and for the plain
  loop, and its paired difference to second order on the same test tasks:
  every run starts from the same weights and sees the same meta-batches
  (iteration ``i`` draws from a generator seeded by ``(seed, i)``); the runs
  advance in interleaved rounds of one meta-iteration each, so that the load
  of a shared machine hits every run's clock alike; the clock counts the
  meta-steps and the outer optimizer's steps, not data sampling, snapshots or
  evaluation.

Matplotlib is optional: :func:`plot` says so and returns no files without it.
The command line is ``diffopt bench`` (``diffopt/bench_cli.py``) and
``python benchmarks/modes.py``.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _measure as common

MODES = ("first_order", "second_order", "truncated", "checkpointed", "implicit", "forward", "es", "pes")
BASELINES = ("plain loop", "higher loop", "torch.func vmap", "torchopt")
STEPS = (1, 2, 5, 10, 20, 50, 100)
QUICK_STEPS = (1, 5)
PROBLEMS = ("sinusoid", "conv4")
TASKS = ("sinusoid", "regression", "classification")
MiB = 2**20
Batch = tuple[Tensor, Tensor, Tensor, Tensor]

HELPERS = "diffopt._measure"


# ---------------------------------------------------------------------------------------------
# problems
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Problem:
    """A benchmark problem: a model factory, a task source and the inner/outer settings."""

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    source: Any  # train_batch(generator) -> Batch, test_batches() -> Iterable[Batch]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    classification: bool
    inner_lr: float
    outer_lr: float
    spec: dict[str, Any]
    batchnorm: str = "transductive"
    vectorize: bool | str = "auto"

    @property
    def metric(self) -> str:
        return "accuracy" if self.classification else "loss"

    @property
    def bn_mode(self) -> str:
        return "batch" if any(isinstance(m, nn.modules.batchnorm._NormBase) for m in self.make_model().modules()) \
            else "eval"


class RegressionSource:
    """Regression tasks for a user's model: ``y_m = A_m sin(x·w_m − b_m)`` for each output m.

    ``x ~ U[−5, 5]`` of ``input_shape``, ``w_m ~ N(0, I/D)`` (D inputs), ``A_m ~ U[0.1, 5]``,
    ``b_m ~ U[0, π]``: MAML's sinusoid when the input and output are one number.
    """

    def __init__(self, input_shape: Sequence[int], output_dim: int, meta_batch: int, shots: int, query: int,
                 test_tasks: int, test_query: int = 100, seed: int = 0) -> None:
        self.input_shape, self.output_dim = tuple(input_shape), output_dim
        self.meta_batch, self.shots, self.query = meta_batch, shots, query
        self.test_tasks, self.test_query, self.seed = test_tasks, test_query, seed

    def _tasks(self, tasks: int, shots: int, query: int, generator: torch.Generator) -> Batch:
        dim = math.prod(self.input_shape)
        w = torch.randn(tasks, dim, self.output_dim, generator=generator) / math.sqrt(dim)
        amplitude = torch.empty(tasks, 1, self.output_dim).uniform_(0.1, 5.0, generator=generator)
        phase = torch.empty(tasks, 1, self.output_dim).uniform_(0.0, math.pi, generator=generator)
        x = torch.empty(tasks, shots + query, *self.input_shape).uniform_(-5.0, 5.0, generator=generator)
        y = amplitude * torch.sin(x.flatten(2) @ w - phase)
        return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]

    def train_batch(self, generator: torch.Generator) -> Batch:
        return self._tasks(self.meta_batch, self.shots, self.query, generator)

    def test_batches(self, chunk: int = 100) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(self.seed + 7919)
        remaining = self.test_tasks
        while remaining > 0:
            n = min(chunk, remaining)
            yield self._tasks(n, self.shots, self.test_query, generator)
            remaining -= n

    def config(self) -> dict[str, Any]:
        return {"task": "regression", "input_shape": list(self.input_shape), "output_dim": self.output_dim,
                "meta_batch": self.meta_batch, "shots": self.shots, "query": self.query}


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """``module:factory`` -> the factory (a callable returning an ``nn.Module``)."""
    if ":" not in spec:
        raise ValueError(f"--model {spec!r}: give the model as module:factory, e.g. mypackage.models:make_net")
    module_name, attribute = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load --model {spec!r}: {error}") from error
    if not callable(factory):
        raise ValueError(f"--model {spec!r} is not callable: it must be a factory returning an nn.Module")
    return factory


def _seeded(factory: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"the model factory returned {type(model).__name__}, not an nn.Module")
        return model.float().train()

    return make


def _glyph_source(spec: Mapping[str, Any], image_size: int = 28) -> Any:
    from .recipes import EpisodeSource
    from .tasks import synthetic_glyphs

    data = synthetic_glyphs(spec["classes"], spec["examples"], image_size=image_size, seed=spec["seed"])
    train, test = data.split([0.7, 0.3], seed=spec["seed"])
    return EpisodeSource(train, test, meta_batch=spec["meta_batch"], ways=spec["ways"], shots=spec["shots"],
                         query=spec["query"], test_tasks=spec["test_tasks"], name="glyphs")


PROBLEM_DEFAULTS: dict[str, dict[str, Any]] = {
    "sinusoid": {"hidden": 40, "meta_batch": 25, "shots": 10, "query": 10, "inner_lr": 0.01, "outer_lr": 1e-3,
                 "test_tasks": 600, "test_query": 100},
    "conv4": {"filters": 64, "ways": 5, "shots": 1, "query": 15, "meta_batch": 4, "inner_lr": 0.4,
              "outer_lr": 1e-3, "test_tasks": 100, "classes": 200, "examples": 20},
    "custom": {"task": "sinusoid", "input_shape": None, "output_dim": 1, "ways": 5, "shots": None, "query": None,
               "meta_batch": None, "inner_lr": None, "outer_lr": 1e-3, "test_tasks": None, "classes": 200,
               "examples": 20, "sys_path": []},
}


def problem_spec(kind: str, **overrides: Any) -> dict[str, Any]:
    """A JSON-able description of a problem (defaults of ``PROBLEM_DEFAULTS[kind]`` + overrides)."""
    if kind not in PROBLEM_DEFAULTS:
        raise ValueError(f"unknown problem {kind!r}; choose one of {', '.join(PROBLEM_DEFAULTS)}")
    spec = {"kind": kind, "seed": 0, **PROBLEM_DEFAULTS[kind]}
    unknown = set(overrides) - set(spec) - {"factory"}
    if unknown:
        raise ValueError(f"unknown settings for problem {kind!r}: {', '.join(sorted(unknown))}")
    spec.update({k: v for k, v in overrides.items() if v is not None})
    return spec


def build_problem(spec: Mapping[str, Any]) -> Problem:
    """The :class:`Problem` a spec describes (see :func:`problem_spec`)."""
    from . import recipes

    spec = dict(spec)
    kind, seed = spec["kind"], spec["seed"]
    if kind == "sinusoid":
        source = recipes.SinusoidSource(spec["meta_batch"], spec["shots"], spec["query"], test_tasks=spec["test_tasks"],
                                        test_shots=spec["shots"], test_query=spec["test_query"])
        return Problem("sinusoid", f"sinusoid MLP 1-{spec['hidden']}-{spec['hidden']}-1, {spec['meta_batch']} tasks, "
                       f"{spec['shots']} support + {spec['query']} query, inner SGD lr {spec['inner_lr']}",
                       _seeded(lambda: recipes.sinusoid_mlp(spec["hidden"]), seed), source, F.mse_loss, False,
                       spec["inner_lr"], spec["outer_lr"], spec)
    if kind == "conv4":
        source = _glyph_source(spec)
        return Problem("conv4", f"Conv-4 ({spec['filters']} filters, transductive BatchNorm), synthetic glyphs "
                       f"{spec['ways']}-way {spec['shots']}-shot, {spec['query']} query per class, meta-batch "
                       f"{spec['meta_batch']}, inner SGD lr {spec['inner_lr']}",
                       _seeded(lambda: recipes.conv4(spec["ways"], hidden=spec["filters"]), seed), source,
                       F.cross_entropy, True, spec["inner_lr"], spec["outer_lr"], spec)
    if kind != "custom":
        raise ValueError(f"unknown problem {kind!r}")
    for entry in spec.get("sys_path") or []:
        if entry not in sys.path:
            sys.path.insert(0, entry)
    factory = _seeded(load_factory(spec["factory"]), seed)
    task = spec["task"]
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    classification = task == "classification"
    meta_batch = spec["meta_batch"] or (4 if classification else 25)
    shots = spec["shots"] or (1 if classification else 10)
    query = spec["query"] or (15 if classification else 10)
    test_tasks = spec["test_tasks"] or (100 if classification else 600)
    inner_lr = spec["inner_lr"] or (0.4 if classification else 0.01)
    shape = tuple(spec["input_shape"] or ((1, 28, 28) if classification else (1,)))
    if task == "sinusoid":
        if shape != (1,) or spec["output_dim"] != 1:
            raise ValueError("--task sinusoid has one input and one output; use --task regression for other shapes")
        source: Any = recipes.SinusoidSource(meta_batch, shots, query, test_tasks=test_tasks, test_shots=shots)
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.mse_loss
    elif task == "regression":
        source = RegressionSource(shape, spec["output_dim"], meta_batch, shots, query, test_tasks, seed=seed)
        loss_fn = F.mse_loss
    else:
        from .recipes import EpisodeSource
        from .tasks import synthetic_vectors

        episode = {**spec, "meta_batch": meta_batch, "shots": shots, "query": query, "test_tasks": test_tasks}
        if len(shape) == 3 and shape[0] == 1 and shape[1] == shape[2]:
            source = _glyph_source(episode, image_size=shape[1])
        elif len(shape) == 1:
            data = synthetic_vectors(spec["classes"], spec["examples"], dim=shape[0],
                                     informative_dim=min(8, max(1, shape[0] // 2)), seed=seed)
            train, test = data.split([0.7, 0.3], seed=seed)
            source = EpisodeSource(train, test, meta_batch=meta_batch, ways=spec["ways"], shots=shots, query=query,
                                   test_tasks=test_tasks, name="vectors")
        else:
            raise ValueError(f"--task classification supports inputs (D,) (Gaussian classes) or (1, S, S) (glyph "
                             f"images); got --input-shape {','.join(map(str, shape))}")
        loss_fn = F.cross_entropy
    problem = Problem(f"custom ({spec['factory']})", f"{spec['factory']} on {task} tasks, inputs {shape}, "
                      f"meta-batch {meta_batch}, {shots} support + {query} query"
                      f"{' per class' if classification else ''}, inner SGD lr {inner_lr}",
                      factory, source, loss_fn, classification, inner_lr, spec["outer_lr"], spec)
    _check_model(problem)
    return problem


def _check_model(problem: Problem) -> None:
    """A user's model must map the task's inputs to outputs of the targets' shape (or to logits)."""
    sx, sy, _, _ = problem.source.train_batch(torch.Generator().manual_seed(0))
    model = problem.make_model()
    try:
        with torch.no_grad():
            out = model(sx[0])
    except Exception as error:  # noqa: BLE001 - any failure is the model/task mismatch to explain
        raise ValueError(f"the model cannot take this task's inputs of shape {tuple(sx[0].shape)}: "
                         f"{type(error).__name__}: {error}; choose --task/--input-shape to match the model") from error
    if problem.classification:
        ways = int(sy.max()) + 1
        if out.dim() != 2 or out.shape[0] != sx.shape[1] or out.shape[1] != ways:
            raise ValueError(f"for {ways}-way classification the model must return logits of shape "
                             f"({sx.shape[1]}, {ways}); it returned {tuple(out.shape)}")
    elif out.shape != sy[0].shape:
        raise ValueError(f"for this regression task the model must return shape {tuple(sy[0].shape)}; it returned "
                         f"{tuple(out.shape)} (set --output-dim / --input-shape)")


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    """What to measure and with what budgets (``Settings.quick()`` for a ~1 minute run)."""

    steps: tuple[int, ...] = STEPS
    steps_by_problem: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    modes: tuple[str, ...] = MODES
    baselines: tuple[str, ...] = BASELINES
    repeats: int = 5
    warmup: int = 1
    block_budget_s: float = 15.0      # seconds of timed rounds per (problem, K)
    max_call_s: float = 4.0           # skip an implementation whose meta-step is predicted to take longer
    memory: str = "profiler"          # "profiler", "subprocess" or "off"
    discrepancy: bool = True
    discrepancy_tasks: int = 25
    accuracy: bool = True
    train_steps: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # K of the accuracy runs
    train_time_s: float | dict[str, float] = 6.0
    train_iterations: int | dict[str, int] = 100
    train_cap_factor: float = 2.0     # stop a run at cap_factor × the time budget even if short of iterations
    snapshots: int | dict[str, int] = 4  # evaluations along the time budget (accuracy against wall time)
    accuracy_baselines: tuple[str, ...] = ("plain loop",)
    truncate: int | None = None       # truncated mode's window; None: max(1, K // 2)
    segment: int | None = None        # checkpointed mode's segment; None: ⌈√K⌉
    proximal: float = 1.0
    solver_iterations: int = 20
    es_samples: int = 4
    es_sigma: float = 1e-3
    pes_truncation: int = 10
    threads: int = 1
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_settings(cls, **overrides: Any) -> "Settings":
        base: dict[str, Any] = dict(
            steps=QUICK_STEPS, steps_by_problem={"conv4": (1,)}, repeats=2, block_budget_s=2.0, max_call_s=1.0,
            discrepancy_tasks=5, train_steps={"sinusoid": (5,), "conv4": (1,)},
            train_time_s={"default": 1.0, "conv4": 1.5}, train_iterations=10, train_cap_factor=2.0, snapshots=2,
            quick=True)
        base.update(overrides)
        return cls(**base)

    def steps_for(self, problem: str) -> tuple[int, ...]:
        return tuple(self.steps_by_problem.get(problem, self.steps))

    def train_steps_for(self, problem: str) -> tuple[int, ...]:
        steps = self.steps_for(problem)
        default = tuple(k for k in (1, 5) if k in steps) or steps[:1]
        return tuple(self.train_steps.get(problem, default))

    @staticmethod
    def _per(value: Any, problem: str, fallback: float) -> Any:
        if isinstance(value, dict):
            return value.get(problem, value.get("default", fallback))
        return value

    def time_budget(self, problem: str) -> float:
        """Seconds of meta-steps per accuracy run for a problem kind ("sinusoid", "conv4", "custom")."""
        return float(self._per(self.train_time_s, problem, 6.0))

    def iteration_budget(self, problem: str) -> int:
        return int(self._per(self.train_iterations, problem, 100))

    def snapshot_count(self, problem: str) -> int:
        return max(1, int(self._per(self.snapshots, problem, 4)))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))


def implementations(settings: Settings) -> list[str]:
    """Implementation names: the modes, then ``"<baseline> SO"`` / ``"<baseline> FO"``."""
    names = list(settings.modes)
    for baseline in settings.baselines:
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose from {', '.join(BASELINES)}")
        names.append(f"{baseline} SO")
        if baseline != "torchopt":
            names.append(f"{baseline} FO")
    return names


def reference_for(name: str) -> str:
    """The plain loop a figure is divided by: first order against first order, all else second order."""
    return "plain loop FO" if name == "first_order" or name.endswith(" FO") else "plain loop SO"


# ---------------------------------------------------------------------------------------------
# the implementations: engine modes (MAML learner) and the baselines
# ---------------------------------------------------------------------------------------------


def truncate_window(steps: int, settings: Settings) -> int:
    return min(steps, settings.truncate) if settings.truncate else max(1, steps // 2)


def make_learner(problem: Problem, model: nn.Module, steps: int, mode: str, settings: Settings) -> Any:
    """``diffopt.algorithms.MAML`` in ``mode`` with the benchmark's per-mode settings."""
    from .algorithms import MAML

    options: dict[str, Any] = {"vectorize": problem.vectorize, "batchnorm": problem.batchnorm}
    lr: float | Tensor = problem.inner_lr
    if mode == "truncated":
        options["truncate"] = truncate_window(steps, settings)
    elif mode == "checkpointed":
        options["segment"] = settings.segment
    elif mode == "implicit":
        options.update(proximal=settings.proximal, solver_iterations=settings.solver_iterations)
    elif mode == "forward":
        lr = torch.tensor(problem.inner_lr, requires_grad=True)  # forward_wrt defaults to the tensor lr
    elif mode in ("es", "pes"):
        options.update(es_samples=settings.es_samples, es_sigma=settings.es_sigma,
                       generator=torch.Generator().manual_seed(settings.seed))
        if mode == "pes":
            options["pes_truncation"] = min(settings.pes_truncation, max(steps, 1))
    return MAML(model, problem.loss_fn, lr, steps, mode=mode, **options)


def _adapted_names(model: nn.Module) -> tuple[list[str], list[bool]]:
    named = list(model.named_parameters())
    return [n for n, _ in named], [p.requires_grad for _, p in named]


def plain_loop_step(model: nn.Module, loss_fn: Callable, lr: float, steps: int,
                    first_order: bool) -> Callable[[Batch], Tensor]:
    """Per task ``functional_call`` + ``autograd.grad`` K times; the mean query loss; one backward."""
    names, trainable = _adapted_names(model)
    theta = list(model.parameters())

    def step(batch: Batch) -> Tensor:
        sx, sy, qx, qy = batch
        total: Tensor | float = 0.0
        for t in range(sx.shape[0]):
            fast = list(theta)
            for _ in range(steps):
                out = torch.func.functional_call(model, dict(zip(names, fast)), (sx[t],))
                live = [p for p, r in zip(fast, trainable) if r]
                grads = iter(torch.autograd.grad(loss_fn(out, sy[t]), live, create_graph=not first_order))
                fast = [p - lr * next(grads) if r else p for p, r in zip(fast, trainable)]
            out = torch.func.functional_call(model, dict(zip(names, fast)), (qx[t],))
            total = total + loss_fn(out, qy[t])
        loss = total / sx.shape[0]
        loss.backward()
        return loss.detach()

    return step


def higher_step(model: nn.Module, loss_fn: Callable, lr: float, steps: int,
                first_order: bool) -> Callable[[Batch], Tensor]:
    """Per task ``higher.innerloop_ctx`` with ``torch.optim.SGD``, backward per task (higher's MAML
    example); first order detaches the gradients in ``grad_callback`` (higher has no switch)."""
    import higher

    inner = torch.optim.SGD(model.parameters(), lr=lr)
    callback = (lambda grads: [None if g is None else g.detach() for g in grads]) if first_order else None

    def step(batch: Batch) -> Tensor:
        sx, sy, qx, qy = batch
        tasks, total = sx.shape[0], 0.0
        for t in range(tasks):
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(fmodel(sx[t]), sy[t]), grad_callback=callback)
                loss = loss_fn(fmodel(qx[t]), qy[t]) / tasks
                loss.backward()
                total += float(loss.detach())
        return torch.tensor(total)

    return step


def func_vmap_step(model: nn.Module, loss_fn: Callable, lr: float, steps: int,
                   first_order: bool) -> Callable[[Batch], Tensor]:
    """``torch.func.vmap`` over tasks of K ``torch.func.grad`` steps (first order: gradients detached)."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def task_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(torch.func.functional_call(model, (p, buffers), (x,)), y)

    def adapt_and_query(p: dict[str, Tensor], x: Tensor, y: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        for _ in range(steps):
            g = torch.func.grad(task_loss)(p, x, y)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            p = {k: p[k] - lr * g[k] for k in p}
        return task_loss(p, xq, yq)

    batched = torch.func.vmap(adapt_and_query, in_dims=(None, 0, 0, 0, 0))

    def step(batch: Batch) -> Tensor:
        loss = batched(params, *batch).mean()
        loss.backward()
        return loss.detach()

    return step


def torchopt_step(model: nn.Module, loss_fn: Callable, lr: float, steps: int,
                  first_order: bool) -> Callable[[Batch], Tensor]:
    """torchopt's MAML recipe: ``MetaSGD`` steps per task, backward per task, state recovered."""
    import torchopt

    if first_order:
        raise NotImplementedError("torchopt's MetaSGD has no first-order switch")
    inner = torchopt.MetaSGD(model, lr=lr)
    net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
    optim_state = torchopt.extract_state_dict(inner)

    def step(batch: Batch) -> Tensor:
        sx, sy, qx, qy = batch
        tasks, total = sx.shape[0], 0.0
        for t in range(tasks):
            for _ in range(steps):
                inner.step(loss_fn(model(sx[t]), sy[t]))
            loss = loss_fn(model(qx[t]), qy[t]) / tasks
            loss.backward()
            total += float(loss.detach())
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(inner, optim_state)
        return torch.tensor(total)

    return step


BASELINE_BUILDERS = {"plain loop": plain_loop_step, "higher loop": higher_step, "torch.func vmap": func_vmap_step,
                     "torchopt": torchopt_step}


def baseline_available(baseline: str) -> str | None:
    """None when the baseline can run here, else why not."""
    module = {"higher loop": "higher", "torchopt": "torchopt"}.get(baseline)
    if module is None:
        return None
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None


class Implementation:
    """One implementation of the meta-step on its own copy of the model: ``step(batch)`` sets the
    meta-gradients; ``gradients()`` reads those of the model's parameters."""

    def __init__(self, name: str, problem: Problem, model: nn.Module, steps: int, settings: Settings) -> None:
        self.name, self.model = name, model
        self.learner = None
        if name in MODES:
            self.learner = make_learner(problem, model, steps, name, settings)
            learner = self.learner

            def step(batch: Batch) -> Tensor:
                loss = learner.meta_loss(*batch)
                loss.backward()
                return loss.detach()

            self.parameters = list(self.learner.parameters())
        else:
            baseline, order = name.rsplit(" ", 1)
            why = baseline_available(baseline)
            if why is not None:
                raise ModuleNotFoundError(why)
            step = BASELINE_BUILDERS[baseline](model, problem.loss_fn, problem.inner_lr, steps, order == "FO")
            self.parameters = list(model.parameters())
        self.theta = list(model.parameters())
        self.step = step

    def zero_grad(self) -> None:
        for p in self.parameters:
            p.grad = None

    def call(self, batch: Batch) -> Callable[[], None]:
        def meta_step() -> None:
            self.zero_grad()
            self.step(batch)

        return meta_step

    def gradients(self) -> list[Tensor] | None:
        grads = [p.grad for p in self.theta]
        if all(g is None for g in grads):
            return None
        return [torch.zeros_like(p) if g is None else g.detach().clone() for p, g in zip(self.theta, grads)]


def _compare(grads: list[Tensor] | None, reference: list[Tensor] | None) -> dict[str, float | None]:
    if grads is None or reference is None:
        return {"cosine": None, "relative_error": None}
    a = torch.cat([g.reshape(-1) for g in grads]).double()
    b = torch.cat([g.reshape(-1) for g in reference]).double()
    na, nb = float(a.norm()), float(b.norm())
    cosine = float(a @ b) / (na * nb) if na > 0 and nb > 0 else None
    return {"cosine": cosine, "relative_error": float((a - b).norm()) / nb if nb > 0 else None}


def _error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


# ---------------------------------------------------------------------------------------------
# time and memory for one (problem, K)
# ---------------------------------------------------------------------------------------------


def fixed_batch(problem: Problem, seed: int) -> Batch:
    return problem.source.train_batch(torch.Generator().manual_seed(seed + 1_000_003))


def measure(problem: Problem, steps: int, settings: Settings, predicted: Mapping[str, float] | None = None,
            worker: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Time, memory and meta-gradient agreement of every implementation at ``steps`` inner steps.

    ``predicted``: seconds per call expected from smaller K; implementations over
    ``settings.max_call_s`` are skipped (and say so) rather than run.
    """
    batch = fixed_batch(problem, settings.seed)
    base = problem.make_model()
    out: dict[str, Any] = {}
    fns: dict[str, Callable[[], None]] = {}
    impls: dict[str, Implementation] = {}
    for name in implementations(settings):
        guess = (predicted or {}).get(name)
        if guess is not None and guess > settings.max_call_s:
            out[name] = {"skipped": f"predicted {guess:.1f} s per meta-step > {settings.max_call_s:g} s (max_call_s)"}
            continue
        try:
            impl = Implementation(name, problem, copy.deepcopy(base), steps, settings)
            fn = impl.call(batch)
            started = time.perf_counter()
            fn()  # warm-up: lazy initialisation, caches, thread pools are not charged
            first = time.perf_counter() - started
        except ModuleNotFoundError as error:
            out[name] = {"skipped": str(error)}
            continue
        except Exception as error:  # noqa: BLE001 - recorded; the other implementations go on
            out[name] = {"error": _error(error)}
            continue
        out[name] = {"first_call_s": first}
        impls[name] = impl
        if first > 2 * settings.max_call_s:
            out[name]["note"] = f"one call only: the warm-up took {first:.1f} s > 2 × max_call_s"
            out[name]["time"] = common.summarize([first])
        else:
            fns[name] = fn
    # meta-gradient agreement with the plain loop (the warm-up calls left the gradients in place)
    grads = {name: impl.gradients() for name, impl in impls.items()}
    for name in impls:
        ref = grads.get("plain loop SO")
        out[name]["vs_exact"] = _compare(grads[name], ref)
        if name.endswith(" FO") or name == "first_order":
            out[name]["vs_first_order_loop"] = _compare(grads[name], grads.get("plain loop FO"))
    # memory
    if settings.memory == "profiler":
        for name, impl in impls.items():
            try:
                impl.zero_grad()  # the previous call's gradients are freed here, outside the measured call
                _, peak = common.peak_tensor_bytes(lambda impl=impl: impl.step(batch))
                out[name]["memory"] = {"tensor_peak_bytes": peak, "method": "profiler, in process"}
            except Exception as error:  # noqa: BLE001
                out[name]["memory"] = {"error": _error(error)}
    elif settings.memory == "subprocess":
        run_worker = worker or subprocess_worker
        for name in impls:
            reply = run_worker({"spec": problem.spec, "steps": steps, "implementation": name,
                                "settings": settings.to_dict()})
            out[name]["memory"] = {**reply, "method": "fresh process"}
    # time
    if fns:
        # interleave collects garbage before every call (outside the timer); the ~10^5 long-lived objects
        # of torch, its profiler and the implementations would make each collection take ~0.2 s, so they
        # are moved to the permanent generation for the block (gc.freeze) and given back afterwards.
        gc.collect()
        gc.freeze()
        try:
            samples = common.interleave(fns, repeats=settings.repeats, warmup=max(settings.warmup - 1, 0),
                                        seed=settings.seed, budget_s=settings.block_budget_s,
                                        min_repeats=min(3, settings.repeats))
        finally:
            gc.unfreeze()
        for name, values in samples.items():
            out[name]["time"] = common.summarize(values)
    for name, entry in out.items():
        ref = out.get(reference_for(name), {})
        for key, other in (("plain", reference_for(name)), ("higher", reference_for(name).replace("plain", "higher")),
                           ("torch.func", reference_for(name).replace("plain loop", "torch.func vmap"))):
            entry.setdefault("ratios", {})[key] = common.ratio(_median(entry), _median(out.get(other, {})))
        entry["memory_ratio"] = common.ratio(_peak(entry), _peak(ref))
        entry["memory_ratio_second_order"] = common.ratio(_peak(entry), _peak(out.get("second_order", {})))
    if impls and "second_order" in impls:
        out["second_order"]["vectorize_reason"] = impls["second_order"].learner.loop.vectorize_reason
    return out


def _median(entry: Mapping[str, Any]) -> float | None:
    t = entry.get("time")
    return None if not t or not t.get("n") else t["median"]


def _peak(entry: Mapping[str, Any]) -> float | None:
    return (entry.get("memory") or {}).get("tensor_peak_bytes")


def subprocess_worker(config: Mapping[str, Any], timeout: float = 900.0) -> dict[str, Any]:
    """Memory of one configuration in a fresh ``python -m diffopt.bench --worker`` process."""
    threads = config.get("settings", {}).get("threads", 1)
    return common.run_worker_command([sys.executable, "-m", "diffopt.bench"], config, timeout, threads)


def worker(config: Mapping[str, Any]) -> dict[str, Any]:
    """One configuration's memory: a warm-up meta-step, the peak RSS increase during one, then
    the profiler's tensor peak during another (the method of ``benchmarks/engine_memory.py``)."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    raw = {k: v for k, v in config["settings"].items() if k in fields}
    for key in ("steps", "modes", "baselines", "accuracy_baselines"):
        if key in raw:
            raw[key] = tuple(raw[key])
    settings = Settings(**raw)
    torch.set_num_threads(settings.threads)
    problem = build_problem(config["spec"])
    impl = Implementation(config["implementation"], problem, problem.make_model(), int(config["steps"]), settings)
    batch = fixed_batch(problem, settings.seed)
    impl.call(batch)()  # warm-up: library code pages, thread pools and caches are not charged
    impl.zero_grad()
    _, rss, method = common.peak_rss_increase(lambda: impl.step(batch))
    impl.zero_grad()
    _, peak = common.peak_tensor_bytes(lambda: impl.step(batch))
    return {"tensor_peak_bytes": peak, "rss_peak_bytes": rss, "rss_method": method}


# ---------------------------------------------------------------------------------------------
# first- versus second-order meta-gradient discrepancy
# ---------------------------------------------------------------------------------------------


def discrepancy(problem: Problem, model: nn.Module, steps: int, batch: Batch, tasks: int) -> dict[str, Any]:
    """``diffopt.diagnostics.metagradient_discrepancy`` at the model's weights: cosine and relative
    error between the first- and second-order meta-gradients per task (mean, 95% CI)."""
    from .diagnostics import metagradient_discrepancy

    sx, sy, qx, qy = (t[:tasks] for t in batch)
    group = metagradient_discrepancy(model, dict(model.named_parameters()), sx, sy, qx, qy, lr=problem.inner_lr,
                                     steps=steps, loss_fn=problem.loss_fn, bn_mode=problem.bn_mode, batched=True)
    out: dict[str, Any] = {"tasks": int(sx.shape[0])}
    for key, name in (("metagrad/cosine", "cosine"), ("metagrad/relative_error", "relative_error"),
                      ("metagrad/cosine_of_means", "cosine_of_means")):
        if key in group:
            d = group[key]
            out[name] = {"mean": float(d.value), "ci95": None if d.ci95 is None else [float(c) for c in d.ci95]}
    return out


# ---------------------------------------------------------------------------------------------
# accuracy after a budget of meta-training time and of meta-iterations
# ---------------------------------------------------------------------------------------------


class _OneAdaptation:
    """``evaluate_steps`` for :func:`diffopt.training.evaluate` that adapts once and reads the
    per-task loss and accuracy from the same predictions (the learner's own adapts twice for
    classification: once for the loss, once for the accuracy); it keeps the per-task values for
    paired comparisons between runs."""

    def __init__(self, learner: Any) -> None:
        self.learner = learner
        self.values: dict[str, list[Tensor]] = {}

    def evaluate_steps(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, steps: Sequence[int]) -> dict[str, Tensor]:
        from .algorithms._base import accuracy, is_classification

        loop = self.learner.loop
        rows: dict[str, list[Tensor]] = {}
        for k in steps:
            adapted = loop.adapt_without_graph(sx, sy, k)
            with torch.no_grad():
                out = loop.predict(adapted, qx)
                loss_fn = F.cross_entropy if is_classification(qy) else self.learner.loss_fn
                rows.setdefault("loss", []).append(torch.stack([loss_fn(o, y) for o, y in zip(out, qy)]))
                if is_classification(qy):
                    rows.setdefault("accuracy", []).append(accuracy(out, qy))
        result = {name: torch.stack(values) for name, values in rows.items()}
        for name, value in result.items():
            self.values.setdefault(name, []).append(value[-1].double())
        return result


def _evaluate(learner: Any, problem: Problem, steps: int, per_task: bool = False) -> Any:
    """Mean and 95% CI (``diffopt.training.evaluate``) of the meta-test loss (and accuracy) after
    ``steps`` test-time steps; with ``per_task`` also the per-task values."""
    from .training import evaluate

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
        from .training import iteration_generator

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
    import random

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
    from .tasks import mean_ci95

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


# ---------------------------------------------------------------------------------------------
# the whole run
# ---------------------------------------------------------------------------------------------


def _work(problems: Sequence[Problem], settings: Settings) -> int:
    total = 0
    for problem in problems:
        ks = settings.steps_for(problem.spec["kind"])
        total += len(ks) * (2 if settings.discrepancy else 1)
        if settings.accuracy:
            total += len(settings.train_steps_for(problem.spec["kind"])) * (
                len(settings.modes) + len(settings.accuracy_baselines) + 1)
    return total


def run(problems: Sequence[Problem], settings: Settings, progress: bool = True,
        stream: Any = None) -> dict[str, Any]:
    """Measure every problem; returns a JSON-able dictionary (see :func:`markdown`)."""
    from ._progress import Progress

    torch.set_num_threads(settings.threads)
    info = common.machine_info()
    bar = Progress(_work(problems, settings), "diffopt bench", enabled=progress, stream=stream)
    results: dict[str, Any] = {
        "benchmark": "modes", "machine": info, "settings": settings.to_dict(), "helpers": HELPERS,
        "memory_method": memory_method(settings), "implementations": implementations(settings), "problems": {},
    }
    started = time.perf_counter()
    for problem in problems:
        kind = problem.spec["kind"]
        entry: dict[str, Any] = {"description": problem.description, "spec": problem.spec, "metric": problem.metric,
                                 "timing": {}, "discrepancy": {}, "accuracy": {}}
        results["problems"][problem.name] = entry
        previous: dict[str, tuple[int, float]] = {}
        for steps in settings.steps_for(kind):
            bar.update(0, postfix=f"{problem.name} K={steps}: time and memory")
            predicted = {name: seconds * steps / k for name, (k, seconds) in previous.items()}
            block = measure(problem, steps, settings, predicted)
            for name, value in block.items():
                seconds = _median(value) or value.get("first_call_s")
                if seconds:
                    previous[name] = (steps, seconds)
            entry["timing"][str(steps)] = block
            bar.update(1, postfix=f"{problem.name} K={steps} timed")
            if settings.discrepancy:
                try:
                    entry["discrepancy"][str(steps)] = discrepancy(
                        problem, problem.make_model(), steps, fixed_batch(problem, settings.seed),
                        settings.discrepancy_tasks)
                except Exception as error:  # noqa: BLE001
                    entry["discrepancy"][str(steps)] = {"error": _error(error)}
                bar.update(1, postfix=f"{problem.name} K={steps} discrepancy")
        if settings.accuracy:
            entry["accuracy"] = accuracy(problem, settings, bar)
        entry["vectorize_reason"] = next((b["second_order"].get("vectorize_reason") for b in entry["timing"].values()
                                          if "second_order" in b and b["second_order"].get("vectorize_reason")), None)
    bar.close()
    info["load_average_end"] = common.load_average()
    results["seconds"] = time.perf_counter() - started
    results["targets"] = targets(results)
    return results


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


def memory_method(settings: Settings) -> str:
    if settings.memory == "off":
        return "not measured"
    where = ("in the timing process, after a warm-up meta-step" if settings.memory == "profiler" else
             "in a fresh Python process per configuration after a warm-up meta-step, with the peak RSS increase "
             "(malloc_trim, VmRSS before, peak mark reset through /proc/self/clear_refs, VmHWM after)")
    return ("Peak of CPU tensor memory during one meta-step above the memory in use when it started: "
            "torch.profiler.profile(profile_memory=True) allocation (+) and free (-) events summed in time order, "
            f"maximum (peak_tensor_bytes, {HELPERS}); measured {where}. Validated on a known 64 MiB allocation in "
            "tests/test_bench.py and tests/test_benchmarks.py.")


# ---------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------


def targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, checked on the sinusoid problem where it was measured."""
    out: list[dict[str, Any]] = []
    problem = results["problems"].get("sinusoid")
    if problem is None:
        return out
    timing = problem["timing"]

    def entry(k: int, name: str) -> Mapping[str, Any]:
        return timing.get(str(k), {}).get(name, {})

    for name, bound in (("second_order", 0.2), ("first_order", 0.25)):
        r = entry(5, name).get("ratios", {}).get("plain")
        out.append({"target": f"sinusoid {name} meta-step at K=5 ≤ {bound}x the plain loop ({reference_for(name)})",
                    "value": r, "display": common.fmt_ratio(r), "met": None if r is None else r <= bound})
    r = common.ratio(_peak(entry(100, "checkpointed")), _peak(entry(100, "second_order")))
    out.append({"target": "sinusoid checkpointed peak memory at K=100 ≤ 25% of second order's", "value": r,
                "display": common.fmt_ratio(r), "met": None if r is None else r <= 0.25})
    ks = sorted(int(k) for k in timing)
    for name in ("implicit", "forward"):
        peaks = {k: v for k in ks if (v := _peak(entry(k, name)))}
        r = common.ratio(peaks.get(100), peaks.get(10))
        display = common.fmt_ratio(r)
        if len(peaks) >= 2:
            display += (f" (max/min over K={min(peaks)}..{max(peaks)}: "
                        f"{max(peaks.values()) / min(peaks.values()):.2f}x)")
        out.append({"target": f"sinusoid {name} peak memory flat in K (K=100 / K=10 within 10%)", "value": r,
                    "display": display, "met": None if r is None else abs(r - 1) <= 0.10})
    return out


# ---------------------------------------------------------------------------------------------
# output: markdown, JSON, plots
# ---------------------------------------------------------------------------------------------


def _fmt_ms(summary: Mapping[str, Any] | None) -> str:
    if not summary or not summary.get("n"):
        return "n/a"
    median, iqr = summary["median"] * 1e3, summary["iqr"] * 1e3
    text = f"{median:.3g}" if median < 100 else f"{median:.0f}"
    return text + (f" ±{iqr / 2:.2g}" if summary["n"] > 1 else " (1 call)")


def _fmt_metric(metrics: Mapping[str, Any] | None, metric: str) -> str:
    if not metrics or metric not in metrics:
        return "n/a"
    m = metrics[metric]
    if metric == "accuracy":
        return f"{100 * m['mean']:.1f} ±{100 * m['ci95']:.1f}%"
    return f"{m['mean']:.3g} ±{m['ci95']:.2g}"


def _fmt_difference(d: Mapping[str, Any] | None, metric: str) -> str:
    if not d:
        return ""
    scale, unit = (100.0, " pt") if metric == "accuracy" else (1.0, "")
    mean = 0.0 if abs(d["mean"]) < 1e-6 else scale * d["mean"]  # float32 rounding of equal results
    return f"{mean:+.3g} ±{scale * d['ci95']:.2g}{unit}" + (" =" if d["matches"] else "")


def _cell_status(entry: Mapping[str, Any]) -> str | None:
    if "skipped" in entry:
        return "skipped"
    if "error" in entry:
        return "error"
    return None


def _ci(d: Mapping[str, Any] | None) -> str:
    if not d:
        return "n/a"
    ci = d.get("ci95")
    return f"{d['mean']:.3f}" + ("" if not ci else f" [{ci[0]:.3f}, {ci[1]:.3f}]")


def problem_markdown(name: str, entry: Mapping[str, Any], results: Mapping[str, Any]) -> str:
    table = common.markdown_table
    ks = sorted(entry["timing"], key=int)
    names = [n for n in results["implementations"] if any(n in entry["timing"][k] for k in ks)]
    parts = [f"## {name}: {entry['description']}"]
    if entry.get("vectorize_reason"):
        parts.append(f"Inner loop: {entry['vectorize_reason']}.")
    rows = []
    for n in names:
        row = [n]
        for k in ks:
            e = entry["timing"][k].get(n, {})
            status = _cell_status(e)
            row.append(status or f"{_fmt_ms(e.get('time'))} ({common.fmt_ratio(e.get('ratios', {}).get('plain'))})")
        rows.append(row)
    parts.append("Median ms per meta-step ±IQR/2 (ratio to the plain loop of the same order: first order to the "
                 "first-order loop, every other mode to the second-order loop):\n\n"
                 + table(["implementation"] + [f"K={k}" for k in ks], rows))
    notes: dict[str, list[str]] = {}
    for k in ks:
        for n in names:
            e = entry["timing"][k].get(n, {})
            why = e.get("skipped") or e.get("error") or e.get("note")
            if why:
                notes.setdefault(f"{n}: {why}" if "predicted" not in why else f"{n}: skipped above the time cap",
                                 []).append(k)
    if notes:
        parts.append("Skipped, failed or single-call cells:\n\n" + "\n".join(
            f"- {text} (K={', '.join(k)})" for text, k in notes.items()))
    rows = []
    for n in names:
        if n.startswith(("higher", "torch.func")):
            continue
        row = [n]
        for k in ks:
            r = entry["timing"][k].get(n, {}).get("ratios", {})
            row.append(f"{common.fmt_ratio(r.get('higher'))} / {common.fmt_ratio(r.get('torch.func'))}")
        rows.append(row)
    parts.append("Time ratio to the higher loop / to torch.func vmap (same order):\n\n"
                 + table(["implementation"] + [f"K={k}" for k in ks], rows))
    if results["settings"]["memory"] != "off":
        rows = []
        for n in names:
            row = [n]
            for k in ks:
                e = entry["timing"][k].get(n, {})
                peak = _peak(e)
                status = _cell_status(e)
                row.append(status or ("n/a" if peak is None else
                                      f"{peak / MiB:.3g} ({common.fmt_ratio(e.get('memory_ratio'))})"))
            rows.append(row)
        parts.append("Peak tensor memory per meta-step, MiB (ratio to the plain loop of the same order):\n\n"
                     + table(["implementation"] + [f"K={k}" for k in ks], rows))
    rows = []
    for n in names:
        row = [n]
        for k in ks:
            e = entry["timing"][k].get(n, {})
            v = e.get("vs_exact", {})
            row.append(_cell_status(e) or ("n/a" if v.get("cosine") is None else
                                           f"{v['cosine']:.3f} / {v['relative_error']:.2g}"))
        rows.append(row)
    parts.append("Meta-gradient of θ against the plain loop's second-order one on the same meta-batch, "
                 "cosine / relative error (float32; n/a: no gradient for θ, e.g. forward mode w.r.t. the "
                 "learning rate only):\n\n" + table(["implementation"] + [f"K={k}" for k in ks], rows))
    if entry.get("discrepancy"):
        rows = []
        for k in sorted(entry["discrepancy"], key=int):
            d = entry["discrepancy"][k]
            if "error" in d:
                rows.append([k, d["error"], "", "", ""])
                continue
            rows.append([k, _ci(d.get("cosine")), _ci(d.get("relative_error")),
                         "n/a" if "cosine_of_means" not in d else f"{d['cosine_of_means']['mean']:.3f}", d["tasks"]])
        parts.append("First- vs second-order meta-gradient discrepancy at the initial weights "
                     "(diffopt.diagnostics.metagradient_discrepancy; per-task mean [95% CI]):\n\n"
                     + table(["K", "cosine", "relative error", "cosine of task means", "tasks"], rows))
    for k, block in entry.get("accuracy", {}).items():
        metric = entry["metric"]
        rows = []
        for n, r in block["runs"].items():
            t, it = r.get("at_time_budget"), r.get("at_iteration_budget")
            paired = r.get("vs_second_order", {})
            rows.append([
                n, f"{r['seconds_per_iteration'] * 1e3:.3g}" if r.get("seconds_per_iteration") else "n/a",
                _fmt_metric(t["metrics"] if t else None, metric), t["iteration"] if t else "n/a",
                _fmt_difference(paired.get("at_time_budget"), metric),
                _fmt_metric(it["metrics"] if it else None, metric), f"{it['seconds']:.3g}" if it else "n/a",
                _fmt_difference(paired.get("at_iteration_budget"), metric),
                r.get("failure") or r.get("iteration_budget_missed") or "",
            ])
        unit = "accuracy" if metric == "accuracy" else "MSE"
        time_budget, iterations = f"{block['time_budget_s']:g} s", block["iteration_budget"]
        parts.append(
            f"Meta-test {unit} (mean ±95% CI over the test tasks, {k} test-time steps) after meta-training with "
            f"K={k}, all runs interleaved one meta-iteration at a time: at the time budget ({time_budget} of "
            f"meta-steps) and at the iteration budget ({iterations} meta-iterations); Δ: minus second order's "
            f"{unit} on the same test tasks (paired, mean ±95% CI; '=' where the interval contains 0). "
            f"Before training: "
            f"{_fmt_metric(block['initial'], metric)}.\n\n"
            + table(["implementation", "ms per iteration", f"{unit} at {time_budget}", "iterations done",
                     f"Δ at {time_budget}", f"{unit} at {iterations} iterations", "seconds to that",
                     f"Δ at {iterations} it.", "note"], rows))
        after = block.get("discrepancy_after_second_order_training")
        if after and "error" not in after:
            parts.append(f"Discrepancy at the weights second-order training reached (K={k}): cosine "
                         f"{_ci(after.get('cosine'))}, relative error {_ci(after.get('relative_error'))}.")
    return "\n\n".join(parts)


def markdown(results: Mapping[str, Any]) -> str:
    """The results as markdown: per problem time, ratios, memory, agreement, discrepancy, accuracy; targets."""
    info = results["machine"]
    s = results["settings"]
    parts = [f"# diffopt bench: modes against baselines\n\nMachine: {common.describe_machine(info)}.",
             f"Settings: threads {s['threads']}, repeats ≤ {s['repeats']} interleaved rounds per K "
             f"(≤ {s['block_budget_s']:g} s per K), skipped when a meta-step is predicted over "
             f"{s['max_call_s']:g} s; "
             f"truncated window {'max(1, K//2)' if not s['truncate'] else s['truncate']}, checkpoint segment "
             f"{'⌈√K⌉' if not s['segment'] else s['segment']}, implicit proximal λ={s['proximal']} with "
             f"{s['solver_iterations']} CG iterations, forward mode w.r.t. the (tensor) inner learning rate only, "
             f"es/pes {s['es_samples']} antithetic pairs σ={s['es_sigma']:g}, pes truncation "
             f"min({s['pes_truncation']}, K).",
             f"Memory: {results['memory_method']}"]
    for name, entry in results["problems"].items():
        parts.append(problem_markdown(name, entry, results))
    if results.get("targets"):
        rows = [[t["target"], t["display"], {True: "met", False: "missed", None: "n/a"}[t["met"]]]
                for t in results["targets"]]
        parts.append("## Targets\n\n" + common.markdown_table(["target", "measured", ""], rows))
    return "\n\n".join(parts) + "\n"


def write_json(path: str | os.PathLike[str], results: Mapping[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=_json_default, allow_nan=True) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.split(" ")[0]).strip("_") or "problem"


MATPLOTLIB_MISSING = "matplotlib is not installed: plots skipped (pip install matplotlib, or diffopt[plot])"


def plot(results: Mapping[str, Any], directory: str | os.PathLike[str], prefix: str = "modes") -> list[str]:
    """PNG plots per problem: time and memory against K, and the metric against training wall time.

    Returns the files written; without matplotlib returns ``[]`` after printing
    :data:`MATPLOTLIB_MISSING` to stderr.
    """
    try:
        import matplotlib.ticker
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state is touched
    except ImportError:
        print(MATPLOTLIB_MISSING, file=sys.stderr)
        return []
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    colours = {name: f"C{i}" for i, name in enumerate(MODES)}
    styles = {"plain loop": ("black", "--"), "higher loop": ("grey", "-."), "torch.func vmap": ("tab:brown", ":"),
              "torchopt": ("tab:olive", "--")}
    for name, entry in results["problems"].items():
        ks = sorted(entry["timing"], key=int)
        fig = Figure(figsize=(12, 4.5))
        axes = fig.subplots(1, 2)
        for impl in results["implementations"]:
            xs, ts, ms = [], [], []
            for k in ks:
                e = entry["timing"][k].get(impl, {})
                if _median(e) is not None:
                    xs.append(int(k))
                    ts.append(_median(e) * 1e3)
                    ms.append((_peak(e) or float("nan")) / MiB)
            if not xs:
                continue
            if impl in MODES:
                style = {"color": colours[impl], "linestyle": "-", "marker": "o"}
            else:
                base, order = impl.rsplit(" ", 1)
                colour, line = styles.get(base, ("black", "--"))
                style = {"color": colour, "linestyle": line, "marker": "s" if order == "SO" else "^",
                         "alpha": 1.0 if order == "SO" else 0.6}
            axes[0].plot(xs, ts, label=impl, **style)
            if any(m == m for m in ms):
                axes[1].plot(xs, ms, label=impl, **style)
        if not axes[1].lines:
            axes[1].text(0.5, 0.5, "memory not measured", ha="center", va="center", transform=axes[1].transAxes)
        for ax, label in zip(axes, ("ms per meta-step (median)", "peak tensor memory, MiB")):
            if not ax.lines:
                continue
            ax.set_xscale("log")
            ax.set_xticks([int(k) for k in ks])
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_yscale("log")
            ax.set_xlabel("inner steps K")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        (axes[1] if axes[1].lines else axes[0]).legend(fontsize=7, ncol=2)
        fig.suptitle(f"{name}: time and memory per meta-step against K", fontsize=10)
        fig.tight_layout()
        path = directory / f"{prefix}_time_memory_{_slug(name)}.png"
        fig.savefig(path, dpi=110)
        written.append(str(path))
        if entry.get("accuracy"):
            blocks = entry["accuracy"]
            fig = Figure(figsize=(6 * len(blocks), 4.5))
            axes = fig.subplots(1, len(blocks), squeeze=False)
            metric = entry["metric"]
            for ax, (k, block) in zip(axes[0], blocks.items()):
                initial = block["initial"].get(metric, {}).get("mean")
                for impl, r in block["runs"].items():
                    pts = [p for p in r["points"] if p["kind"] == "time" and metric in p["metrics"]]
                    xs = [0.0] + [p["seconds"] for p in pts]
                    ys = [initial] + [p["metrics"][metric]["mean"] for p in pts]
                    es = [0.0] + [p["metrics"][metric]["ci95"] for p in pts]
                    if impl in MODES:
                        style = {"color": colours[impl], "linestyle": "-", "marker": "o"}
                    else:
                        colour, line = styles.get(impl, ("black", "--"))
                        style = {"color": colour, "linestyle": line, "marker": "s"}
                    ax.errorbar(xs, ys, yerr=es, label=impl, capsize=2, **style)
                ax.set_xlabel("meta-training wall time, s (meta-steps only)")
                ax.set_ylabel("meta-test accuracy" if metric == "accuracy" else "meta-test MSE")
                if metric != "accuracy":
                    ax.set_yscale("log")
                ax.set_title(f"K={k} (±95% CI over test tasks)", fontsize=9)
                ax.grid(True, alpha=0.3)
            axes[0][-1].legend(fontsize=7)
            fig.suptitle(f"{name}: meta-test {metric} against meta-training time", fontsize=10)
            fig.tight_layout()
            path = directory / f"{prefix}_accuracy_{_slug(name)}.png"
            fig.savefig(path, dpi=110)
            written.append(str(path))
    return written


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffopt.bench --worker JSON``: one configuration's memory in a fresh process;
    anything else is ``diffopt bench``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        reply = worker(json.loads(argv[1]))
        sys.stdout.write(json.dumps(reply) + "\n")
        return 0
    from .bench_cli import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(_main())
