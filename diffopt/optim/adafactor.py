r"""Adafactor, as ``torch.optim.Adafactor`` (Shazeer & Stern, 2018, arXiv:1804.04235).

With :math:`G_t` the (sign-adjusted) gradient, :math:`\tau` ``beta2_decay``,
:math:`\gamma` ``lr``, :math:`\lambda` ``weight_decay`` and :math:`d` the clipping threshold:

.. math::
    \hat\beta_{2,t} &= 1 - t^{\tau}, \qquad \rho_t = \min(\gamma, 1/\sqrt t), \qquad
        \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\,\rho_t \\
    \theta &\leftarrow \theta_{t-1}(1 - \gamma\lambda) \\
    R_t &= \hat\beta_{2,t} R_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_{\text{cols}}(G_t^2), \quad
    C_t = \hat\beta_{2,t} C_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_{\text{rows}}(G_t^2) \\
    \hat V_t &= \frac{R_t C_t}{\max(\mathrm{mean}(R_t), \epsilon_1)} \quad\text{(a tensor of 2+ dims;
        a vector keeps a full } \hat V_t = \hat\beta_{2,t}\hat V_{t-1} + (1-\hat\beta_{2,t})G_t^2) \\
    U_t &= G_t / \sqrt{\max(\hat V_t, \epsilon_1^2)}, \qquad
    \theta_t = \theta - \frac{\alpha_t}{\max(1, \mathrm{RMS}(U_t)/d)}\,U_t

``eps[0] = None`` means the machine epsilon of the parameter's dtype, as in torch.

Everything is on the autograd graph: the factored moments, the relative step
:math:`\alpha_t` (through :math:`\mathrm{RMS}(\theta)`) and the update clipping
(through :math:`\mathrm{RMS}(U_t)`). The norms come from :mod:`._reductions`, whose
derivatives are finite to every order at 0, so a zero gradient (``U_t = 0``) or a
zero parameter gives finite meta-gradients; the ``max`` with :math:`\epsilon_1^2`
keeps the reciprocal square root away from 0.

Arithmetic order: torch computes the scalars :math:`\alpha_t`, :math:`\rho_t` and the
clipping factor in Python double precision from ``.item()`` values and rounds
:math:`-\alpha_t/\max(\cdot)` once to the parameter's dtype; this rule does the same
in float64 tensors (so they can carry gradients) and applies it with ``addcmul``
(the fused multiply-add of torch's ``add_(update, alpha=...)``). Trajectories are
bit-identical to torch.optim's single-tensor path (``foreach=None/False``, torch's
default for Adafactor) and, with ``foreach=True``, to its multi-tensor path, whose
last operation is an unfused ``param + update * alpha``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._reductions import mean_square, safe_norm
from ._rule import Hyper, State, UpdateRule, check_pair, check_range, nonzero
from .optimizer import DifferentiableOptimizer

F64 = torch.float64


def as_double(value: Any) -> Any:
    """A tensor hyperparameter in float64 (torch.optim's ``.item()`` arithmetic is Python doubles)."""
    return value.to(F64) if isinstance(value, Tensor) else value


def at_least(x: Tensor, low: Any) -> Tensor:
    """``max(x, low)``: ``clamp`` for a number (torch's own call), ``maximum`` for a tensor."""
    return torch.maximum(x, low.to(x.dtype)) if isinstance(low, Tensor) else x.clamp(min=low)


def at_most(x: Any, high: float) -> Any:
    """``min(x, high)`` for a number or a tensor."""
    return x.clamp(max=high) if isinstance(x, Tensor) else min(x, high)


def in_dtype(value: Any, dtype: torch.dtype) -> Any:
    """A tensor coefficient rounded to ``dtype``, as torch rounds a Python scalar; numbers as they are."""
    return value.to(dtype) if isinstance(value, Tensor) else value


def matrix_dims(param: Tensor, task_dims: int) -> tuple[tuple[int, ...] | None, int]:
    """The dimensions a whole-parameter norm reduces over (``None``: all) and their element count."""
    if task_dims == 0:
        return None, param.numel()
    return tuple(range(task_dims, param.dim())), math.prod(param.shape[task_dims:])


class AdafactorRule(UpdateRule):
    name = "adafactor"
    defaults = {"lr": 1e-2, "beta2_decay": -0.8, "eps": (None, 1e-3), "d": 1.0, "weight_decay": 0.0,
                "maximize": False}
    flags = frozenset({"maximize"})
    group_lr_may_be_tensor = True

    def init_state(self, param: Tensor, hp: Hyper) -> State:
        if param.dim() - hp.get("task_dims", 0) > 1:
            row_shape, col_shape = list(param.shape), list(param.shape)
            row_shape[-1] = 1
            col_shape[-2] = 1
            return {"step": 0, "row_var": param.new_zeros(row_shape), "col_var": param.new_zeros(col_shape)}
        return {"step": 0, "variance": torch.zeros_like(param)}

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        return self._step(param, grad, state, hp, fused_add=True)

    def update_group(
        self, params: list[Tensor], grads: list[Tensor], states: list[State], hp: Hyper
    ) -> tuple[list[Tensor], list[State]] | None:
        """torch's ``_multi_tensor_adafactor`` arithmetic. Each tensor needs its own norms (torch's
        multi-tensor kernel also reads them one by one with ``.item()``), so this differs from the
        per-tensor step only in the last operation: ``param + update * alpha``, unfused, as torch's
        ``_foreach_mul_`` + ``_foreach_add_``."""
        results = [self._step(p, g, s, hp, fused_add=False) for p, g, s in zip(params, grads, states)]
        return [r[0] for r in results], [r[1] for r in results]

    def _step(self, param: Tensor, grad: Tensor, state: State, hp: Hyper, fused_add: bool) -> tuple[Tensor, State]:
        eps1, eps2 = hp["eps"]
        if eps1 is None:
            eps1 = torch.finfo(param.dtype).eps
        lr, decay, d, wd = as_double(hp["lr"]), as_double(hp["beta2_decay"]), as_double(hp["d"]), hp["weight_decay"]
        dims, numel = matrix_dims(param, hp.get("task_dims", 0))
        g = -grad if hp["maximize"] else grad
        step = state["step"] + 1
        one_minus_beta2 = in_dtype(torch.pow(float(step), decay) if isinstance(decay, Tensor) else step**decay,
                                   param.dtype)
        rho = at_most(lr, 1 / (step**0.5))
        alpha = at_least(safe_norm(param, dims).to(F64) / (numel**0.5), as_double(eps2)) * rho
        if nonzero(wd):
            param = param * in_dtype(1 - lr * as_double(wd), param.dtype)
        new_state: State = {"step": step}
        if "variance" in state:
            variance = torch.lerp(state["variance"], g * g, one_minus_beta2)
            new_state["variance"] = variance
            estimate = variance
        else:
            row_var = torch.lerp(state["row_var"], mean_square(g, -1), one_minus_beta2)
            col_var = torch.lerp(state["col_var"], mean_square(g, -2), one_minus_beta2)
            new_state["row_var"], new_state["col_var"] = row_var, col_var
            estimate = (row_var @ col_var) / at_least(row_var.mean(dim=-2, keepdim=True), eps1)
        update = at_least(estimate, eps1 * eps1).rsqrt() * g
        clip = (safe_norm(update, dims).to(F64) / ((numel**0.5) * d)).clamp(min=1.0)
        coefficient = (-alpha / clip).to(param.dtype)
        if fused_add:  # torch's param.add_(update, alpha=-alpha / clip): one rounding (a fused multiply-add)
            return torch.addcmul(param, update, coefficient), new_state
        return param + update * coefficient, new_state

    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        for flag in self.flags:
            if not isinstance(group[flag], bool):
                raise TypeError(f"{where}: {flag} must be True or False, got {group[flag]!r}")
        check_range(group["lr"], "lr", where, low=0.0)
        check_range(group["beta2_decay"], "beta2_decay", where, high=0.0, high_inclusive=True)
        eps1, eps2 = check_pair(tuple(group["eps"]) if isinstance(group["eps"], list) else group["eps"], "eps", where)
        if eps1 is not None:
            check_range(eps1, "eps[0]", where, low=0.0, low_inclusive=False,
                        why=" (with 0 a gradient that is 0 is updated by rsqrt(0) * 0 = NaN; None picks one by dtype)")
        check_range(eps2, "eps[1]", where, low=0.0)
        check_range(group["d"], "d", where, low=1.0, finite=False)  # inf: no update clipping
        check_range(group["weight_decay"], "weight_decay", where, low=0.0)


class Adafactor(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adafactor``; see :class:`DifferentiableOptimizer` for the extra options.

    ``foreach`` follows torch's Adafactor: the per-tensor path unless ``foreach=True``
    (the two differ in the last bit; each is bit-identical to torch's namesake path).
    """

    rule_class = AdafactorRule

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        beta2_decay: float | Tensor = -0.8,
        eps: tuple[float | Tensor | None, float | Tensor] = (None, 1e-3),
        d: float | Tensor = 1.0,
        weight_decay: float | Tensor = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        if foreach not in (None, True, False):
            raise TypeError(f"Adafactor: foreach must be None, True or False, got {foreach!r}")
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise TypeError(f"Adafactor: eps must be a pair (eps1, eps2), as torch.optim.Adafactor's: eps1 (None: the "
                            f"dtype's eps) bounds the variance, eps2 the parameter's RMS; got {eps!r}, for example "
                            "eps=(None, 1e-3)")
        super().__init__(
            params, lr=lr, beta2_decay=beta2_decay, eps=tuple(eps), d=d, weight_decay=weight_decay,
            maximize=maximize, foreach=bool(foreach), **options,
        )

    def add_param_group(self, group: dict[str, Any]) -> None:
        reject_complex(group, "Adafactor", len(self.param_groups))
        super().add_param_group(group)

    def update(
        self, params: Sequence[Tensor], grads: Sequence[Tensor | None], states: Sequence[State | None], step: int,
    ) -> tuple[list[Tensor], list[State | None]]:
        # The multi-tensor step does not receive ``task_dims`` and would reduce the norms over a leading
        # task dimension: weights with one go tensor by tensor.
        if not self.foreach or all(p.dim() == d for p, d in zip(params, self.base_dims)):
            return super().update(params, grads, states, step)
        self.foreach = False
        try:
            return super().update(params, grads, states, step)
        finally:
            self.foreach = True


def reject_complex(group: Mapping[str, Any], name: str, index: int) -> None:
    """torch's Adafactor and Muon refuse complex parameters; so do the twins, at construction."""
    raw = group.get("params", [])
    for j, item in enumerate([raw] if isinstance(raw, Tensor) else list(raw)):
        tensor = item[1] if isinstance(item, tuple) else item
        if isinstance(tensor, Tensor) and tensor.is_complex():
            raise TypeError(
                f"{name} parameter group {index}: params[{j}] is complex ({tensor.dtype}); {name} (like "
                f"torch.optim.{name}) supports real parameters only; optimize torch.view_as_real(p) instead"
            )
