"""The pure update-rule interface and the numerics every rule shares.

An update rule is pure: ``init_state(param, hp) -> state`` and
``update_one(param, grad, state, hp) -> (new_param, new_state)``, with nothing
written in place into a tensor that autograd may need. The maths is elementwise,
so a rule works unchanged on weights that carry a leading task dimension.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._hyper import leaves

State = dict[str, Any]
Hyper = Mapping[str, Any]


def safe_sqrt(x: Tensor) -> Tensor:
    """``torch.sqrt`` with a finite derivative at zero.

    Forward values are exactly ``torch.sqrt(x)`` (NaN stays NaN for x < 0). Where
    ``x == 0`` the derivative is taken as 0 instead of +inf, so second-order
    gradients through Adam-style denominators stay finite for unused parameters
    and zero gradients (the ``inf * 0 = NaN`` trap in higher's optimizers). Built
    from differentiable primitives, so it is differentiable to every order.
    """
    if not (x.requires_grad and torch.is_grad_enabled()):
        return torch.sqrt(x)
    at_zero = x == 0
    return torch.where(at_zero, torch.zeros_like(x), torch.sqrt(torch.where(at_zero, torch.ones_like(x), x)))


def scalar_state_dtype() -> torch.dtype:
    """The dtype torch.optim uses for scalar state (``step``, ``eta``, ``mu_product``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def round_like_torch_state(value: float) -> float:
    """``value`` after a round trip through torch.optim's scalar-state dtype.

    ASGD's ``eta``/``mu`` and NAdam's ``mu_product`` live in float32 tensors
    unless the default dtype is float64; the exact twin rounds the same way.
    """
    return float(torch.tensor(value, dtype=scalar_state_dtype()))


def nonzero(value: Any) -> bool:
    """Whether a hyperparameter term must be applied (tensors always are)."""
    return isinstance(value, Tensor) or value != 0


def minimum_of(value: Any) -> float:
    return float(value.detach().min()) if isinstance(value, Tensor) else float(value)


def maximum_of(value: Any) -> float:
    return float(value.detach().max()) if isinstance(value, Tensor) else float(value)


class UpdateRule:
    """Base class of the differentiable update rules.

    Subclasses set ``defaults`` (the torch.optim namesake's defaults, in its
    argument order), ``flags`` (boolean options) and implement
    :meth:`init_state`, :meth:`update_one` and :meth:`validate_group`.
    """

    name: ClassVar[str] = "rule"
    defaults: ClassVar[dict[str, Any]] = {}
    flags: ClassVar[frozenset[str]] = frozenset({"maximize"})

    # -- per tensor ------------------------------------------------------------------
    def init_state(self, param: Tensor, hp: Hyper) -> State:
        return {"step": 0}

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        raise NotImplementedError

    # -- over lists of tensors -------------------------------------------------------
    def init(self, params: Sequence[Tensor], hparams: Sequence[Hyper]) -> list[State]:
        return [self.init_state(p, hp) for p, hp in zip(params, hparams)]

    def update(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        states: Sequence[State],
        hparams: Sequence[Hyper],
    ) -> tuple[list[Tensor], list[State]]:
        """One step over lists; parameters whose gradient is ``None`` are left alone."""
        new_params, new_states = [], []
        for p, g, s, hp in zip(params, grads, states, hparams):
            if g is None:
                new_params.append(p)
                new_states.append(s)
            else:
                np_, ns = self.update_one(p, g, s, hp)
                new_params.append(np_)
                new_states.append(ns)
        return new_params, new_states

    def state_from_torch(self, state: Mapping[str, Any], param: Tensor) -> State:
        """Our state from the torch.optim namesake's (tensors cloned, ``step`` as an int)."""
        converted: State = {}
        for key, value in state.items():
            if key == "step":
                converted[key] = int(float(value))
            elif isinstance(value, Tensor):
                converted[key] = value.detach().clone()
            else:
                converted[key] = value
        return converted

    # -- validation ------------------------------------------------------------------
    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        """Raise ``ValueError`` naming the argument for invalid values."""
        for flag in self.flags:
            if flag in group and not isinstance(group[flag], bool):
                raise TypeError(f"{where}: {flag} must be True or False, got {group[flag]!r}")
        if "lr" in group:
            check_range(group["lr"], "lr", where, low=0.0)
        if "eps" in group:
            check_range(group["eps"], "eps", where, low=0.0)
        if "weight_decay" in group:
            check_range(group["weight_decay"], "weight_decay", where, low=0.0)

    def describe(self) -> str:
        return self.name


def check_range(
    value: Any,
    name: str,
    where: str,
    *,
    low: float | None = None,
    high: float | None = None,
    high_inclusive: bool = False,
    low_inclusive: bool = True,
) -> None:
    """Check every number inside a (possibly tensor or wrapped) hyperparameter."""
    for leaf in leaves(value):
        if isinstance(leaf, Tensor):
            if not (leaf.is_floating_point() or leaf.is_complex()):
                raise TypeError(f"{where}: {name} must be a floating-point tensor, got dtype {leaf.dtype}")
            if leaf.numel() == 0:
                raise ValueError(f"{where}: {name} is an empty tensor")
            lo, hi = minimum_of(leaf), maximum_of(leaf)
        elif isinstance(leaf, bool) or not isinstance(leaf, (int, float)):
            raise TypeError(f"{where}: {name} must be a number or a tensor, got {leaf!r}")
        else:
            lo = hi = float(leaf)
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError(f"{where}: {name} contains NaN")
        if low is not None and (lo < low or (not low_inclusive and lo == low)):
            bound = f">= {low}" if low_inclusive else f"> {low}"
            raise ValueError(f"{where}: invalid {name} {lo!r}; it must be {bound}")
        if high is not None and (hi > high or (not high_inclusive and hi == high)):
            bound = f"<= {high}" if high_inclusive else f"< {high}"
            raise ValueError(f"{where}: invalid {name} {hi!r}; it must be {bound}")


def check_pair(value: Any, name: str, where: str) -> tuple[Any, Any]:
    if not isinstance(value, tuple) or len(value) != 2:
        if isinstance(value, list) and len(value) == 2:
            return value[0], value[1]
        raise TypeError(f"{where}: {name} must be a pair (a, b), got {value!r}")
    return value
