"""Benchmark problems: MAML's sinusoid MLP, the Conv-4 network on synthetic glyphs, or a user's
model (``module:factory``) on sinusoid, regression or classification tasks."""
from __future__ import annotations

import dataclasses
import importlib
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import recipes
from ..recipes import EpisodeSource
from ..tasks import synthetic_glyphs, synthetic_vectors
from .baselines import Batch

PROBLEMS = ("sinusoid", "conv4")
TASKS = ("sinusoid", "regression", "classification")


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
