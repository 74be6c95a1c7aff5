"""A fresh learnable update rule by name: :data:`RULES` and :func:`make_rule`.

The names are those of the saved-rule file format (:mod:`.serialization`) and of
``diffopt train-optimizer --rule``.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..optimizer import DifferentiableOptimizer
from .curvature import MetaCurvature
from .hypergradient import HypergradientAdam, HypergradientSGD
from .lr import meta_sgd, per_layer_per_step
from .lstm import LSTMOptimizer
from .mlp import MLPOptimizer

__all__ = ["RULES", "make_rule"]

RULES = ("lstm", "mlp", "meta_curvature", "meta_sgd", "per_layer_per_step", "hypergradient_sgd", "hypergradient_adam")


def make_rule(kind: str, params: Iterable[Tensor], *, generator: torch.Generator | None = None, steps: int = 1,
              **options: Any) -> DifferentiableOptimizer:
    """A fresh learnable rule of ``kind`` (one of :data:`RULES`) on ``params``.

    ``steps`` is the number of per-step rates of ``per_layer_per_step``. Tensor
    hyperparameters of the hypergradient rules (``lr``, ``hyper_lr``) are made
    learnable when given as numbers.
    """
    params = list(params)
    if kind == "lstm":
        return LSTMOptimizer(params, generator=generator, **options)
    if kind == "mlp":
        return MLPOptimizer(params, generator=generator, **options)
    if kind == "meta_curvature":
        return MetaCurvature(params, **options)
    if kind == "meta_sgd":
        return meta_sgd(params, options.pop("init", (0.005, 0.1)), generator=generator, **options)
    if kind == "per_layer_per_step":
        return per_layer_per_step(params, steps, options.pop("init", 0.01), **options)
    if kind in ("hypergradient_sgd", "hypergradient_adam"):
        cls = HypergradientSGD if kind == "hypergradient_sgd" else HypergradientAdam
        defaults = cls.rule_class.defaults
        dtype = params[0].dtype
        for key in ("lr", "hyper_lr"):
            value = options.get(key, defaults[key])
            if not isinstance(value, Tensor):
                options[key] = nn.Parameter(torch.tensor(float(value), dtype=dtype))
        return cls(params, **options)
    raise ValueError(f"unknown rule {kind!r}; choose one of {', '.join(RULES)}")
