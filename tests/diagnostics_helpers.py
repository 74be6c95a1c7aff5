"""Builders shared by the diagnostics tests (tests/test_diagnostics_*.py).

Each test module used to define its own copy of these; the defaults here are the
ones most modules used, and a module whose tests were written against other sizes
binds them once (``mlp = partial(diagnostics_helpers.mlp, N=3)``), so every test
still builds exactly the model and data it always did. Tests run in float64 with
``pytestmark = pytest.mark.usefixtures("float64_default")`` (tests/conftest.py).
"""
from __future__ import annotations

import math
import statistics

import torch
from torch import nn

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    """An explicit generator seeded with ``seed`` (tests never draw from the global RNG for data)."""
    return torch.Generator().manual_seed(seed)


def mlp(d: int = 3, h: int = 5, N: int = 4, seed: int = 0) -> nn.Sequential:
    """The float64 classifier d-h-N with tanh, initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, N)).double()


def data(seed: int = 0, n: int = 8, d: int = 3, N: int = 4, T: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs ``(n, d)`` and uniform labels in ``[0, N)`` (with a leading task dimension ``T`` if given)."""
    g = gen(seed)
    lead = () if T is None else (T,)
    return torch.randn(*lead, n, d, generator=g), torch.randint(0, N, (*lead, n), generator=g)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters, detached, keyed by ``named_parameters()`` names."""
    return {k: v.detach() for k, v in model.named_parameters()}


def hand_ci95(values) -> tuple[float, float]:
    """mean ± 1.96·sd/√n (sd with n − 1), by hand with the statistics module: the reference the
    diagnostics' ci95 values are checked against."""
    xs = [float(v) for v in values]
    half = 1.96 * statistics.stdev(xs) / math.sqrt(len(xs))
    return statistics.fmean(xs) - half, statistics.fmean(xs) + half
