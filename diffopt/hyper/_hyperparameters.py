r"""Which hyperparameters a tuner changes, and how each is kept in its valid range.

A :class:`Tuned` names one hyperparameter of a :class:`~diffopt.optim.DifferentiableOptimizer`'s
parameter groups (``"lr"``, ``"weight_decay"``, ``"momentum"``, ``"beta1"`` / ``"beta2"`` — the two
entries of ``betas`` —, ``"alpha"``, ``"eps"``, ...) or an attribute of its learning-rate scheduler
(``"scheduler.gamma"``, ``"scheduler.eta_min"``, ...) or a number a scheduler keeps in every group and
reads at each step (``OneCycleLR``'s ``"max_lr"``, the peak; its ``"initial_lr"`` and ``"min_lr"``,
the start and the end, stay as they are unless tuned too), and a *scope*:

* ``"global"``: one scalar shared by every parameter group;
* ``"group"``: one scalar per parameter group (per-layer learning rates, when each layer is a group);
* ``"element"``: one value per element of every parameter (per-parameter learning rates).

The tuner does not move the value :math:`\lambda` itself but an unconstrained *raw* value :math:`u`
with :math:`\lambda = T(u)`, so every meta-step lands inside the valid range:

* ``"log"``: :math:`\lambda = e^u \in (0, \infty)`, the default for ``lr``, ``weight_decay``, ``eps``
  and other positive values;
* ``"logit"``: :math:`\lambda = \sigma(u) \in (0, 1)`, the default for ``momentum``, ``beta1``,
  ``beta2``, ``alpha``, ``rho``, ``dampening`` and a scheduler's ``gamma``, ``factor`` or ``pct_start``;
* ``"softplus"``: :math:`\lambda = \log(1 + e^u) > 0` (on request: additive near 0, e.g. a weight decay);
* ``"identity"``: :math:`\lambda = u` (on request).

Under a :class:`~diffopt.optim.lr_scheduler.LambdaLR`, which sets the rate of step :math:`t` to
:math:`\eta_t = \eta\, f(t)` from its base rate :math:`\eta` (``base_lrs``), ``"lr"`` names the base
rate :math:`\eta`: writing it sets ``base_lrs`` and the current step's rate :math:`\eta f(t)`, exactly
what the scheduler would have written, so a schedule's shape (a warm-up, e.g.) stays and the tuner
moves its scale, and the hypergradient reaches every step of a window through :math:`\eta f(t)`.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..optim import DifferentiableOptimizer, PerParameter, Schedule
from ..optim.lr_scheduler import LambdaLR

__all__ = ["Tuned", "TRANSFORMS", "parse_hyperparameters"]

SCOPES = ("global", "group", "element")
SCHEDULER_PREFIX = "scheduler."
BETAS = {"beta1": 0, "beta2": 1}


def _inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


#: name -> (T, T^{-1}, the open range T maps onto, for messages)
TRANSFORMS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], str]] = {
    "log": (torch.exp, torch.log, "(0, inf)"),
    "logit": (torch.sigmoid, torch.logit, "(0, 1)"),
    "softplus": (F.softplus, _inverse_softplus, "(0, inf)"),
    "identity": (lambda u: u, lambda x: x, "(-inf, inf)"),
}
_UNIT_INTERVAL = {"momentum", "betas", "beta1", "beta2", "alpha", "rho", "dampening", "gamma", "factor", "start_factor",
                  "end_factor", "pct_start"}


@dataclass(frozen=True)
class Tuned:
    """One hyperparameter to tune: ``name`` (a parameter-group key, ``"beta1"``/``"beta2"``, or
    ``"scheduler.<attribute>"``), ``scope`` (``"global"``, ``"group"`` or ``"element"``) and
    ``transform`` (``"log"``, ``"logit"``, ``"softplus"``, ``"identity"``; default by name, module
    docstring)."""

    name: str
    scope: str = "global"
    transform: str | None = None

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"Tuned({self.name!r}): scope must be one of {SCOPES}, got {self.scope!r}")
        if self.transform is None:
            key = self.attribute if self.on_scheduler else self.name
            object.__setattr__(self, "transform", "logit" if key in _UNIT_INTERVAL else "log")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"Tuned({self.name!r}): transform must be one of {sorted(TRANSFORMS)}, "
                             f"got {self.transform!r}")
        if self.on_scheduler and self.scope == "element":
            raise ValueError(f"Tuned({self.name!r}): a scheduler attribute is one value (or one per group); "
                             "use scope 'global' or 'group'")

    @property
    def on_scheduler(self) -> bool:
        return self.name.startswith(SCHEDULER_PREFIX)

    @property
    def attribute(self) -> str:
        """The scheduler attribute (``"gamma"`` for ``"scheduler.gamma"``)."""
        return self.name[len(SCHEDULER_PREFIX):]

    def scales_schedule(self, scheduler: Any) -> bool:
        """Whether this is ``"lr"`` under a :class:`~diffopt.optim.lr_scheduler.LambdaLR`, i.e. the base
        rate that the scheduler multiplies by its factor of the step (module docstring)."""
        return self.name == "lr" and isinstance(scheduler, LambdaLR)

    def natural(self, raw: Sequence[Tensor]) -> list[Tensor]:
        """:math:`\\lambda = T(u)` for every raw tensor."""
        forward = TRANSFORMS[self.transform][0]  # type: ignore[index]
        return [forward(u) for u in raw]

    # -- reading the current values ------------------------------------------------------
    def initial_raw(self, optimizer: DifferentiableOptimizer, scheduler: Any) -> list[Tensor]:
        """:math:`u = T^{-1}(\\lambda)` of the current values, as leaf tensors in the parameters' dtype."""
        dtype, device = optimizer.params[0].dtype, optimizer.params[0].device
        if self.on_scheduler or self.scales_schedule(scheduler):
            value = getattr(scheduler, "base_lrs" if self.scales_schedule(scheduler) else self.attribute)
            per_group = list(value) if isinstance(value, (list, tuple)) else [value] * len(optimizer.param_groups)
            where = [f"{self.name}[{k}]" for k in range(len(per_group))] if isinstance(value, (list, tuple)) \
                else [self.name] * len(per_group)
        else:
            per_group = [self._read(group, k) for k, group in enumerate(optimizer.param_groups)]
            where = [f"param_groups[{k}][{self._key_text()}]" for k in range(len(per_group))]
        numbers = [float(v.detach()) if isinstance(v, Tensor) else float(v) for v in per_group]
        if self.scope == "global":
            if len(set(numbers)) > 1:
                raise ValueError(f"tuning {self.name!r} with scope 'global': the parameter groups have different "
                                 f"values {numbers}; use scope 'group' (one value per group), or give the groups "
                                 "one value")
            numbers, where = numbers[:1], where[:1]
        if self.scope == "element":
            group_of = {i: k for k, group in enumerate(optimizer.param_groups) for i in group["params"]}
            values = [torch.full_like(p, numbers[group_of[i]], dtype=dtype) for i, p in enumerate(optimizer.params)]
        else:
            values = [torch.tensor(n, dtype=dtype, device=device) for n in numbers]
        low, high = {"log": (0, None), "softplus": (0, None), "logit": (0, 1), "identity": (None, None)}[
            self.transform]  # type: ignore[index]
        range_text = TRANSFORMS[str(self.transform)][2]
        for number, text in zip(numbers, where):
            if (low is not None and not number > low) or (high is not None and not number < high):
                raise ValueError(
                    f"tuning {self.name!r}: {text} is {number}, outside the open range "
                    f"{range_text} of its {self.transform!r} reparameterisation, so it cannot "
                    f"be moved by gradient; start it inside (e.g. {0.9 if high == 1 else 1e-4}), or pass "
                    f"Tuned({self.name!r}, transform='identity')"
                )
        inverse = TRANSFORMS[self.transform][1]  # type: ignore[index]
        return [inverse(v).detach().requires_grad_() for v in values]

    def _key_text(self) -> str:
        return f"'betas'][{BETAS[self.name]}" if self.name in BETAS else repr(self.name)

    def _read(self, group: Mapping[str, Any], k: int) -> Any:
        value = group["betas"][BETAS[self.name]] if self.name in BETAS else group[self.name]
        if isinstance(value, (PerParameter, Schedule)) or (isinstance(value, Tensor) and value.dim() > 0):
            raise TypeError(f"tuning {self.name!r}: param_groups[{k}] holds a {type(value).__name__} "
                            f"({value!r:.60}); the tuner starts from a number per group. Give the group a number "
                            "(the tuner sets per-element values itself with scope='element')")
        if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
            raise TypeError(f"tuning {self.name!r}: param_groups[{k}] holds {value!r}, not a number")
        return value

    # -- writing values -------------------------------------------------------------------
    def write(self, optimizer: DifferentiableOptimizer, scheduler: Any, values: Sequence[Any]) -> None:
        """Put ``values`` (one per scope unit: 1, one per group, or one per parameter) into the
        optimizer's groups (replaced, not edited) or onto the scheduler."""
        if self.on_scheduler:
            current = getattr(scheduler, self.attribute)
            if isinstance(current, (list, tuple)):
                per_group = list(values) if self.scope == "group" else [values[0]] * len(current)
                setattr(scheduler, self.attribute, per_group)
            else:
                setattr(scheduler, self.attribute, values[0])
            return
        if self.scales_schedule(scheduler):  # the base rates, and this step's rates from them, as LambdaLR's
            bases = [values[k if self.scope == "group" else 0] for k in range(len(optimizer.param_groups))]
            scheduler.base_lrs = bases  # a new list: snapshots share the old one
            groups = [dict(group) for group in optimizer.param_groups]
            for group, base, factor in zip(groups, bases, scheduler.lr_lambdas, strict=True):
                group["lr"] = base * factor(scheduler.last_epoch)
            optimizer.param_groups = groups
            return
        groups = []
        for k, group in enumerate(optimizer.param_groups):
            group = dict(group)
            if self.scope == "element":
                value: Any = PerParameter([values[i] for i in group["params"]])
            else:
                value = values[k if self.scope == "group" else 0]
            if self.name in BETAS:
                betas = list(group["betas"])
                betas[BETAS[self.name]] = value
                group["betas"] = tuple(betas)
            else:
                group[self.name] = value
            groups.append(group)
        optimizer.param_groups = groups

    def commit(self, optimizer: DifferentiableOptimizer, scheduler: Any, raw: Sequence[Tensor]) -> None:
        """Write the values of ``raw`` as constants: Python floats for scalars (so the optimizer takes
        torch.optim's multi-tensor path), detached tensors per element."""
        with torch.no_grad():
            values = [float(v) if v.dim() == 0 else v.detach().clone() for v in self.natural(raw)]
        self.write(optimizer, scheduler, values)

    def units(self, optimizer: DifferentiableOptimizer) -> list[str]:
        """A label per raw tensor, for messages (``lr``, ``lr[group 1]``, ``lr[param 0 (weight)]``)."""
        if self.scope == "global":
            return [self.name]
        if self.scope == "group":
            return [f"{self.name}[group {k}]" for k in range(len(optimizer.param_groups))]
        return [f"{self.name}[param {i} ({n})]" for i, n in enumerate(optimizer.param_names)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or \
        isinstance(value, Tensor) and value.dim() == 0


def _momentum_cycler(scheduler: Any, name: str) -> Any:
    """The scheduler (``scheduler`` or one inside a ``SequentialLR`` / ``ChainedScheduler``) that writes
    ``name`` (``"momentum"``, or ``"beta1"`` of an Adam-family optimizer) at every step: a CyclicLR or
    OneCycleLR with ``cycle_momentum=True``; None if there is none."""
    if scheduler is None:
        return None
    if getattr(scheduler, "cycle_momentum", False) and ("beta1" if scheduler.use_beta1 else "momentum") == name:
        return scheduler
    for child in getattr(scheduler, "_schedulers", ()):
        found = _momentum_cycler(child, name)
        if found is not None:
            return found
    return None


def parse_hyperparameters(spec: Any, optimizer: DifferentiableOptimizer, scheduler: Any) -> list[Tuned]:
    """``"lr"``, ``["lr", "momentum"]``, ``{"lr": "group"}`` or :class:`Tuned` objects -> a list of
    :class:`Tuned`, each checked against the optimizer (and scheduler); ``"betas"`` means both."""
    if isinstance(spec, (str, Tuned)):
        spec = [spec]
    if isinstance(spec, Mapping):
        spec = [Tuned(name, scope) for name, scope in spec.items()]
    if not isinstance(spec, Sequence):
        raise TypeError(f"hyperparameters: expected a name ('lr'), a list of names, {{name: scope}} or Tuned "
                        f"objects, got {spec!r}")
    tuned: list[Tuned] = []
    for item in spec:
        if isinstance(item, str):
            item = Tuned(item)
        if not isinstance(item, Tuned):
            raise TypeError(f"hyperparameters: expected names, {{name: scope}} or Tuned objects, got {item!r}")
        if item.name == "betas" and "betas" in optimizer.defaults:
            tuned += [Tuned("beta1", item.scope, item.transform), Tuned("beta2", item.scope, item.transform)]
        else:
            tuned.append(item)
    if not tuned:
        raise ValueError("hyperparameters: name at least one hyperparameter to tune, e.g. ['lr']")
    names = [t.name for t in tuned]
    if len(set(names)) != len(names):
        raise ValueError(f"hyperparameters: {names} names one twice")
    keys = set(optimizer.defaults) - {"maximize", "foreach", "nesterov", "amsgrad", "decoupled_weight_decay",
                                      "differentiable", "capturable", "fused"}
    known = sorted(keys - {"betas"}) + (["beta1", "beta2"] if "betas" in keys else [])
    # numeric keys a scheduler put into every group and reads at each step (OneCycleLR's 'max_lr',
    # 'initial_lr', 'min_lr'); one the steps never read is caught at the first window (zero hypergradient)
    known += sorted(k for k in optimizer.param_groups[0] if k not in keys and k not in ("params", "lr")
                    and all(_is_number(group.get(k)) for group in optimizer.param_groups))
    for t in tuned:
        if t.on_scheduler:
            if scheduler is None:
                raise ValueError(f"hyperparameters: {t.name!r} tunes a scheduler's attribute, but no scheduler= "
                                 "was given to the tuner")
            value = getattr(scheduler, t.attribute, None)
            items = value if isinstance(value, (list, tuple)) else [value]
            if value is None or not all(isinstance(v, (int, float, Tensor)) and not isinstance(v, bool)
                                        for v in items):
                raise ValueError(f"hyperparameters: {type(scheduler).__name__} has no numeric attribute "
                                 f"{t.attribute!r} to tune (found {value!r})")
            if t.scope == "group" and not isinstance(value, (list, tuple)) and len(optimizer.param_groups) > 1:
                raise ValueError(f"hyperparameters: {type(scheduler).__name__}.{t.attribute} is one number for all "
                                 f"{len(optimizer.param_groups)} parameter groups, so {t.name!r} cannot take one "
                                 "value per group; use scope 'global'")
        elif t.name not in known:
            close = difflib.get_close_matches(t.name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"hyperparameters: {type(optimizer).__name__} has no hyperparameter {t.name!r}{hint} "
                             f"(tunable: {', '.join(known)}, or 'scheduler.<attribute>')")
        elif t.name == "lr" and scheduler is not None and not t.scales_schedule(scheduler):
            raise ValueError("hyperparameters: 'lr' is written by the scheduler at every step, so a tuned value "
                             "would be overwritten; tune the scheduler's parameters instead (e.g. "
                             "'scheduler.gamma'), tune 'lr' without a scheduler, or express the schedule as a "
                             "diffopt.optim.lr_scheduler.LambdaLR (lr = base lr * f(step), e.g. a warm-up), "
                             "under which 'lr' tunes the base lr")
        elif t.name in ("momentum", "beta1") and _momentum_cycler(scheduler, t.name) is not None:
            cycler = type(_momentum_cycler(scheduler, t.name)).__name__
            bounds = ("'max_momentum' / 'base_momentum' (the bounds it keeps in the groups)" if cycler == "OneCycleLR"
                      else "'scheduler.max_momentums' / 'scheduler.base_momentums'" if scheduler.__class__.__name__
                      == cycler else "the cycle's momentum bounds")
            raise ValueError(f"hyperparameters: {t.name!r} is written by the scheduler at every step ({cycler} with "
                             "cycle_momentum=True cycles it), so a tuned value would be overwritten; build the "
                             f"{cycler} with cycle_momentum=False to tune {t.name!r}, or tune {bounds} instead")
        elif t.scales_schedule(scheduler) and t.scope == "element":
            raise ValueError("hyperparameters: 'lr' under a LambdaLR tunes its base rates, one per group; use "
                             "scope 'global' or 'group'")
    return tuned
