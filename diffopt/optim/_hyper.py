"""Hyperparameter values: numbers, tensors, per-parameter lists and per-step schedules.

A hyperparameter in a parameter group may be

* a Python number (the torch.optim case);
* a tensor, possibly requiring grad, that broadcasts against every parameter of
  its group: a scalar tensor, or a per-element tensor of the parameter's shape
  (which also broadcasts against weights with a leading task dimension);
* :class:`PerParameter` — one value per parameter of the group;
* :class:`Schedule` — one value per optimizer step (a sequence, a tensor whose
  leading dimension indexes the step, or a callable ``step -> value``).

Wrappers nest: ``PerParameter([Schedule(...), 0.1])`` is valid.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import Tensor

from ._gradients import inside_torch_func

__all__ = ["PerParameter", "Schedule", "HyperValue", "resolve", "resolve_shared"]


class PerParameter:
    """One hyperparameter value per parameter of a group, in the group's order."""

    def __init__(self, values: Sequence[Any]) -> None:
        if isinstance(values, (Tensor, str)) or not isinstance(values, Sequence):
            raise TypeError(
                "PerParameter(values): values must be a list or tuple with one entry per "
                f"parameter of the group, got {type(values).__name__}"
            )
        self.values = list(values)

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        return f"PerParameter({self.values!r})"


#: Hyperparameters a callable :class:`Schedule`'s values are checked for at every step (the optimizers
#: check the other forms once, at construction).
NON_NEGATIVE = frozenset({"lr", "momentum", "weight_decay", "dampening"})


def minimum_of(value: Any) -> float:
    """The smallest number in a number or tensor (NaN where there is one: NaN compares false)."""
    return float(value.detach().min()) if isinstance(value, Tensor) else float(value)


def maximum_of(value: Any) -> float:
    return float(value.detach().max()) if isinstance(value, Tensor) else float(value)


def _finite_and_non_negative(value: Any) -> bool:
    if not isinstance(value, (Tensor, int, float)):
        return True  # other kinds are checked where they are used
    return 0 <= minimum_of(value) and maximum_of(value) < float("inf")  # (False for NaN)


class Schedule:
    """A per-step hyperparameter: entry ``t`` is used at the optimizer's step ``t`` (0-based).

    ``values`` is a sequence of values, a tensor whose leading dimension indexes
    the step (so ``Schedule(torch.full((K,), 0.1, requires_grad=True))`` is a
    learnable per-step learning rate), or a callable ``step -> value``. With
    ``hold_last=True`` steps past the end use the last entry (test-time
    adaptation longer than the meta-trained K); otherwise they are an error.
    """

    def __init__(self, values: Sequence[Any] | Tensor | Callable[[int], Any], hold_last: bool = False) -> None:
        if isinstance(values, Tensor):
            if values.dim() == 0:
                raise ValueError(
                    "Schedule(values): a 0-dim tensor has no step dimension; pass a tensor "
                    "whose leading dimension indexes the step, or use the scalar directly"
                )
        elif not callable(values) and not isinstance(values, Sequence):
            raise TypeError(
                "Schedule(values): expected a sequence, a tensor with a leading step "
                f"dimension or a callable step -> value, got {type(values).__name__}"
            )
        self.values = values
        self.hold_last = hold_last

    def at(self, step: int, name: str) -> Any:
        if callable(self.values) and not isinstance(self.values, Tensor):
            value = self.values(step)
            if name in NON_NEGATIVE and not _finite_and_non_negative(value):
                raise ValueError(f"hyperparameter {name!r}: its Schedule returned {value!r} at step {step} (0-based); "
                                 f"{name} must be finite and >= 0, as the optimizer checks it at construction")
            return value
        length = len(self.values)
        if self.hold_last:
            step = min(step, length - 1)
        if step >= length:
            raise IndexError(
                f"hyperparameter {name!r}: its Schedule has {length} entries but step "
                f"{step} (0-based) was requested; give one entry per inner step"
            )
        return self.values[step]

    def with_values(self, values: Any) -> "Schedule":
        """The same schedule over other values (used to swap learnable tensors)."""
        return Schedule(values, hold_last=self.hold_last)

    def __repr__(self) -> str:
        return f"Schedule({self.values!r}{', hold_last=True' if self.hold_last else ''})"


HyperValue = Union[float, int, bool, Tensor, PerParameter, Schedule, tuple, None]


def resolve(value: Any, name: str, index_in_group: int, step: int) -> Any:
    """The concrete value of a hyperparameter for one parameter at one step."""
    if isinstance(value, PerParameter):
        if index_in_group >= len(value):
            raise ValueError(
                f"hyperparameter {name!r}: PerParameter has {len(value)} values but the "
                f"group has a parameter at position {index_in_group}; give one value per "
                "parameter of the group"
            )
        return resolve(value.values[index_in_group], name, index_in_group, step)
    if isinstance(value, Schedule):
        return resolve(value.at(step, name), name, index_in_group, step)
    if isinstance(value, tuple):
        return tuple(resolve(v, f"{name}[{i}]", index_in_group, step) for i, v in enumerate(value))
    return value


def _carries_no_derivative(value: Tensor) -> bool:
    """No gradient can reach ``value``: it does not require grad, carries no forward-mode tangent,
    and no ``torch.func`` transform (which wraps tensors) is running."""
    if value.requires_grad or inside_torch_func():
        return False
    return torch.autograd.forward_ad.unpack_dual(value).tangent is None


def as_number_if_constant(value: Any) -> Any:
    """A 0-dim real floating tensor through which no derivative flows, as a Python float.

    torch.optim reads such a hyperparameter with ``.item()`` and uses torch's scalar
    arithmetic (``add(..., alpha=lr)``: one rounding); as a number the twin does the
    same, bit for bit, instead of multiplying by a tensor (two roundings in float32).
    """
    if isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point() and _carries_no_derivative(value):
        return value.item()
    return value


def constants_as_numbers(hp: dict[str, Any], structured: Sequence[str] = ()) -> dict[str, Any]:
    """``hp`` with :func:`as_number_if_constant` applied to every scalar hyperparameter (inside pairs
    too), except the ``structured`` ones (a learned rule's weight tensors stay tensors)."""
    def convert(value: Any) -> Any:
        return tuple(convert(v) for v in value) if isinstance(value, tuple) else as_number_if_constant(value)

    return {k: v if k in structured else convert(v) for k, v in hp.items()}


class VariesByParameter(Exception):
    """Raised by :func:`resolve_shared` for a value that differs between parameters."""


def resolve_shared(value: Any, name: str, step: int) -> Any:
    """The concrete value at ``step`` of a hyperparameter that every parameter shares.

    As :func:`resolve`, but raises :class:`VariesByParameter` on meeting a
    :class:`PerParameter`, so the caller can resolve it per parameter instead.
    """
    if isinstance(value, PerParameter):
        raise VariesByParameter(name)
    if isinstance(value, Schedule):
        return resolve_shared(value.at(step, name), name, step)
    if isinstance(value, tuple):
        return tuple(resolve_shared(v, f"{name}[{i}]", step) for i, v in enumerate(value))
    return value


def is_plain_number(value: Any) -> bool:
    """Whether a resolved hyperparameter is a Python number, bool or None (or a tuple of them)."""
    if isinstance(value, tuple):
        return all(is_plain_number(v) for v in value)
    return value is None or isinstance(value, (bool, int, float))


def is_plain(value: Any) -> bool:
    """A hyperparameter that resolves to itself at every step and has no shape: a Python number,
    bool, string or None (or a tuple of them)."""
    if isinstance(value, tuple):
        return all(is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def leaves(value: Any) -> list[Any]:
    """Every concrete value inside a (possibly wrapped) hyperparameter, for validation."""
    if isinstance(value, PerParameter):
        return [leaf for v in value.values for leaf in leaves(v)]
    if isinstance(value, Schedule):
        if callable(value.values) and not isinstance(value.values, Tensor):
            return []
        if isinstance(value.values, Tensor):
            return [value.values]
        return [leaf for v in value.values for leaf in leaves(v)]
    if isinstance(value, tuple):
        return [leaf for v in value for leaf in leaves(v)]
    return [value]
