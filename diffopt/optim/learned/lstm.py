r"""The coordinate-wise LSTM optimizer (Andrychowicz et al., 2016, "Learning to learn by
gradient descent by gradient descent").

Every coordinate :math:`i` of every parameter is updated by the *same* small
LSTM (weights shared across coordinates), each coordinate with its own hidden
state:

.. math::
    x_i &= \rho_p(g_i) = \begin{cases}
        \bigl(\log|g_i| / p,\; \operatorname{sign} g_i\bigr) & |g_i| \ge e^{-p} \\
        \bigl(-1,\; e^{p} g_i\bigr) & \text{otherwise}\end{cases} \qquad (p = 10) \\
    (h_i, c_i) &\leftarrow \mathrm{LSTM}_\phi\bigl(x_i, (h_i, c_i)\bigr) \quad\text{(``layers`` stacked cells)} \\
    \theta_i &\leftarrow \theta_i + s \cdot (w^\top h_i + b)

with output scale :math:`s = 0.1` as in the paper. The preprocessing maps
gradients of any magnitude to inputs of order one, so one LSTM serves
parameters of every scale.

The hidden and cell states are per-coordinate state of the rule (``h0, c0,
h1, c1, ...`` of shape ``param.shape + (hidden,)``), so the rule works on
task-batched weights unchanged. The cell is written with primitive ops
(matmul on the last dimension of ``(..., features)`` tensors), so it is
differentiable to any order on every device — ``nn.LSTM``'s cuDNN kernel has
no double backward, which second-order meta-gradients need.

Non-finite gradients (overflow): ``nonfinite="raise"`` (default) raises
:class:`~diffopt.optim.NonFiniteError`; ``"skip"`` leaves those coordinates
and their hidden state unchanged for that step.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._rule import Hyper, State, check_range
from ._base import (LearnedOptimizer, LearnedRule, check_nonfinite_policy, first_tensor, guard_features,
                    keep_where, sanitize)

__all__ = ["LSTMOptimizer", "LSTMRule", "LSTMRuleNet", "preprocess_gradient", "LSTM_FEATURES"]

LSTM_FEATURES = ("log_grad_magnitude", "grad_sign")


def preprocess_gradient(grad: Tensor, p: float = 10.0) -> Tensor:
    """Andrychowicz et al.'s gradient preprocessing: ``(..., 2)`` features, differentiable."""
    magnitude = grad.abs()
    large = magnitude >= math.exp(-p)
    safe = torch.where(large, magnitude, torch.ones_like(magnitude))
    first = torch.where(large, torch.log(safe) / p, torch.full_like(grad, -1.0))
    second = torch.where(large, torch.sign(grad), math.exp(p) * grad)
    return torch.stack([first, second], -1)


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM cell on ``(..., in)`` inputs (gate order i, f, g, o as ``nn.LSTMCell``)."""
    gates = x @ w_ih.transpose(0, 1) + h @ w_hh.transpose(0, 1) + bias
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


class LSTMRuleNet(nn.Module):
    """The LSTM's learned weights: ``layers`` cells of ``hidden_size`` units and a linear read-out.

    Initialisation: the cells as ``nn.LSTMCell`` (``U[-1/√H, 1/√H]``), the read-out
    ``U[-0.01, 0.01]`` with zero bias (small first updates).
    """

    def __init__(self, hidden_size: int = 20, layers: int = 2, *, generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if hidden_size < 1 or layers < 1:
            raise ValueError(f"LSTMRuleNet: hidden_size and layers must be >= 1, got {hidden_size}, {layers}")
        self.hidden_size, self.layers = int(hidden_size), int(layers)
        bound = 1.0 / math.sqrt(hidden_size)

        def uniform(*shape: int, b: float = bound) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, dtype=dtype).uniform_(-b, b, generator=generator))

        self.weight_ih = nn.ParameterList()
        self.weight_hh = nn.ParameterList()
        self.bias = nn.ParameterList()
        for layer in range(layers):
            width = len(LSTM_FEATURES) if layer == 0 else hidden_size
            self.weight_ih.append(uniform(4 * hidden_size, width))
            self.weight_hh.append(uniform(4 * hidden_size, hidden_size))
            self.bias.append(uniform(4 * hidden_size))
        self.out_weight = uniform(1, hidden_size, b=0.01)
        self.out_bias = nn.Parameter(torch.zeros(1, dtype=dtype))

    def weights(self) -> tuple[Tensor, ...]:
        """The learned tensors in the rule's order: per layer (w_ih, w_hh, bias), then (w_out, b_out)."""
        out: list[Tensor] = []
        for layer in range(self.layers):
            out += [self.weight_ih[layer], self.weight_hh[layer], self.bias[layer]]
        return tuple(out + [self.out_weight, self.out_bias])

    def weight_names(self) -> list[str]:
        names = []
        for layer in range(self.layers):
            names += [f"weight_ih.{layer}", f"weight_hh.{layer}", f"bias.{layer}"]
        return names + ["out_weight", "out_bias"]

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "layers": self.layers}


class LSTMRule(LearnedRule):
    name = "lstm"
    defaults = {"weights": None, "preprocess": 10.0, "output_scale": 0.1, "nonfinite": "raise", "maximize": False}
    flags = frozenset({"maximize"})
    structured = ("weights",)

    @staticmethod
    def _layers(weights: tuple[Tensor, ...]) -> int:
        return (len(weights) - 2) // 3

    def init_state(self, param: Tensor, hp: Hyper) -> State:
        weights = hp["weights"]
        hidden = weights[1].shape[1]
        state: State = {"step": 0}
        for layer in range(self._layers(weights)):
            state[f"h{layer}"] = param.new_zeros(param.shape + (hidden,))
            state[f"c{layer}"] = param.new_zeros(param.shape + (hidden,))
        return state

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        weights = tuple(w.to(param.dtype) for w in hp["weights"])  # a no-op unless the precisions differ
        g = -grad if hp["maximize"] else grad
        if hp["nonfinite"] == "skip":
            bad = ~torch.isfinite(g.detach())
            features = preprocess_gradient(sanitize(g), float(hp["preprocess"]))
            features = torch.where(bad.unsqueeze(-1), torch.full_like(features, float("nan")), features)
        else:
            features = preprocess_gradient(g, float(hp["preprocess"]))
        features, ok = guard_features(features, hp["nonfinite"], "LSTMOptimizer")
        new_state: State = {"step": state["step"] + 1}
        x = features
        for layer in range(self._layers(weights)):
            w_ih, w_hh, bias = weights[3 * layer: 3 * layer + 3]
            h, c = lstm_cell(x, state[f"h{layer}"], state[f"c{layer}"], w_ih, w_hh, bias)
            new_state[f"h{layer}"] = keep_where(ok, h, state[f"h{layer}"])
            new_state[f"c{layer}"] = keep_where(ok, c, state[f"c{layer}"])
            x = h
        w_out, b_out = weights[-2], weights[-1]
        step = (x @ w_out.transpose(0, 1) + b_out).squeeze(-1) * hp["output_scale"]
        return keep_where(ok, param + step, param), new_state

    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        super().validate_group(group, where)
        weights = group.get("weights")
        if not isinstance(weights, tuple) or len(weights) < 5 or (len(weights) - 2) % 3:
            raise TypeError(f"{where}: weights must be the tuple LSTMRuleNet.weights(), got {type(weights).__name__}")
        check_range(group["preprocess"], "preprocess", where, low=0.0, low_inclusive=False)
        check_range(group["output_scale"], "output_scale", where)  # (NaN or inf: NaN weights after one step)
        check_nonfinite_policy(group["nonfinite"], where)


class LSTMOptimizer(LearnedOptimizer):
    """The coordinate-wise LSTM optimizer (see the module docstring).

    Args:
        params: the parameters to optimise (any shapes).
        net: the shared :class:`LSTMRuleNet` (default: a new one of ``hidden_size`` × ``layers``;
            pass the same net to many optimizers to share the learned weights).
        preprocess: p of the gradient preprocessing (10 in the paper).
        output_scale: s, the update is ``s · (wᵀh + b)`` (0.1 in the paper).
        nonfinite: ``"raise"`` or ``"skip"`` (see the module docstring).
    """
    supports_complex = False  # (its state or network is built for real tensors)

    rule_class = LSTMRule
    kind = "lstm"

    def __init__(self, params: Iterable[Any], net: LSTMRuleNet | None = None, *, hidden_size: int = 20,
                 layers: int = 2, preprocess: float = 10.0, output_scale: float | Tensor = 0.1,
                 nonfinite: str = "raise", maximize: bool = False, generator: torch.Generator | None = None,
                 **options: Any) -> None:
        params = params if isinstance(params, Tensor) else list(params)
        if net is None:
            like = first_tensor(params)
            net = LSTMRuleNet(hidden_size, layers, generator=generator, dtype=like.dtype).to(like.device)
        self.net = net
        super().__init__(params, weights=self.net.weights(), preprocess=preprocess, output_scale=output_scale,
                         nonfinite=nonfinite, maximize=maximize, **options)

    def config(self) -> dict[str, Any]:
        group = self.param_groups[0]
        scale = group["output_scale"]
        return {**self.net.config(), "preprocess": float(group["preprocess"]),
                "output_scale": float(scale) if not isinstance(scale, Tensor) else float(scale.detach()),
                "nonfinite": group["nonfinite"], "maximize": group["maximize"]}

    def features(self) -> list[str]:
        return list(LSTM_FEATURES)
