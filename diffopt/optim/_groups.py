"""Construction of a differentiable optimizer: parameter groups, their hyperparameters
and the checks on them (unknown names with the closest valid one, ``fused=True``,
shapes that do not broadcast to the parameter), in torch.optim's conventions."""
from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._hyper import PerParameter, Schedule, is_plain, leaves
from ._rule import UpdateRule

# Options of torch.optim that have no meaning for a differentiable, out-of-place step
# (``foreach`` is honoured at the optimizer level and ignored in parameter groups).
IGNORED_TORCH_OPTIONS = ("foreach", "fused", "capturable", "differentiable")
PAIR_KEYS = ("betas", "etas", "step_sizes")


def python_numbers(value: Any) -> Any:
    """``value`` with numpy scalars (``np.float32(0.1)``, as torch.optim accepts) as Python numbers, also
    inside tuples and lists; the value is the same (a float32 widens to a float exactly)."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)) and hasattr(value, "item"):
        return value.item()
    if isinstance(value, (tuple, list)):
        return type(value)(python_numbers(v) for v in value)
    return value


class ParamGroups:
    """Mixin of :class:`~diffopt.optim.DifferentiableOptimizer`: its ``param_groups``,
    ``params``, ``param_names`` and ``defaults``, built and checked as torch.optim does."""

    rule: UpdateRule
    fixed_options: ClassVar[dict[str, Any]] = {}
    defaults: dict[str, Any]
    params: list[Tensor]
    base_dims: list[int]
    param_names: list[str]
    param_groups: list[dict[str, Any]]
    _fused_requested: bool = False

    def initial_states(self, params: Any) -> Any:  # pragma: no cover - provided by the optimizer
        raise NotImplementedError

    @property
    def _known(self) -> tuple[str, ...]:
        return tuple(self.rule.defaults)

    def _reject_unknown(self, keys: Iterable[str], where: str) -> None:
        """Refuse unknown hyperparameters (with the closest valid name) and ``fused=True``."""
        keys = list(keys)
        if "fused" in keys and self._fused_requested:
            raise ValueError(
                f"{where}: fused=True has no differentiable kernel; the differentiable step "
                "runs composite autograd ops. Leave fused unset."
            )
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
        self._fused_requested = bool(hyperparameters.get("fused"))
        self._reject_unknown(hyperparameters, type(self).__name__)
        defaults = dict(self.rule.defaults)
        defaults.update({k: python_numbers(v) for k, v in hyperparameters.items() if k not in IGNORED_TORCH_OPTIONS})
        self._refuse_changing_fixed(hyperparameters, type(self).__name__)
        defaults.update(self.fixed_options)
        return defaults

    def _refuse_changing_fixed(self, options: Mapping[str, Any], where: str) -> None:
        """A fixed option (AdamW's ``decoupled_weight_decay=True``) given another value is an error, not ignored."""
        for key, fixed in self.fixed_options.items():
            if key in options and options[key] != fixed:
                raise TypeError(
                    f"{where}: {key}={options[key]!r} is not available: {type(self).__name__} always has "
                    f"{key}={fixed!r}" + (" (for a weight decay added to the gradient use Adam(weight_decay=...))"
                                          if key == "decoupled_weight_decay" else ""))

    @staticmethod
    def _groups_from(params: Iterable[Any]) -> list[dict[str, Any]]:
        if isinstance(params, nn.Module):
            raise TypeError(
                f"params: got the module {type(params).__name__}; pass its parameters, "
                f"{type(params).__name__.lower()}.parameters(). The optimizer's step returns new tensors instead "
                "of changing the module, so compute each loss from them (or let diffopt.innerloop(net, opt) "
                "patch the module for you)"
            )
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
        self._fused_requested = bool(group.get("fused"))
        self._reject_unknown((k for k in group if k not in ("params", "name", "initial_lr")), where)
        raw = group["params"]
        raw = [raw] if isinstance(raw, Tensor) else list(raw)
        full = {k: v for k, v in self.defaults.items()}
        full.update({k: python_numbers(v) for k, v in group.items()
                     if k != "params" and k not in IGNORED_TORCH_OPTIONS})
        self._refuse_changing_fixed(group, where)
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
            if key == "params" or is_plain(value):  # (a number, flag or name has no shape to check)
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
