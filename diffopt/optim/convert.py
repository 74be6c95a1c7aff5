"""``from_torch``: the differentiable twin of an existing torch.optim optimizer."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._state_dict import own_copy
from .adadelta import Adadelta
from .adafactor import Adafactor
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .asgd import ASGD
from .muon import Muon
from .nadam import NAdam
from .optimizer import IGNORED_TORCH_OPTIONS, DifferentiableOptimizer
from .radam import RAdam
from .rmsprop import RMSprop
from .rprop import Rprop
from .sgd import SGD

TWINS: dict[type[torch.optim.Optimizer], type[DifferentiableOptimizer]] = {
    torch.optim.SGD: SGD,
    torch.optim.Adam: Adam,
    torch.optim.AdamW: AdamW,
    torch.optim.Adagrad: Adagrad,
    torch.optim.Adadelta: Adadelta,
    torch.optim.Adamax: Adamax,
    torch.optim.NAdam: NAdam,
    torch.optim.RAdam: RAdam,
    torch.optim.RMSprop: RMSprop,
    torch.optim.Rprop: Rprop,
    torch.optim.ASGD: ASGD,
    torch.optim.Adafactor: Adafactor,
    torch.optim.Muon: Muon,
}


def twin_class(torch_optimizer: torch.optim.Optimizer) -> type[DifferentiableOptimizer]:
    for cls in type(torch_optimizer).__mro__:
        if cls in TWINS:
            return TWINS[cls]
    supported = ", ".join(sorted(c.__name__ for c in TWINS))
    raise TypeError(
        f"from_torch: no differentiable twin for {type(torch_optimizer).__name__}; supported: {supported}"
    )


def from_torch(
    torch_optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor] | Mapping[Tensor, Tensor] | None = None,
    **options: Any,
) -> DifferentiableOptimizer:
    """Convert a torch.optim optimizer, with its groups, hyperparameters and state.

    The twin continues the torch trajectory exactly: after ``n`` warm-up steps
    with the torch optimizer, ``from_torch(opt).step(loss)`` takes step ``n+1``.

    Args:
        torch_optimizer: the optimizer to convert (not modified).
        params: the tensors the twin starts from, e.g. higher's fast weights.
            Either a flat sequence in the order of the optimizer's groups, or a
            mapping ``{torch_param: tensor}``. Default: the optimizer's own
            parameters (so gradients reach them).
        **options: ``first_order``, ``check_finite``, clipping and ``grad_transform``.
    """
    cls = twin_class(torch_optimizer)
    originals = [p for group in torch_optimizer.param_groups for p in group["params"]]
    if params is None:
        replacements = list(originals)
    elif isinstance(params, Mapping):
        missing = [i for i, p in enumerate(originals) if p not in params]
        if missing:
            raise KeyError(
                f"from_torch(params=...): no replacement for the optimizer's parameters at flat "
                f"positions {missing}"
            )
        replacements = [params[p] for p in originals]
    else:
        replacements = list(params)
        if len(replacements) != len(originals):
            raise ValueError(
                f"from_torch(params=...): got {len(replacements)} tensors, the optimizer has "
                f"{len(originals)} parameters"
            )
    known = set(cls.rule_class.defaults)
    groups, position = [], 0
    for group in torch_optimizer.param_groups:
        count = len(group["params"])
        twin_group = {  # tensors copied: torch's scheduler changes a tensor lr in place
            k: own_copy(v) for k, v in group.items() if k in known and k not in IGNORED_TORCH_OPTIONS
        }
        twin_group["params"] = replacements[position:position + count]
        groups.append(twin_group)
        position += count
    if cls is Adafactor and "foreach" not in options:  # torch's Adafactor takes its per-tensor path unless told
        options["foreach"] = bool(torch_optimizer.param_groups[0].get("foreach"))
    if cls is Adagrad:  # its accumulators start from the constructor's value, not a group's (as torch)
        options.setdefault("initial_accumulator_value", torch_optimizer.defaults["initial_accumulator_value"])
    twin = cls(groups, **options)
    for cls_option, value in cls.fixed_options.items():
        for group in twin.param_groups:
            group[cls_option] = value
    for i, original in enumerate(originals):
        torch_state = torch_optimizer.state.get(original)
        if torch_state:
            twin.state[i] = twin.rule.state_from_torch(torch_state, replacements[i])
    return twin
