"""Ready-made models, task sources and learners: the protocols of the papers in one place.

Used by ``diffopt train``, ``diffopt demo`` and the reproduction scripts in
``benchmarks/``; every piece is also usable on its own.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import algorithms
from .algorithms import MetaLearner
from .tasks import FewShotDataset, SinusoidTasks

Batch = tuple[Tensor, Tensor, Tensor, Tensor]

ALGORITHMS = ("maml", "fomaml", "imaml", "metasgd", "mamlpp", "anil", "reptile", "protonet", "matching", "siamese")
GRADIENT_BASED = ALGORITHMS[:7]
MODE_ALGORITHMS = ("maml", "metasgd", "anil")  # the learners whose engine mode is a choice (make_learner's mode)
INNER_LR_ALGORITHMS = ("maml", "fomaml", "imaml", "mamlpp", "anil", "reptile")  # a shared inner rate (not Meta-SGD's)


# -- models ------------------------------------------------------------------------------
def sinusoid_mlp(hidden: int = 40) -> nn.Module:
    """MAML's sinusoid regressor: 1-40-40-1 with ReLU."""
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def conv_block(in_channels: int, out_channels: int, pooling: bool) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, stride=1 if pooling else 2)
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(out_channels, track_running_stats=False), nn.ReLU()]
    if pooling:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def conv4_encoder(channels: int = 1, hidden: int = 64, pooling: bool = True) -> nn.Sequential:
    """The 4 × [3×3 conv, BatchNorm, ReLU, 2×2 max-pool] backbone (``pooling=False``: MAML's
    stride-2 convolutions); a 28×28 input gives a ``hidden``-dimensional embedding."""
    blocks = [conv_block(channels if i == 0 else hidden, hidden, pooling) for i in range(4)]
    return nn.Sequential(*blocks, nn.Flatten())


def conv4(ways: int, channels: int = 1, hidden: int = 64, pooling: bool = True) -> nn.Sequential:
    """Conv-4 with a linear ``ways``-way head (28×28 inputs)."""
    return nn.Sequential(conv4_encoder(channels, hidden, pooling), nn.Linear(hidden, ways))


def mlp_classifier(in_features: int, ways: int, hidden: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, ways))


# -- task sources -------------------------------------------------------------------------
class SinusoidSource:
    """MAML's sinusoid protocol: meta-batches of ``meta_batch`` tasks with ``shots`` + ``query``
    points; a fixed test set of ``test_tasks`` tasks with ``test_shots`` support points."""

    def __init__(self, meta_batch: int = 25, shots: int = 10, query: int | None = None, test_tasks: int = 600,
                 test_shots: int = 5, test_query: int = 100, dtype: torch.dtype = torch.float32) -> None:
        self.meta_batch, self.shots, self.query = meta_batch, shots, shots if query is None else query
        self.test_tasks, self.test_shots, self.test_query = test_tasks, test_shots, test_query
        self.sampler = SinusoidTasks(seed=0, dtype=dtype)
        self._test: SinusoidTasks | None = None

    def train_batch(self, generator: torch.Generator) -> Batch:
        b = self.sampler.sample(self.meta_batch, self.shots, self.query, generator=generator)
        return b.support_x, b.support_y, b.query_x, b.query_y

    def test_batches(self, chunk: int = 200) -> Iterator[Batch]:
        b = self.sampler.test_set(self.test_tasks, self.test_shots, self.test_query)
        for start in range(0, self.test_tasks, chunk):
            part = b[start:start + chunk]
            yield part.support_x, part.support_y, part.query_x, part.query_y

    def config(self) -> dict[str, Any]:
        return {"task": "sinusoid", "meta_batch": self.meta_batch, "shots": self.shots, "query": self.query,
                "test_tasks": self.test_tasks, "test_shots": self.test_shots}


class EpisodeSource:
    """N-way K-shot episodes from class-disjoint training and test data sets."""

    def __init__(self, train: FewShotDataset, test: FewShotDataset, *, meta_batch: int, ways: int, shots: int,
                 query: int, test_tasks: int = 600, test_seed: int = 12345, name: str = "episodes") -> None:
        train._check_request(ways, shots, query)
        test._check_request(ways, shots, query)
        self.train, self.test = train, test
        self.meta_batch, self.ways, self.shots, self.query = meta_batch, ways, shots, query
        self.test_tasks, self.test_seed, self.name = test_tasks, test_seed, name

    def train_batch(self, generator: torch.Generator) -> Batch:
        e = self.train.sample(self.meta_batch, self.ways, self.shots, self.query, generator=generator)
        return e.support_x, e.support_y, e.query_x, e.query_y

    def test_batches(self, chunk: int = 50) -> Iterable[Batch]:
        generator = torch.Generator().manual_seed(self.test_seed)
        remaining = self.test_tasks
        while remaining > 0:
            n = min(chunk, remaining)
            e = self.test.sample(n, self.ways, self.shots, self.query, generator=generator)
            yield e.support_x, e.support_y, e.query_x, e.query_y
            remaining -= n

    def config(self) -> dict[str, Any]:
        return {"task": self.name, "meta_batch": self.meta_batch, "ways": self.ways, "shots": self.shots,
                "query": self.query, "test_tasks": self.test_tasks}


# -- learners -----------------------------------------------------------------------------
def make_learner(algorithm: str, model: nn.Module, *, classification: bool, ways: int | None = None,
                 inner_lr: float = 0.01, inner_steps: int = 1, mode: str | None = None,
                 embedding_dim: int | None = None, **options: Any) -> MetaLearner:
    """A learner by name (see ``ALGORITHMS``). For metric learners ``model`` is the encoder;
    for ANIL it is split into body (all but the last module) and head (the last module)."""
    loss = F.cross_entropy if classification else F.mse_loss
    name = algorithm.lower()
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if name in ("protonet", "matching", "siamese") and not classification:
        raise ValueError(f"{algorithm} is a classification method; use a classification task")
    if mode is not None and name not in MODE_ALGORITHMS:
        fixed = {"fomaml": "first_order", "imaml": "implicit", "mamlpp": "second order with first-order annealing",
                 "reptile": "no meta-gradient"}.get(name, "no inner loop")
        raise ValueError(f"--mode does not apply to {algorithm} (its mode is fixed: {fixed}); use --algo maml "
                         f"--mode {mode} for MAML in that mode")
    mode_kw = {} if mode is None else {"mode": mode}
    if name == "maml":
        return algorithms.MAML(model, loss, inner_lr, inner_steps, **mode_kw, **options)
    if name == "fomaml":
        return algorithms.FOMAML(model, loss, inner_lr, inner_steps, **options)
    if name == "imaml":
        return algorithms.iMAML(model, loss, inner_lr, inner_steps, **options)
    if name == "metasgd":
        return algorithms.MetaSGD(model, loss, inner_steps, **mode_kw, **options)
    if name == "mamlpp":
        return algorithms.MAMLPlusPlus(model, loss, inner_lr, inner_steps, **options)
    if name == "anil":
        if not isinstance(model, nn.Sequential) or len(model) < 2:
            raise ValueError("ANIL needs an nn.Sequential whose last module is the head")
        return algorithms.ANIL(model[:-1], model[-1], loss, inner_lr, inner_steps, **mode_kw, **options)
    if name == "reptile":
        return algorithms.Reptile(model, loss, inner_lr=inner_lr, inner_steps=inner_steps, **options)
    if name == "protonet":
        return algorithms.PrototypicalNetwork(model)
    if name == "matching":
        return algorithms.MatchingNetwork(model, **options)
    if embedding_dim is None:
        raise ValueError("siamese needs embedding_dim, the encoder's output size")
    return algorithms.SiameseNetwork(model, embedding_dim)
