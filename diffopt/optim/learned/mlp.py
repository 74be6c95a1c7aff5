r"""A small per-coordinate MLP optimizer on gradient-history features (in the spirit of
Metz et al., 2020, "Tasks, stability, architecture, and compute").

Per coordinate, with :math:`t` the step count, momenta :math:`m^{(\beta)}` at
several time scales and the second moment :math:`v` (bias-corrected
:math:`\hat m, \hat v`, :math:`d = \sqrt{\hat v} + \epsilon`), the features are
chosen from

=================  ==========================================================
``grad``           :math:`g / d`
``momentum_0.5``   :math:`\hat m^{(0.5)} / d` (likewise ``momentum_0.9``, ``momentum_0.99``)
``param``          :math:`\theta` (the parameter value)
``step_10``        :math:`\tanh(t / 10)` (likewise ``step_100``, ``step_1000``)
=================  ==========================================================

(dividing by :math:`d` makes every gradient feature invariant to the scale of
the loss). A shared MLP (``tanh`` hidden layers) maps them to a direction
:math:`u` and a log-magnitude :math:`a`, and

.. math::
    \theta \leftarrow \theta - e^{\lambda}\, e^{\kappa a}\,\bigl(b\, \hat m^{(0.9)}/d + u\bigr)

with a learned log step size :math:`\lambda`, a learned weight :math:`b` of the
Adam direction, and :math:`\kappa` = ``magnitude_scale``. The output layer is
initialised at zero and :math:`b = 1`, so an untrained rule **is Adam** with
``lr = e^λ`` (β = (0.9, 0.999)); meta-training learns corrections to it
(a residual parametrisation — the learned part only has to find what beats
Adam, and training starts stable).

Non-finite features (an overflowed gradient, or ``g²`` overflowing the second
moment): ``nonfinite="raise"`` raises :class:`~diffopt.optim.NonFiniteError`;
``"skip"`` leaves those coordinates and their moments unchanged for the step.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._rule import Hyper, State, check_range, safe_sqrt
from ._base import (LearnedOptimizer, LearnedRule, check_nonfinite_policy, first_tensor, guard_features,
                    keep_where, sanitize)

__all__ = ["MLP_FEATURES", "MLPOptimizer", "MLPRule", "MLPRuleNet", "MOMENTA", "SECOND_MOMENT"]

MOMENTA = (0.5, 0.9, 0.99)
SECOND_MOMENT = 0.999
MLP_FEATURES = ("grad", "momentum_0.5", "momentum_0.9", "momentum_0.99", "param", "step_10", "step_100", "step_1000")


def check_features(features: Sequence[str], where: str) -> tuple[str, ...]:
    features = tuple(features)
    unknown = [f for f in features if f not in MLP_FEATURES]
    if unknown or not features or len(set(features)) != len(features):
        raise ValueError(
            f"{where}: features must be distinct names from {MLP_FEATURES}; got {list(features)}"
            + (f" (unknown: {unknown})" if unknown else "")
        )
    return features


class MLPRuleNet(nn.Module):
    """The MLP's learned weights: hidden layers, a zero-initialised 2-unit output, ``base`` and ``log_step``."""

    def __init__(self, features: Sequence[str] = MLP_FEATURES, hidden: Sequence[int] = (32, 32), *,
                 lr: float = 1e-3, generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.features = check_features(features, "MLPRuleNet")
        self.hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"MLPRuleNet: hidden sizes must be >= 1, got {hidden}")
        if not lr > 0:
            raise ValueError(f"MLPRuleNet: lr (the initial step size) must be > 0, got {lr}")
        self.weight = nn.ParameterList()
        self.bias = nn.ParameterList()
        width = len(self.features)
        for h in self.hidden:
            bound = 1.0 / math.sqrt(width)
            self.weight.append(nn.Parameter(torch.empty(h, width, dtype=dtype).uniform_(-bound, bound, generator=generator)))
            self.bias.append(nn.Parameter(torch.empty(h, dtype=dtype).uniform_(-bound, bound, generator=generator)))
            width = h
        self.out_weight = nn.Parameter(torch.zeros(2, width, dtype=dtype))
        self.out_bias = nn.Parameter(torch.zeros(2, dtype=dtype))
        self.base = nn.Parameter(torch.ones((), dtype=dtype))
        self.log_step = nn.Parameter(torch.full((), math.log(lr), dtype=dtype))

    def weights(self) -> tuple[Tensor, ...]:
        out: list[Tensor] = []
        for w, b in zip(self.weight, self.bias):
            out += [w, b]
        return tuple(out + [self.out_weight, self.out_bias, self.base, self.log_step])

    def weight_names(self) -> list[str]:
        names = []
        for k in range(len(self.hidden)):
            names += [f"weight.{k}", f"bias.{k}"]
        return names + ["out_weight", "out_bias", "base", "log_step"]

    def config(self) -> dict[str, Any]:
        return {"features": list(self.features), "hidden": list(self.hidden)}


def _column(name: str, g: Tensor, moments: dict[float, Tensor], denom: Tensor, param: Tensor, step: int) -> Tensor:
    if name == "grad":
        return g / denom
    if name.startswith("momentum_"):
        return moments[float(name.split("_", 1)[1])] / denom
    if name == "param":
        return param
    scale = float(name.split("_", 1)[1])
    return torch.full_like(g, math.tanh(step / scale))


class MLPRule(LearnedRule):
    name = "mlp"
    defaults = {"weights": None, "features": MLP_FEATURES, "eps": 1e-8, "magnitude_scale": 1.0,
                "nonfinite": "raise", "maximize": False}
    flags = frozenset({"maximize"})
    structured = ("weights",)

    def init_state(self, param: Tensor, hp: Hyper) -> State:
        state: State = {"step": 0, "exp_avg_sq": torch.zeros_like(param)}
        for beta in MOMENTA:
            state[f"exp_avg_{beta}"] = torch.zeros_like(param)
        return state

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        weights = tuple(w.to(param.dtype) for w in hp["weights"])  # a no-op unless the precisions differ
        g = -grad if hp["maximize"] else grad
        skip = hp["nonfinite"] == "skip"
        grad_ok = torch.isfinite(g.detach()) if skip else None
        if skip:
            g = sanitize(g)
        step = state["step"] + 1
        v = state["exp_avg_sq"] * SECOND_MOMENT + (1 - SECOND_MOMENT) * (g * g)
        raw = {beta: torch.lerp(state[f"exp_avg_{beta}"], g, 1 - beta) for beta in MOMENTA}
        corrected = {beta: m / (1 - beta**step) for beta, m in raw.items()}
        denom = safe_sqrt(v / (1 - SECOND_MOMENT**step)) + hp["eps"]
        columns = [_column(name, g, corrected, denom, param, step) for name in hp["features"]]
        features = torch.stack(columns + [denom], -1)
        if grad_ok is not None:
            features = torch.where(grad_ok.unsqueeze(-1), features, torch.full_like(features, float("nan")))
        features, ok = guard_features(features, hp["nonfinite"], "MLPOptimizer")
        x = features[..., :-1]
        hidden = (len(weights) - 4) // 2
        for k in range(hidden):
            x = torch.tanh(x @ weights[2 * k].transpose(0, 1) + weights[2 * k + 1])
        out_weight, out_bias, base, log_step = weights[-4:]
        out = x @ out_weight.transpose(0, 1) + out_bias
        direction = base * (corrected[0.9] / denom) + out[..., 0]
        magnitude = torch.exp(log_step + hp["magnitude_scale"] * out[..., 1])
        new_param = param - magnitude * direction
        new_state: State = {"step": step, "exp_avg_sq": keep_where(ok, v, state["exp_avg_sq"])}
        for beta in MOMENTA:
            new_state[f"exp_avg_{beta}"] = keep_where(ok, raw[beta], state[f"exp_avg_{beta}"])
        return keep_where(ok, new_param, param), new_state

    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        super().validate_group(group, where)
        weights = group.get("weights")
        if not isinstance(weights, tuple) or len(weights) < 4 or len(weights) % 2:
            raise TypeError(f"{where}: weights must be the tuple MLPRuleNet.weights(), got {type(weights).__name__}")
        features = check_features(group["features"], where)
        first = weights[0] if len(weights) > 4 else weights[-4]
        if first.shape[-1] != len(features):
            raise ValueError(
                f"{where}: the network takes {first.shape[-1]} input features but features lists "
                f"{len(features)}: {list(features)}"
            )
        check_range(group["magnitude_scale"], "magnitude_scale", where)
        check_nonfinite_policy(group["nonfinite"], where)


class MLPOptimizer(LearnedOptimizer):
    """The per-coordinate MLP optimizer (see the module docstring).

    Args:
        params: the parameters to optimise (any shapes).
        net: the shared :class:`MLPRuleNet` (default: a new one with ``features``,
            ``hidden`` and initial step size ``lr``).
        eps: ε of the normalisation ``√v̂ + ε``.
        magnitude_scale: κ, how strongly the learned log-magnitude acts.
        nonfinite: ``"raise"`` or ``"skip"``.
    """

    rule_class = MLPRule
    kind = "mlp"

    def __init__(self, params: Iterable[Any], net: MLPRuleNet | None = None, *,
                 features: Sequence[str] | None = None, hidden: Sequence[int] = (32, 32), lr: float = 1e-3,
                 eps: float = 1e-8, magnitude_scale: float = 1.0, nonfinite: str = "raise", maximize: bool = False,
                 generator: torch.Generator | None = None, **options: Any) -> None:
        params = params if isinstance(params, Tensor) else list(params)
        if net is not None and features is not None and tuple(features) != net.features:
            raise ValueError(
                f"MLPOptimizer: the network was built for features {list(net.features)}, not {list(features)}"
            )
        if net is None:
            like = first_tensor(params)
            net = MLPRuleNet(MLP_FEATURES if features is None else features, hidden, lr=lr, generator=generator,
                             dtype=like.dtype).to(like.device)
        self.net = net
        super().__init__(params, weights=self.net.weights(), features=tuple(self.net.features), eps=eps,
                         magnitude_scale=magnitude_scale, nonfinite=nonfinite, maximize=maximize, **options)

    def config(self) -> dict[str, Any]:
        group = self.param_groups[0]
        return {**self.net.config(), "eps": float(group["eps"]), "magnitude_scale": float(group["magnitude_scale"]),
                "nonfinite": group["nonfinite"], "maximize": group["maximize"]}

    def features(self) -> list[str]:
        return list(self.net.features)
