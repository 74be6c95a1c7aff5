"""The stateful wrapper around a pure update rule: ``DifferentiableOptimizer``.

``opt.step(loss)`` differentiates ``loss`` with respect to the current parameters
(with ``create_graph=True`` unless ``first_order``), applies the gradient
transforms, runs the update rule and returns the new parameters, connected to
the graph. Nothing is written in place: a loss computed after any number of
steps can be differentiated with respect to the initial parameters and every
tensor hyperparameter.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._hyper import (
    PerParameter, Schedule, VariesByParameter, constants_as_numbers, is_plain_number, leaves, resolve, resolve_shared,
)
from ._rule import State, UpdateRule, inside_torch_func, update_one_like_torch
from .transforms import GradTransform, build_transforms

__all__ = ["DifferentiableOptimizer", "NonFiniteError"]

# Options of torch.optim that have no meaning for a differentiable, out-of-place step
# (``foreach`` is honoured at the optimizer level and ignored in parameter groups).
IGNORED_TORCH_OPTIONS = ("foreach", "fused", "capturable", "differentiable")
PAIR_KEYS = ("betas", "etas", "step_sizes")


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or infinite during an inner step."""


class DifferentiableOptimizer:
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

    # -- construction ----------------------------------------------------------------
    @property
    def _known(self) -> tuple[str, ...]:
        return tuple(self.rule.defaults)

    def _reject_unknown(self, keys: Iterable[str], where: str) -> None:
        for key in keys:
            if key in self._known or key in IGNORED_TORCH_OPTIONS:
                continue
            close = difflib.get_close_matches(key, self._known + ("first_order", "check_finite"), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            valid = ", ".join(self._known)
            raise TypeError(
                f"{where}: unknown argument {key!r}{hint} Valid hyperparameters: {valid}"
            )

    def _defaults_from(self, hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
        name = type(self).__name__
        self._reject_unknown(hyperparameters, name)
        for key in IGNORED_TORCH_OPTIONS:
            if hyperparameters.get(key) and key == "fused":
                raise ValueError(
                    f"{name}: fused=True has no differentiable kernel; the differentiable step "
                    "runs composite autograd ops. Leave fused unset."
                )
        defaults = dict(self.rule.defaults)
        defaults.update({k: v for k, v in hyperparameters.items() if k not in IGNORED_TORCH_OPTIONS})
        defaults.update(self.fixed_options)
        return defaults

    @staticmethod
    def _groups_from(params: Iterable[Any]) -> list[dict[str, Any]]:
        if isinstance(params, Tensor):
            raise TypeError(
                "params: expected an iterable of tensors or of parameter-group dicts, got a "
                "single tensor; wrap it in a list: [tensor]"
            )
        items = list(params)
        if items and isinstance(items[0], dict):
            return [dict(g) for g in items]
        return [{"params": items}]

    def add_param_group(self, group: dict[str, Any]) -> None:
        """Add a group (a dict with ``"params"`` and any hyperparameter overrides)."""
        where = f"{type(self).__name__} parameter group {len(self.param_groups)}"
        if "params" not in group:
            raise ValueError(f"{where}: a parameter group needs a 'params' entry")
        self._reject_unknown((k for k in group if k not in ("params", "name", "initial_lr")), where)
        if group.get("fused"):
            raise ValueError(
                f"{where}: fused=True has no differentiable kernel; the differentiable step "
                "runs composite autograd ops. Leave fused unset."
            )
        raw = group["params"]
        raw = [raw] if isinstance(raw, Tensor) else list(raw)
        full = {k: v for k, v in self.defaults.items()}
        full.update({k: v for k, v in group.items() if k != "params" and k not in IGNORED_TORCH_OPTIONS})
        full.update(self.fixed_options)
        for key in PAIR_KEYS:
            if isinstance(full.get(key), list):
                full[key] = tuple(full[key])
        self.rule.validate_group(full, where)
        indices = []
        for j, item in enumerate(raw):
            name, tensor = (item if isinstance(item, tuple) else (None, item))
            if not isinstance(tensor, Tensor):
                raise TypeError(f"{where}: params[{j}] is a {type(tensor).__name__}, not a tensor")
            if not (tensor.is_floating_point() or tensor.is_complex()):
                raise TypeError(
                    f"{where}: params[{j}] has dtype {tensor.dtype}; only floating-point tensors can be optimized"
                )
            if any(tensor is p for p in self.params):
                raise ValueError(
                    f"{where}: params[{j}] appears more than once; tied weights must be passed once"
                )
            self._check_hyper_shapes(full, tensor, len(indices), where)
            indices.append(len(self.params))
            self.params.append(tensor)
            self.base_dims.append(tensor.dim())
            self.param_names.append(name or f"group{len(self.param_groups)}.params[{j}]")
        full["params"] = indices
        self.param_groups.append(full)
        if hasattr(self, "state"):
            fresh = self.initial_states(self.params)
            self.state.extend(fresh[i] for i in indices)

    def _check_hyper_shapes(self, group: Mapping[str, Any], param: Tensor, position: int, where: str) -> None:
        for key, value in group.items():
            if key == "params":
                continue
            # A pair (betas, etas, step_sizes) is checked entry by entry, so that an entry may
            # itself be a PerParameter of per-element tensors.
            for part in value if isinstance(value, tuple) else (value,):
                self._check_hyper_shape(key, part, group, param, position, where)

    def _check_hyper_shape(
        self, key: str, value: Any, group: Mapping[str, Any], param: Tensor, position: int, where: str
    ) -> None:
        if isinstance(value, PerParameter):
            n = len(group["params"]) if isinstance(group.get("params"), (list, tuple)) else None
            value = value.values[position] if position < len(value) else None
            if value is None:
                raise ValueError(
                    f"{where}: hyperparameter {key!r} is PerParameter with fewer values than "
                    f"the group has parameters{'' if n is None else f' ({n})'}"
                )
        for leaf in leaves(value):
            if not isinstance(leaf, Tensor) or leaf.numel() == 1:
                continue
            shape = leaf.shape[1:] if isinstance(value, Schedule) else leaf.shape
            try:
                broadcast = torch.broadcast_shapes(shape, param.shape)
            except RuntimeError:
                broadcast = None
            if broadcast != param.shape:
                raise ValueError(
                    f"{where}: hyperparameter {key!r} has shape {tuple(shape)}, which does not "
                    f"broadcast to the parameter's shape {tuple(param.shape)}. Use a scalar, a "
                    "tensor of the parameter's shape, or PerParameter([...]) with one value per "
                    "parameter."
                )

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

    # -- the step --------------------------------------------------------------------
    def step(
        self,
        loss: Tensor | None = None,
        params: Sequence[Tensor] | None = None,
        *,
        grads: Sequence[Tensor | None] | None = None,
    ) -> list[Tensor]:
        """Take one differentiable step and return the new parameters.

        Args:
            loss: a scalar tensor depending on ``params``.
            params: the current parameters (default: ``self.params``); the same
                number, shapes and order as at construction.
            grads: gradients to use instead of differentiating ``loss``.
        """
        current = self._current(params)
        if grads is None:
            grads = self._gradients(loss, current)
        else:
            grads = list(grads)
            if len(grads) != len(current):
                raise ValueError(f"step: got {len(grads)} gradients for {len(current)} parameters")
        grads = self.transforms(grads, self.step_count)
        if self.check_finite:
            self._check_finite_grads(grads)
        self.params, self.state = self.update(current, grads, self.state, self.step_count)
        self.step_count += 1
        return list(self.params)

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
        hp = dict(shared) if shared is not None else self._hp(group, position, step)
        hp["task_dims"] = param.dim() - self.base_dims[index]
        return hp

    def _shared_hp(self, group: Mapping[str, Any], step: int) -> dict[str, Any] | None:
        """The group's hyperparameters at ``step`` if every parameter shares them, else ``None``."""
        try:
            shared = {k: resolve_shared(v, k, step) for k, v in group.items() if k != "params"}
        except VariesByParameter:
            return None
        return constants_as_numbers(shared, getattr(self.rule, "structured", ()))

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

    def _gradients(self, loss: Tensor | None, params: list[Tensor]) -> list[Tensor | None]:
        step = self.step_count
        if loss is None:
            raise TypeError("step(loss): a loss tensor is required (or pass grads=...)")
        if not isinstance(loss, Tensor):
            raise TypeError(f"step(loss): loss must be a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(
                f"step(loss) at step {step}: the loss must be a scalar, got shape "
                f"{tuple(loss.shape)}; reduce it with .sum() or .mean() (for a batch of "
                "independent tasks, .sum() gives each task its own gradient)"
            )
        if self.check_finite and not torch.isfinite(loss.detach()).all():
            raise NonFiniteError(
                f"step {step}: the loss is {loss.item()}; lower the learning rate, clip "
                "gradients (clip_grad_norm=...) or check the inputs"
            )
        wanted = [i for i, p in enumerate(params) if p.requires_grad]
        if not wanted or not loss.requires_grad:
            raise ValueError(
                f"step(loss) at step {step}: the loss does not depend on any parameter that "
                "requires grad; create the parameters with requires_grad=True (or call "
                "requires_grad_()), and do not compute the loss under torch.no_grad()"
            )
        computed = torch.autograd.grad(
            loss.reshape(()),
            [params[i] for i in wanted],
            create_graph=not self.first_order and torch.is_grad_enabled(),
            allow_unused=True,
        )
        grads: list[Tensor | None] = [None] * len(params)
        for i, g in zip(wanted, computed):
            grads[i] = g
        return grads

    def _check_finite_grads(self, grads: Sequence[Tensor | None]) -> None:
        for i, g in enumerate(grads):
            if g is not None and not torch.isfinite(g.detach()).all():
                raise NonFiniteError(
                    f"step {self.step_count}: the gradient of parameter {i} "
                    f"({self.param_names[i]}) is not finite; lower the learning rate, clip "
                    "gradients (clip_grad_norm=...) or check the loss"
                )

    # -- persistence -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: ``state`` keyed by parameter index, plus ``param_groups``.

        Tensors are detached, so the result can be saved and loaded with
        ``torch.load(..., weights_only=True)``.
        """
        def plain(value: Any) -> Any:
            if isinstance(value, Tensor):
                return value.detach().clone()
            if isinstance(value, tuple):
                return tuple(plain(v) for v in value)
            if isinstance(value, (PerParameter, Schedule)):
                raise TypeError(
                    "state_dict: PerParameter and Schedule hyperparameters are not saved; "
                    "store their tensors yourself"
                )
            return value

        state = {
            i: {k: plain(v) for k, v in s.items()} for i, s in enumerate(self.state) if s is not None
        }
        groups = []
        for g in self.param_groups:
            groups.append({k: (list(v) if k == "params" else plain(v)) for k, v in g.items()})
        return {"state": state, "param_groups": groups, "step_count": self.step_count}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` or from the torch.optim namesake."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"load_state_dict: the state dict has {len(groups)} parameter groups, this "
                f"optimizer has {len(self.param_groups)}"
            )
        mapping: dict[int, int] = {}
        for k, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(
                    f"load_state_dict: group {k} has {len(saved['params'])} parameters in the "
                    f"state dict and {len(mine['params'])} here"
                )
            mapping.update(zip(saved["params"], mine["params"]))
            for key, value in saved.items():
                if key in mine and key != "params":
                    mine[key] = tuple(value) if key in PAIR_KEYS else value
        self.state = [None] * len(self.params)
        for saved_index, s in state_dict["state"].items():
            i = mapping[int(saved_index)]
            self.state[i] = self.rule.state_from_torch(dict(s), self.params[i])
        self.step_count = int(state_dict.get("step_count", 0))

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for k, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {k}")
            for key, value in g.items():
                if key != "params":
                    lines.append(f"    {key}: {value}")
        return "\n".join(lines) + "\n)"
