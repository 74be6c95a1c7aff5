r"""Muon, as ``torch.optim.Muon`` (Jordan et al., 2024; Liu et al., 2025, arXiv:2502.16982).

For a matrix parameter, with momentum :math:`\mu`, learning rate :math:`\gamma` and
decoupled weight decay :math:`\lambda`:

.. math::
    B_t &= \mu B_{t-1} + (1-\mu) G_t \quad(\text{torch: } B \leftarrow \mathrm{lerp}(B, G, 1-\mu)) \\
    \tilde B_t &= \mu B_t + (1-\mu) G_t \text{ if nesterov else } B_t \\
    O_t &= \mathrm{NS}^{(a,b,c)}_k(\tilde B_t), \qquad
    \theta_t = \theta_{t-1}(1-\gamma\lambda) - \gamma\,r(A, B)\,O_t

where :math:`r = \sqrt{\max(1, A/B)}` (``adjust_lr_fn=None`` or ``"original"``) or
:math:`0.2\sqrt{\max(A, B)}` (``"match_rms_adamw"``) for an :math:`A\times B` matrix, and
:math:`\mathrm{NS}_k` is ``k`` steps of the quintic Newton–Schulz iteration

.. math::
    X_0 = \frac{\tilde B}{\max(\|\tilde B\|_F, \epsilon)}, \qquad
    X_{j+1} = a X_j + (b\,X_jX_j^\top + c\,(X_jX_j^\top)^2) X_j

(on the transpose when :math:`A > B`), which maps the singular values of
:math:`\tilde B` towards 1.

Differentiability. The iteration is a polynomial in :math:`X_0`, so the
meta-gradient flows through every Newton–Schulz step (and to tensor
``ns_coefficients``, which make the polynomial learnable). The Frobenius norm
comes from :func:`._reductions.safe_norm`, finite to every order at a zero
momentum. torch runs the iteration in bfloat16 (``grad.bfloat16()``); so does this
twin by default (``ns_dtype=torch.bfloat16``), which keeps trajectories
bit-identical to torch.optim but makes the derivatives as coarse as bfloat16.
``ns_dtype=None`` runs the iteration in the parameter's dtype: the same maths
without the bfloat16 rounding, for exact float64 meta-gradients (a diffopt option;
torch has no such argument).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._reductions import safe_norm
from ._rule import Hyper, State, UpdateRule, check_range, nonzero
from .adafactor import as_double, at_least, in_dtype, reject_complex
from .optimizer import DifferentiableOptimizer

DEFAULT_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def newton_schulz(
    matrix: Tensor, coefficients: tuple[Any, Any, Any] = DEFAULT_NS_COEFFICIENTS, steps: int = 5,
    eps: float | Tensor = 1e-7, dtype: torch.dtype | None = torch.bfloat16,
) -> Tensor:
    """The zeroth power (orthogonalisation) of ``matrix`` by ``steps`` quintic Newton–Schulz
    iterations, as torch.optim.Muon's ``_zeropower_via_newtonschulz``, differentiable.

    ``matrix`` is ``(..., A, B)``: leading dimensions are independent matrices (a task
    batch). ``dtype`` is the precision of the iteration (torch: bfloat16; ``None``: the
    input's). Number coefficients use torch's ``addmm`` calls (bit-identical); tensor
    coefficients the same polynomial written out, so that they receive gradients.
    """
    a, b, c = coefficients
    x = matrix if dtype is None else matrix.to(dtype)
    tall = matrix.size(-2) > matrix.size(-1)
    if tall:
        x = x.mT
    x = x / at_least(safe_norm(x, None if x.dim() == 2 else (-2, -1)), eps)
    numbers = not any(isinstance(k, Tensor) for k in (a, b, c))
    for _ in range(steps):
        gram = x @ x.mT
        if numbers and x.dim() == 2:
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        elif numbers:
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        else:
            a_, b_, c_ = (in_dtype(k, x.dtype) for k in (a, b, c))
            x = a_ * x + (b_ * gram + c_ * (gram @ gram)) @ x
    return x.mT if tall else x


def lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's ``_adjust_lr`` factor for an ``A x B`` matrix."""
    rows, cols = shape[-2], shape[-1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


class MuonRule(UpdateRule):
    name = "muon"
    defaults = {"lr": 1e-3, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True,
                "ns_coefficients": DEFAULT_NS_COEFFICIENTS, "eps": 1e-7, "ns_steps": 5, "adjust_lr_fn": None,
                "ns_dtype": torch.bfloat16}
    flags = frozenset({"nesterov"})

    def init_state(self, param: Tensor, hp: Hyper) -> State:
        return {"momentum_buffer": torch.zeros_like(param)}

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        momentum = hp["momentum"]
        weight = 1 - as_double(momentum)
        buffer = torch.lerp(state["momentum_buffer"], grad, in_dtype(weight, grad.dtype))
        update = torch.lerp(grad, buffer, in_dtype(as_double(momentum), grad.dtype)) if hp["nesterov"] else buffer
        update = newton_schulz(update, tuple(hp["ns_coefficients"]), hp["ns_steps"], hp["eps"], hp["ns_dtype"])
        lr, wd = hp["lr"], hp["weight_decay"]
        step_size = as_double(lr) * lr_ratio(hp["adjust_lr_fn"], param.shape)
        if nonzero(wd):  # torch multiplies even when weight_decay == 0 (by exactly 1)
            param = param * in_dtype(1 - as_double(lr) * as_double(wd), param.dtype)
        if isinstance(step_size, Tensor):  # torch's add_(update, alpha=-lr'): a fused multiply-add
            new = torch.addcmul(param, update.to(param.dtype), (-step_size).to(param.dtype))
            return new, {"momentum_buffer": buffer}
        return torch.add(param, update, alpha=-step_size), {"momentum_buffer": buffer}

    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        super().validate_group(group, where)
        check_range(group["momentum"], "momentum", where, low=0.0)
        if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(
                f"{where}: adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {group['adjust_lr_fn']!r}"
            )
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 100:
            raise ValueError(f"{where}: ns_steps must be an integer in [0, 100), got {steps!r}")
        coefficients = group["ns_coefficients"]
        if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
            raise ValueError(f"{where}: ns_coefficients must be three numbers (a, b, c), got {coefficients!r}")
        for k, value in enumerate(coefficients):
            check_range(value, f"ns_coefficients[{k}]", where)
        if group["ns_dtype"] is not None and not (
            isinstance(group["ns_dtype"], torch.dtype) and group["ns_dtype"].is_floating_point
        ):
            raise TypeError(
                f"{where}: ns_dtype must be a floating-point torch.dtype or None, got {group['ns_dtype']!r}"
            )

    def state_from_torch(self, state: Mapping[str, Any], param: Tensor) -> State:
        return {"momentum_buffer": state["momentum_buffer"].detach().clone()}


class Muon(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Muon`` (2-D parameters only, as torch's).

    ``ns_dtype`` (diffopt only): the precision of the Newton–Schulz iteration; torch's
    bfloat16 by default, ``None`` for the parameter's dtype (exact meta-gradients).
    """

    rule_class = MuonRule

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        weight_decay: float | Tensor = 0.1,
        momentum: float | Tensor = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float | Tensor, float | Tensor, float | Tensor] = DEFAULT_NS_COEFFICIENTS,
        eps: float | Tensor = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        ns_dtype: torch.dtype | None = torch.bfloat16,
        **options: Any,
    ) -> None:
        super().__init__(
            params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype, **options,
        )

    def add_param_group(self, group: dict[str, Any]) -> None:
        index = len(self.param_groups)
        reject_complex(group, "Muon", index)
        raw = group.get("params", [])
        for j, item in enumerate([raw] if isinstance(raw, Tensor) else list(raw)):
            tensor = item[1] if isinstance(item, tuple) else item
            if isinstance(tensor, Tensor) and tensor.dim() != 2:
                raise ValueError(
                    f"Muon parameter group {index}: params[{j}] has shape {tuple(tensor.shape)}; Muon (like "
                    "torch.optim.Muon) takes 2-D weight matrices only; optimize biases, embeddings and other "
                    "parameters with another optimizer (e.g. AdamW)"
                )
        super().add_param_group(group)
