"""Task families to meta-train and evaluate learned optimizers on.

A *task* is an optimisation problem: a model architecture with a fresh random
initialisation, training data (the objective the optimizer minimises, full
batch) and held-out data of the same task. A family samples task-batches
with a leading task dimension, so the inner loop runs vectorised:

* :class:`QuadraticFamily` — ``f(θ) = mean((Wθ − y)²)`` with Gaussian ``W``, ``y``
  and ``θ₀`` (Andrychowicz et al., 2016);
* :class:`SinusoidFamily` — a small MLP regressing ``A·sin(x − b)`` from scratch
  (MAML's sinusoid distribution, :class:`diffopt.tasks.SinusoidTasks`);
* :class:`FewShotFamily` — an MLP classifier trained from scratch on an N-way
  K-shot episode of :func:`diffopt.tasks.synthetic_vectors` (class-disjoint
  train / test classes).

``sample(n, generator, split)`` draws ``n`` tasks; ``split="test"`` draws
held-out tasks (other seeds, or other classes).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tasks import SinusoidTasks, synthetic_vectors

__all__ = ["FAMILIES", "FewShotFamily", "QuadraticFamily", "SinusoidFamily", "TaskBatch", "TaskFamily", "family"]


@dataclass
class TaskBatch:
    """``init``: per-task initial parameters ``(T, *shape)`` in ``model.parameters()`` order;
    ``x, y``: the training data (the objective); ``eval_x, eval_y``: held-out data of each task."""

    init: list[Tensor]
    x: Tensor
    y: Tensor
    eval_x: Tensor
    eval_y: Tensor

    @property
    def num_tasks(self) -> int:
        return self.x.shape[0]


def linear_init(model: nn.Module, tasks: int, generator: torch.Generator, dtype: torch.dtype) -> list[Tensor]:
    """``nn.Linear``'s default initialisation (``U[±1/√fan_in]``), drawn per task from ``generator``."""
    bounds: dict[int, float] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for p in module.parameters(recurse=False):
                bounds[id(p)] = 1.0 / math.sqrt(module.in_features)
    out = []
    for p in model.parameters():
        bound = bounds.get(id(p), 1.0 / math.sqrt(max(1, math.prod(p.shape[1:]))))
        u = torch.rand((tasks, *p.shape), generator=generator, dtype=torch.float64)
        out.append(((2 * u - 1) * bound).to(dtype))
    return out


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[k], sizes[k + 1]))
        if k < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class TaskFamily:
    name = "family"
    loss_fn: Callable[[Tensor, Tensor], Tensor] = staticmethod(F.mse_loss)

    def model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator, split: str = "train",
               dtype: torch.dtype = torch.float32) -> TaskBatch:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"name": self.name}

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")


class _Vector(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.theta


def _split_generator(generator: torch.Generator, split: str) -> torch.Generator:
    """Test tasks come from a stream disjoint from the training stream (a derived seed)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator().manual_seed(seed ^ (0x5EED_7E57 if split == "test" else 0))


class QuadraticFamily(TaskFamily):
    """``f(θ) = mean((Wθ − y)²)``, ``W ∈ R^{rows×dim}``, ``y``, ``θ₀`` standard normal."""

    name = "quadratic"

    def __init__(self, dim: int = 10, rows: int = 10) -> None:
        self.dim, self.rows = int(dim), int(rows)

    def model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return _Vector(self.dim).to(dtype)

    def sample(self, n: int, generator: torch.Generator, split: str = "train",
               dtype: torch.dtype = torch.float32) -> TaskBatch:
        self._check_split(split)
        gen = _split_generator(generator, split)
        w = torch.randn((n, self.rows, self.dim), generator=gen, dtype=torch.float64).to(dtype)
        y = torch.randn((n, self.rows, 1), generator=gen, dtype=torch.float64).to(dtype)
        theta = torch.randn((n, self.dim, 1), generator=gen, dtype=torch.float64).to(dtype)
        return TaskBatch([theta], w, y, w, y)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "rows": self.rows}


class SinusoidFamily(TaskFamily):
    """A ReLU MLP ``1 → hidden → 1`` fitting ``A·sin(x − b)`` on ``points`` points from scratch."""

    name = "sinusoid"

    def __init__(self, hidden: Sequence[int] = (20, 20), points: int = 20, eval_points: int = 20,
                 amplitude_range: tuple[float, float] = (0.1, 5.0)) -> None:
        self.hidden, self.points, self.eval_points = tuple(int(h) for h in hidden), int(points), int(eval_points)
        self.amplitude_range = (float(amplitude_range[0]), float(amplitude_range[1]))

    def model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return mlp((1, *self.hidden, 1)).to(dtype)

    def sample(self, n: int, generator: torch.Generator, split: str = "train",
               dtype: torch.dtype = torch.float32) -> TaskBatch:
        self._check_split(split)
        gen = _split_generator(generator, split)
        sampler = SinusoidTasks(dtype=dtype, amplitude_range=self.amplitude_range)
        batch = sampler.sample(n, self.points, self.eval_points, generator=gen)
        init = linear_init(self.model(dtype), n, gen, dtype)
        return TaskBatch(init, batch.support_x, batch.support_y, batch.query_x, batch.query_y)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "hidden": list(self.hidden), "points": self.points,
                "eval_points": self.eval_points, "amplitude_range": list(self.amplitude_range)}


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels)


class FewShotFamily(TaskFamily):
    """An MLP ``dim → hidden → ways`` trained from scratch on an N-way K-shot episode of
    :func:`diffopt.tasks.synthetic_vectors` (train and test tasks use disjoint classes)."""

    name = "synthetic"
    loss_fn = staticmethod(_cross_entropy)

    def __init__(self, ways: int = 5, shots: int = 5, query: int = 5, hidden: Sequence[int] = (32,),
                 dim: int = 32, seed: int = 0, informative_dim: int = 8, within: float = 0.5,
                 nuisance: float = 1.2) -> None:
        self.ways, self.shots, self.query = int(ways), int(shots), int(query)
        self.hidden, self.dim, self.seed = tuple(int(h) for h in hidden), int(dim), int(seed)
        self.informative_dim, self.within, self.nuisance = int(informative_dim), float(within), float(nuisance)
        data = synthetic_vectors(200, shots + query + 5, dim=dim, informative_dim=min(informative_dim, dim),
                                 within=within, nuisance=nuisance, seed=seed)
        self._train, self._test = data.split((150, None), seed=seed)

    def model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return mlp((self.dim, *self.hidden, self.ways)).to(dtype)

    def sample(self, n: int, generator: torch.Generator, split: str = "train",
               dtype: torch.dtype = torch.float32) -> TaskBatch:
        self._check_split(split)
        gen = _split_generator(generator, split)
        data = self._train if split == "train" else self._test
        episode = data.sample(n, self.ways, self.shots, self.query, generator=gen, shuffle=True)
        init = linear_init(self.model(dtype), n, gen, dtype)
        return TaskBatch(init, episode.support_x.to(dtype), episode.support_y, episode.query_x.to(dtype),
                         episode.query_y)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "ways": self.ways, "shots": self.shots, "query": self.query,
                "hidden": list(self.hidden), "dim": self.dim, "seed": self.seed,
                "informative_dim": self.informative_dim, "within": self.within, "nuisance": self.nuisance}


FAMILIES: dict[str, type[TaskFamily]] = {"quadratic": QuadraticFamily, "sinusoid": SinusoidFamily,
                                         "synthetic": FewShotFamily}


def family(name: str, **options: Any) -> TaskFamily:
    """A family by name (``quadratic``, ``sinusoid``, ``synthetic``)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown task family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name](**options)
