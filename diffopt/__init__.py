"""diffopt: differentiable optimization for PyTorch.

Optimization steps that autograd can see through, so a loss after training can
be differentiated with respect to what came before it: initial weights,
learning rates and other hyperparameters, or a learned update rule.

Submodules load on first use: ``diffopt.optim``, ``diffopt.unroll``,
``diffopt.algorithms``, ``diffopt.tasks``, ``diffopt.training``,
``diffopt.diagnostics``, ``diffopt.testing``, ``diffopt.distributed``,
``diffopt.recipes``.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import optim
from ._version import __version__
from .innerloop import innerloop

SUBMODULES = ("algorithms", "bench", "cli", "diagnostics", "distributed", "errors", "hyper", "ports", "recipes", "tasks", "testing", "training",
              "unroll")

__all__ = ["__version__", "innerloop", "optim", *SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'diffopt' has no attribute {name!r}")
