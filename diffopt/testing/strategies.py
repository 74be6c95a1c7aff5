"""Hypothesis strategies for gradient-correctness tests, usable in your own test suite.

Requires ``hypothesis`` (``pip install 'diffopt[test]'``)::

    from hypothesis import given, settings
    from diffopt.testing import strategies as ds

    @settings(max_examples=20, deadline=None)
    @given(ds.optimizers(), ds.task_batches())
    def test_my_loop(optimizer, data):
        name, make = optimizer
        ...

Every strategy builds float64 objects with explicit generators (no global RNG),
and keeps hyperparameters where finite differences are well conditioned.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from .. import optim

F64 = torch.float64


def floats(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def log_floats(low: float, high: float) -> st.SearchStrategy[float]:
    """Floats spread evenly in log scale over [low, high]."""
    return floats(math.log(low), math.log(high)).map(lambda v: min(max(math.exp(v), low), high))


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)


# -- optimizer configurations ----------------------------------------------------------------
@st.composite
def _betas(draw: st.DrawFn) -> tuple[float, float]:
    return draw(floats(0.0, 0.95)), draw(floats(0.5, 0.999))


CONFIGS: dict[str, Callable[[], st.SearchStrategy[dict[str, Any]]]] = {
    "SGD": lambda: st.fixed_dictionaries({
        "lr": log_floats(1e-3, 0.2), "momentum": st.sampled_from([0.0, 0.5, 0.9]),
        "weight_decay": st.sampled_from([0.0, 0.01]), "maximize": st.booleans(),
    }).map(lambda c: {**c, "nesterov": c["momentum"] > 0 and c["lr"] < 0.1}),
    "Adam": lambda: st.fixed_dictionaries({
        "lr": log_floats(1e-3, 0.1), "betas": _betas(), "eps": log_floats(1e-8, 1e-4),
        "weight_decay": st.sampled_from([0.0, 0.01]), "amsgrad": st.booleans(), "maximize": st.booleans(),
        "decoupled_weight_decay": st.booleans(),
    }),
    "AdamW": lambda: st.fixed_dictionaries({
        "lr": log_floats(1e-3, 0.1), "betas": _betas(), "weight_decay": st.sampled_from([0.0, 0.01, 0.1]),
        "amsgrad": st.booleans(),
    }),
    "Adagrad": lambda: st.fixed_dictionaries({
        "lr": log_floats(1e-3, 0.1), "lr_decay": st.sampled_from([0.0, 0.01]),
        "initial_accumulator_value": st.sampled_from([0.0, 0.1]), "weight_decay": st.sampled_from([0.0, 0.01]),
    }),
    "Adadelta": lambda: st.fixed_dictionaries({
        "lr": log_floats(0.1, 1.0), "rho": floats(0.5, 0.95), "weight_decay": st.sampled_from([0.0, 0.01]),
    }),
    "Adamax": lambda: st.fixed_dictionaries({"lr": log_floats(1e-3, 0.05), "betas": _betas()}),
    "NAdam": lambda: st.fixed_dictionaries({
        "lr": log_floats(1e-3, 0.05), "betas": _betas(), "momentum_decay": st.sampled_from([4e-3, 1e-2]),
        "decoupled_weight_decay": st.booleans(), "weight_decay": st.sampled_from([0.0, 0.01]),
    }),
    "RAdam": lambda: st.fixed_dictionaries({
        "lr": log_floats(1e-3, 0.05), "betas": _betas(), "decoupled_weight_decay": st.booleans(),
        "weight_decay": st.sampled_from([0.0, 0.01]),
    }),
    "RMSprop": lambda: st.fixed_dictionaries({
        "lr": log_floats(1e-3, 0.02), "alpha": floats(0.8, 0.99), "momentum": st.sampled_from([0.0, 0.5]),
        "centered": st.booleans(), "weight_decay": st.sampled_from([0.0, 0.01]),
    }),
    "Rprop": lambda: st.fixed_dictionaries({
        "lr": log_floats(1e-3, 0.05), "etas": st.tuples(floats(0.3, 0.7), floats(1.1, 1.5)),
    }),
    "ASGD": lambda: st.fixed_dictionaries({
        "lr": log_floats(1e-3, 0.05), "lambd": st.sampled_from([1e-4, 1e-2]), "alpha": floats(0.5, 1.0),
        "t0": st.sampled_from([2.0, 1e6]), "weight_decay": st.sampled_from([0.0, 0.01]),
    }),
}


def optimizer_configs(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments valid for both ``torch.optim.<name>`` and ``diffopt.optim.<name>``."""
    if name not in CONFIGS:
        raise ValueError(f"no strategy for optimizer {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name]()


@st.composite
def optimizers(draw: st.DrawFn, names: tuple[str, ...] = tuple(CONFIGS)) -> tuple[str, dict[str, Any]]:
    """``(name, kwargs)`` for a built-in optimizer and a configuration of it."""
    name = draw(st.sampled_from(names))
    return name, draw(optimizer_configs(name))


# -- hyperparameter tensors --------------------------------------------------------------------
@st.composite
def hyperparameter_tensors(draw: st.DrawFn, shape: tuple[int, ...], low: float = 1e-3, high: float = 0.1,
                           form: str | None = None) -> Tensor | optim.Schedule:
    """A learnable float64 hyperparameter for a parameter of ``shape``: a scalar, a
    per-element tensor, or a per-step :class:`~diffopt.optim.Schedule` of 8 steps."""
    form = form or draw(st.sampled_from(["scalar", "per_element", "schedule"]))
    seed = draw(seeds())
    generator = torch.Generator().manual_seed(seed)
    if form == "scalar":
        value = torch.tensor(draw(log_floats(low, high)), dtype=F64)
    elif form == "per_element":
        value = low + (high - low) * torch.rand(shape, generator=generator, dtype=F64)
    elif form == "schedule":
        return optim.Schedule((low + (high - low) * torch.rand(8, generator=generator, dtype=F64)).requires_grad_())
    else:
        raise ValueError(f"form={form!r}: choose 'scalar', 'per_element' or 'schedule'")
    return value.requires_grad_()


# -- models -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Layers draw their initial weights from the global RNG: seed it for the block, then put the
    caller's stream back (a strategy must not change it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@st.composite
def mlps(draw: st.DrawFn, in_features: int = 1, out_features: int = 1) -> nn.Module:
    """Small smooth MLPs (tanh or softplus), float64, seeded."""
    hidden = draw(st.lists(st.integers(2, 8), min_size=1, max_size=2))
    activation = draw(st.sampled_from([nn.Tanh, nn.Softplus]))
    with _seeded(draw(seeds())):
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), activation()]
            width = h
        layers.append(nn.Linear(width, out_features))
        return nn.Sequential(*layers).double()


@st.composite
def conv_nets(draw: st.DrawFn, channels: int = 1, size: int = 6, classes: int = 3, batchnorm: bool | None = None) -> nn.Module:
    """Tiny convolutional classifiers for ``channels``×``size``×``size`` inputs, with or without BatchNorm."""
    use_bn = draw(st.booleans()) if batchnorm is None else batchnorm
    filters = draw(st.integers(2, 4))
    with _seeded(draw(seeds())):
        layers: list[nn.Module] = [nn.Conv2d(channels, filters, 3, padding=1)]
        if use_bn:
            layers.append(nn.BatchNorm2d(filters, track_running_stats=False))
        layers += [nn.Tanh(), nn.Flatten(), nn.Linear(filters * size * size, classes)]
        return nn.Sequential(*layers).double()


# -- task batches --------------------------------------------------------------------------------
@st.composite
def task_batches(draw: st.DrawFn, in_features: int = 1, out_features: int = 1, max_tasks: int = 4,
                 max_examples: int = 6) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Regression meta-batches ``(support_x, support_y, query_x, query_y)`` with a leading task dimension."""
    tasks = draw(st.integers(1, max_tasks))
    support = draw(st.integers(1, max_examples))
    query = draw(st.integers(1, max_examples))
    generator = torch.Generator().manual_seed(draw(seeds()))

    def sample(n: int, features: int) -> Tensor:
        return torch.randn(tasks, n, features, generator=generator, dtype=F64)

    return sample(support, in_features), sample(support, out_features), sample(query, in_features), \
        sample(query, out_features)


@st.composite
def classification_batches(draw: st.DrawFn, channels: int = 1, size: int = 6, classes: int = 3,
                           max_tasks: int = 3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Image classification meta-batches with labels in 0..classes-1."""
    tasks = draw(st.integers(1, max_tasks))
    shots, query = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    generator = torch.Generator().manual_seed(draw(seeds()))
    support_y = torch.arange(classes).repeat_interleave(shots).expand(tasks, -1).contiguous()
    query_y = torch.arange(classes).repeat_interleave(query).expand(tasks, -1).contiguous()
    support_x = torch.randn(tasks, classes * shots, channels, size, size, generator=generator, dtype=F64)
    query_x = torch.randn(tasks, classes * query, channels, size, size, generator=generator, dtype=F64)
    return support_x, support_y, query_x, query_y
