"""The stateful wrapper around a pure update rule: ``DifferentiableOptimizer``.

``opt.step(loss)`` differentiates ``loss`` with respect to the current parameters
(with ``create_graph=True`` unless ``first_order``), applies the gradient
transforms, runs the update rule and returns the new parameters, connected to
the graph. Nothing is written in place: a loss computed after any number of
steps can be differentiated with respect to the initial parameters and every
tensor hyperparameter.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor

from ..errors import NonFiniteError
from ._gradients import check_finite_gradients, loss_gradients
from ._groups import IGNORED_TORCH_OPTIONS, PAIR_KEYS, ParamGroups  # noqa: F401 - re-exported
from ._hyper import (VariesByParameter, constants_as_numbers, is_plain, is_plain_number, leaves, resolve,
                     resolve_shared)
from ._rule import State, UpdateRule, inside_torch_func, per_element_in_param_dtype, update_one_like_torch
from ._state_dict import StateDict
from .transforms import GradTransform, build_transforms

__all__ = ["DifferentiableOptimizer", "IGNORED_TORCH_OPTIONS", "NonFiniteError", "PAIR_KEYS"]


class DifferentiableOptimizer(ParamGroups, StateDict):
    """A differentiable twin of a torch.optim optimizer.

    Args:
        params: tensors, ``(name, tensor)`` pairs, or parameter-group dicts, as for torch.optim.
        first_order: compute gradients without a graph through them (first-order
            MAML). The update itself stays differentiable, so tensor
            hyperparameters still receive gradients.
        check_finite: raise :class:`NonFiniteError` naming the step and parameter
            when the loss or a gradient is NaN or infinite.
        clip_grad_norm: rescale the gradients (over all parameters) to at most this
            global L2 norm, differentiably, as ``torch.nn.utils.clip_grad_norm_``.
        clip_grad_value: clamp every gradient element to ``[-v, v]``.
        grad_transform: ``f(grads, step) -> grads`` applied after clipping.
        foreach: ``None`` or ``True`` (default): update a parameter group whose
            hyperparameters are plain numbers (``lr`` may also be a 0-dim tensor) with multi-tensor
            (``torch._foreach_*``) operations, one dispatch per operation for the
            whole group; ``False``: always update tensor by tensor. Both give
            torch.optim's values; groups with other tensor or per-parameter
            hyperparameters always go tensor by tensor.
        **hyperparameters: the torch.optim namesake's arguments (``fused``,
            ``capturable`` and ``differentiable`` are accepted and ignored; ``fused=True``
            is refused).
    """

    rule_class: ClassVar[type[UpdateRule]] = UpdateRule
    fixed_options: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        params: Iterable[Any],
        *,
        first_order: bool = False,
        check_finite: bool = False,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        grad_transform: GradTransform | None = None,
        foreach: bool | None = None,
        **hyperparameters: Any,
    ) -> None:
        self.rule = self.rule_class()
        if foreach not in (None, True, False):
            raise TypeError(f"{type(self).__name__}: foreach must be None, True or False, got {foreach!r}")
        self.foreach = foreach is not False
        self.first_order = bool(first_order)
        self.check_finite = bool(check_finite)
        self.transforms = build_transforms(clip_grad_norm, clip_grad_value, grad_transform)
        self.defaults = self._defaults_from(hyperparameters)
        self.params: list[Tensor] = []
        self.base_dims: list[int] = []  # dimensions of each parameter as constructed (no task dimension)
        self.param_names: list[str] = []
        self.param_groups: list[dict[str, Any]] = []
        for group in self._groups_from(params):
            self.add_param_group(group)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        self.step_count = 0
        self.state: list[State | None] = self.initial_states(self.params)

    # -- hyperparameters -------------------------------------------------------------
    def _hp(self, group: Mapping[str, Any], position: int, step: int) -> dict[str, Any]:
        # (a tensor through which no derivative flows is read as a number, as torch.optim reads it)
        return constants_as_numbers({k: resolve(v, k, position, step) for k, v in group.items() if k != "params"},
                                    getattr(self.rule, "structured", ()))

    def hyperparameter_tensors(self) -> list[Tensor]:
        """Every tensor hyperparameter that requires grad, once each (for meta-gradients)."""
        found: dict[int, Tensor] = {}
        for group in self.param_groups:
            for key, value in group.items():
                if key == "params":
                    continue
                for leaf in leaves(value):
                    if isinstance(leaf, Tensor) and leaf.requires_grad:
                        found.setdefault(id(leaf), leaf)
        return list(found.values())

    def bound_to(self, params: Sequence[Tensor], *, first_order: bool | None = None) -> DifferentiableOptimizer:
        """A working copy that steps ``params`` (one tensor per parameter, same shapes, e.g. a
        patched model's fast weights) with this optimizer's groups, hyperparameters, state and
        step count; ``first_order`` overrides the setting. ``self`` is left untouched, so an
        optimizer can start any number of inner loops, as a torch.optim one can."""
        current = self._current(params)
        clone = copy.copy(self)
        clone.params = current
        clone.state = list(self.state)
        if first_order is not None:
            clone.first_order = bool(first_order)
        return clone

    def apply_override(self, override: Mapping[str, Sequence[Any]], where: str = "override") -> None:
        """Set hyperparameters as higher's ``override=`` does: ``{name: [value]}`` sets ``name``
        in every parameter group, ``{name: [v0, v1, ...]}`` (one value per group) group by group.

        Values may be tensors that require grad (the meta-gradient reaches them through
        every later step). As in higher, the values stay in effect for the following steps
        until overridden again. The groups are replaced, not edited: an optimizer that
        :meth:`bound_to` copied this one from keeps its own hyperparameters.
        """
        if not isinstance(override, Mapping):
            raise TypeError(f"{where}: expected a dict {{name: [value, ...]}}, got {type(override).__name__}")
        self._reject_unknown(override, where)
        groups = [dict(g) for g in self.param_groups]
        for key, values in override.items():
            if isinstance(values, (Tensor, str)) or not isinstance(values, Sequence):
                raise TypeError(
                    f"{where}: {key!r} must be a list of one value (for every group) or of one value per "
                    f"group ({len(groups)}), as in higher; got {type(values).__name__}: wrap it, [{key}]"
                )
            if len(values) not in (1, len(groups)):
                raise ValueError(
                    f"{where}: {key!r} has {len(values)} values but the optimizer has {len(groups)} parameter "
                    "groups; give one value for all of them or one per group"
                )
            for k, group in enumerate(groups):
                value = values[0] if len(values) == 1 else values[k]
                if key in PAIR_KEYS and isinstance(value, list):
                    value = tuple(value)
                group[key] = value
                self.rule.validate_group(group, f"{where} (group {k})")
                for position, i in enumerate(group["params"]):
                    self._check_hyper_shapes({key: value, "params": group["params"]}, self.params[i], position,
                                             f"{where} (group {k})")
        self.param_groups = groups

    # -- the step --------------------------------------------------------------------
    def step(
        self,
        loss: Tensor | None = None,
        params: Sequence[Tensor] | None = None,
        *,
        grads: Sequence[Tensor | None] | None = None,
        override: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[Tensor]:
        """Take one differentiable step and return the new parameters.

        Args:
            loss: a scalar tensor depending on ``params``.
            params: the current parameters (default: ``self.params``); the same
                number, shapes and order as at construction.
            grads: gradients to use instead of differentiating ``loss``.
            override: higher's per-step hyperparameters, applied before this step
                (see :meth:`apply_override`), e.g. ``{"lr": [lr_tensor]}``.
        """
        if override is not None:
            self.apply_override(override)
        current = self._current(params)
        if grads is None:
            grads = loss_gradients(loss, current, self.step_count, first_order=self.first_order,
                                   check_finite=self.check_finite, check_graph=self.step_count == 0)
        else:
            grads = list(grads)
            if len(grads) != len(current):
                raise ValueError(f"step: got {len(grads)} gradients for {len(current)} parameters")
        grads = self.transforms(grads, self.step_count)
        self._check_gradient_shapes(grads, current)
        if self.check_finite:
            check_finite_gradients(grads, self.param_names, self.step_count)
        self.params, self.state = self.update(current, grads, self.state, self.step_count)
        self.step_count += 1
        return list(self.params)

    def _check_gradient_shapes(self, grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> None:
        """Refuse a gradient (``grads=`` or a ``grad_transform``'s) whose shape or dtype is not its
        parameter's: broadcasting would silently change the parameter's shape."""
        for i, (g, p) in enumerate(zip(grads, params)):
            if g is not None and (g.shape != p.shape or g.dtype != p.dtype):
                raise ValueError(
                    f"step {self.step_count}: the gradient of parameter {i} ({self.param_names[i]}) has shape "
                    f"{tuple(g.shape)} and dtype {g.dtype}, but the parameter has shape {tuple(p.shape)} and dtype "
                    f"{p.dtype}; give one gradient per parameter, in its shape and dtype (grads= or grad_transform)"
                )

    def update(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        states: Sequence[State | None],
        step: int,
    ) -> tuple[list[Tensor], list[State | None]]:
        """Pure: one update of every group at optimizer step ``step`` (0-based).

        Parameters whose gradient is ``None`` are left unchanged, with their
        state, as torch.optim does. Works on parameters with a leading task
        dimension (state is created with the parameters' shape); rules that
        reduce over a tensor read ``hp["task_dims"]``, the number of leading task
        dimensions, and must not reduce over them.
        """
        new_params, new_states = list(params), list(states)
        for group in self.param_groups:
            members = [(position, i) for position, i in enumerate(group["params"]) if grads[i] is not None]
            if not members:
                continue  # (resolving would call schedules for a step this group does not take)
            shared = self._shared_hp(group, step)
            if shared is not None:
                members = self._update_at_once(members, shared, params, grads, new_params, new_states)
            for position, i in members:
                hp = self.tensor_hyperparameters(group, position, i, params[i], step, shared)
                state = new_states[i]
                if state is None:
                    state = self.rule.init_state(params[i], hp)
                new_params[i], new_states[i] = update_one_like_torch(self.rule, params[i], grads[i], state, hp)
        return new_params, new_states

    def tensor_hyperparameters(
        self, group: Mapping[str, Any], position: int, index: int, param: Tensor, step: int,
        shared: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """What :meth:`UpdateRule.update_one` receives for parameter ``index`` (at ``position``
        in ``group``) at ``step``: the group's hyperparameters resolved for it (``shared``
        when they are the same for the whole group) and ``task_dims``, the number of
        leading task dimensions ``param`` has beyond its shape at construction."""
        hp = per_element_in_param_dtype(param, dict(shared) if shared is not None else self._hp(group, position, step))
        hp["task_dims"] = param.dim() - self.base_dims[index]
        return hp

    def _shared_hp(self, group: Mapping[str, Any], step: int) -> dict[str, Any] | None:
        """The group's hyperparameters at ``step`` if every parameter shares them, else ``None``.

        A group of plain numbers resolves to the same values at every step: that resolution is
        kept while the group holds the very same values (a value set anew is resolved again)."""
        values = [(k, v) for k, v in group.items() if k != "params"]
        cache = self.__dict__.setdefault("_resolved_groups", {})
        kept = cache.get(id(group))
        if kept is not None and len(kept[0]) == len(values) and all(
                a[0] == b[0] and a[1] is b[1] for a, b in zip(kept[0], values)):
            return dict(kept[1])
        try:
            shared = {k: resolve_shared(v, k, step) for k, v in values}
        except VariesByParameter:
            return None
        shared = constants_as_numbers(shared, getattr(self.rule, "structured", ()))
        if all(is_plain(v) for _, v in values):
            cache[id(group)] = (values, shared)
        return dict(shared)

    def _update_at_once(
        self,
        members: list[tuple[int, int]],
        hp: dict[str, Any],
        params: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        new_params: list[Tensor],
        new_states: list[State | None],
    ) -> list[tuple[int, int]]:
        """Update ``members`` (``(position in group, index)`` pairs) with the rule's multi-tensor
        step, one call per set of tensors at the same step count; return those left for the
        per-tensor path."""
        if not (self.foreach and self.rule.has_group_update()) or inside_torch_func():
            return members  # (torch.func.vmap has no batching rules for the _foreach_* operations)
        if not all(is_plain_number(hp[key]) or (key == "lr" and self._scalar_tensor_lr(hp[key]))
                   for key in self.rule.defaults if key in hp):
            return members  # tensor hyperparameters (learnable, per element) go tensor by tensor
        states = {i: new_states[i] if new_states[i] is not None else self.rule.init_state(params[i], hp)
                  for _, i in members if not params[i].is_complex() and not self._lr_promotes(params[i], hp)}
        by_step: dict[Any, list[int]] = {}
        for i, state in states.items():  # tensors that missed steps (no gradient) are behind
            by_step.setdefault(state.get("step"), []).append(i)
        done: set[int] = set()
        for indices in by_step.values():
            group_grads: list[Tensor] = [grads[i] for i in indices]  # type: ignore[misc]
            result = self.rule.update_group([params[i] for i in indices], group_grads, [states[i] for i in indices], hp)
            if result is not None:
                for i, p, s in zip(indices, *result):
                    new_params[i], new_states[i] = p, s
                done.update(indices)
        return [(position, i) for position, i in members if i not in done]

    @staticmethod
    def _lr_promotes(param: Tensor, hp: Mapping[str, Any]) -> bool:
        """A 0-dim parameter and a tensor lr of another dtype (left to the per-tensor path, which keeps
        the parameter's dtype)."""
        lr = hp.get("lr")
        return param.dim() == 0 and isinstance(lr, Tensor) and lr.dtype != param.dtype

    def _scalar_tensor_lr(self, lr: Any) -> bool:
        """A 0-dim floating-point tensor lr, which the rule's multi-tensor step takes."""
        return (self.rule.group_update_takes_tensor_lr() and isinstance(lr, Tensor) and lr.dim() == 0
                and lr.is_floating_point())

    def initial_states(self, params: Sequence[Tensor]) -> list[State | None]:
        """Fresh state for ``params``: created now only for rules torch initialises eagerly (Adagrad)."""
        states: list[State | None] = [None] * len(params)
        if getattr(self.rule, "eager_state", False):
            for group in self.param_groups:
                for position, i in enumerate(group["params"]):
                    states[i] = self.rule.init_state(params[i], self._hp(group, position, 0))
        return states

    def _current(self, params: Sequence[Tensor] | None) -> list[Tensor]:
        if params is None:
            return list(self.params)
        params = list(params)
        if len(params) != len(self.params):
            raise ValueError(
                f"step(params=...): got {len(params)} tensors but the optimizer has "
                f"{len(self.params)} parameters; pass them in the construction order"
            )
        for i, (new, old) in enumerate(zip(params, self.params)):
            if new.shape != old.shape and new.shape[1:] != old.shape:
                raise ValueError(
                    f"step(params=...): parameter {i} ({self.param_names[i]}) has shape "
                    f"{tuple(new.shape)}, expected {tuple(old.shape)}"
                )
        return params

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for k, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {k}")
            for key, value in g.items():
                if key != "params":
                    lines.append(f"    {key}: {value}")
        return "\n".join(lines) + "\n)"
