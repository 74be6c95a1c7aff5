"""What every learned update rule shares.

A learned rule is an ordinary pure update rule (``init_state`` / ``update_one``)
whose hyperparameters include *structured* learned tensors: the weights of a
small network shared by every coordinate (LSTM, MLP) or per-layer matrices
(Meta-Curvature). Those tensors live in the parameter groups like any other
tensor hyperparameter, as a tuple, so

* ``hyperparameter_tensors()`` reports them and every engine mode
  (second order, truncated, checkpointed, forward, ES/PES, ...) differentiates
  or perturbs them without being told;
* ``InnerLoop.with_hyperparameters`` (ES/PES, ``rebind``) can swap them.

Two things differ from the element-wise built-in rules:

* a structured tensor need not broadcast against the parameter (an LSTM weight
  does not), so the broadcast check is replaced by the rule's own
  :meth:`LearnedRule.check_param`;
* a rule that reduces over a parameter (a Kronecker product, a hypergradient dot
  product) must know how many leading dimensions are *task* dimensions: the
  optimizer passes ``hp["batch_dims"]`` (the parameter's rank minus the rank
  it had at construction), so a rule is correct on one task's weights and on
  task-batched weights alike.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._gradients import inside_torch_func
from .._hyper import PerParameter, Schedule
from .._rule import State, UpdateRule
from ..optimizer import DifferentiableOptimizer, NonFiniteError

NONFINITE_POLICIES = ("raise", "skip")


class LearnedRule(UpdateRule):
    """An update rule with structured learned hyperparameters (see the module docstring)."""

    structured: ClassVar[tuple[str, ...]] = ()

    def check_param(self, group: Mapping[str, Any], param: Tensor, position: int, where: str) -> None:
        """Raise a clear error if this rule cannot update ``param`` (called at construction)."""


class LearnedOptimizer(DifferentiableOptimizer):
    """A :class:`~diffopt.optim.DifferentiableOptimizer` over a :class:`LearnedRule`.

    ``kind`` names the rule in saved files (:mod:`.serialization`).
    """

    kind: ClassVar[str] = "learned"
    rule: LearnedRule
    #: whether the rule runs on complex parameters (as ``view_as_real`` pairs); those whose state or network
    #: is built for real tensors refuse them where they are given
    supports_complex: ClassVar[bool] = True

    # -- construction ----------------------------------------------------------------
    def _check_hyper_shapes(self, group: Mapping[str, Any], param: Tensor, position: int, where: str) -> None:
        if param.is_complex() and not self.supports_complex:
            raise TypeError(f"{where}: params[{position}] is complex ({param.dtype}); {type(self).__name__} supports "
                            "real parameters only: optimize torch.view_as_real(p) instead (MLPOptimizer and "
                            "meta_sgd take complex parameters)")
        plain = {k: v for k, v in group.items() if k not in self.rule.structured}
        super()._check_hyper_shapes(plain, param, position, where)
        self.rule.check_param(group, param, position, where)

    # -- the step --------------------------------------------------------------------
    def batch_dims(self, index: int, param: Tensor) -> int:
        """Leading task dimensions of ``param`` (the ``index``-th parameter) at this call."""
        extra = param.dim() - self.base_dims[index]
        if extra < 0:
            raise ValueError(
                f"{type(self).__name__}: parameter {index} ({self.param_names[index]}) has shape "
                f"{tuple(param.shape)}, fewer dimensions than at construction ({self.base_dims[index]})"
            )
        return extra

    def tensor_hyperparameters(
        self, group: Mapping[str, Any], position: int, index: int, param: Tensor, step: int,
        shared: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """As for every optimizer, plus ``hp["batch_dims"]`` (the leading task dimensions,
        checked: a parameter may not have fewer dimensions than at construction)."""
        hp = super().tensor_hyperparameters(group, position, index, param, step, shared)
        hp["batch_dims"] = self.batch_dims(index, param)
        return hp

    def initial_states(self, params: Sequence[Tensor]) -> list[State | None]:
        # Learned rules create their state lazily (on the first step), like most torch.optim rules.
        return [None] * len(params)

    # -- learned tensors -------------------------------------------------------------
    def meta_parameters(self) -> list[Tensor]:
        """The tensors meta-training updates (every tensor hyperparameter that requires grad)."""
        return self.hyperparameter_tensors()

    # -- persistence -----------------------------------------------------------------
    def _plain_groups(self) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in g.items()
             if k not in self.rule.structured and not isinstance(v, (PerParameter, Schedule))}
            for g in self.param_groups
        ]

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state (per-parameter rule state and plain hyperparameters).

        The learned tensors are not part of it: save them with
        :func:`diffopt.optim.learned.save`.
        """
        groups = self.param_groups
        self.param_groups = self._plain_groups()
        try:
            return super().state_dict()
        finally:
            self.param_groups = groups


# -- helpers shared by the rules ---------------------------------------------------------
def check_nonfinite_policy(value: Any, where: str) -> None:
    if value not in NONFINITE_POLICIES:
        raise ValueError(f"{where}: nonfinite must be one of {NONFINITE_POLICIES}, got {value!r}")


def finite_mask(features: Tensor) -> Tensor:
    """True where every feature of a coordinate (last dimension) is finite."""
    return torch.isfinite(features.detach()).all(-1)


def guard_features(features: Tensor, policy: str, rule: str) -> tuple[Tensor, Tensor | None]:
    """Apply the non-finite policy to per-coordinate features ``(..., F)``.

    ``"raise"``: a :class:`~diffopt.optim.NonFiniteError` naming the rule and the
    count of bad coordinates. ``"skip"``: the bad coordinates' features are
    replaced by zeros (so nothing non-finite enters the network or its
    gradients) and the returned mask marks them, for :func:`keep_where`.
    """
    ok = finite_mask(features)
    if inside_torch_func():  # a user's vmap or grad: no data-dependent branch; the mask does the work
        if policy == "skip":
            return torch.where(ok.unsqueeze(-1), features, torch.zeros_like(features)), ok
        return features, None  # ("raise" cannot read the values here; the engine's checks run outside)
    if bool(ok.all()):
        return features, None
    bad = int((~ok).sum())
    if policy == "raise":
        raise NonFiniteError(
            f"{rule}: {bad} coordinate(s) have non-finite input features (an overflowed or NaN "
            "gradient); lower the learning rate, clip gradients, or build the optimizer with "
            "nonfinite='skip' to leave those coordinates (and their state) unchanged"
        )
    safe = torch.where(ok.unsqueeze(-1), features, torch.zeros_like(features))
    return safe, ok


def keep_where(ok: Tensor | None, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where ``ok`` (per coordinate), ``old`` elsewhere; ``ok`` may miss trailing dims of ``new``."""
    if ok is None:
        return new
    mask = ok.reshape(ok.shape + (1,) * (new.dim() - ok.dim()))
    return torch.where(mask, new, old)


def sanitize(grad: Tensor) -> Tensor:
    """``grad`` with non-finite entries replaced by zero (for the ``skip`` policy)."""
    return torch.where(torch.isfinite(grad.detach()), grad, torch.zeros_like(grad))


def batch_shape(param: Tensor, hp: Mapping[str, Any]) -> torch.Size:
    return param.shape[: hp.get("batch_dims", 0)]


def first_tensor(params: Any) -> Tensor:
    """The first parameter tensor of ``params`` (tensors, (name, tensor) pairs or groups); a list is materialised."""
    for item in params:
        if isinstance(item, dict):
            group = item["params"]
            group = [group] if isinstance(group, Tensor) else list(group)
            if group:
                return first_tensor(group)
            continue
        tensor = item[1] if isinstance(item, tuple) else item
        if isinstance(tensor, Tensor):
            return tensor
    raise ValueError("got an empty parameter list")
