r"""Learned learning rates as update rules: Meta-SGD and MAML++'s per-layer per-step rates.

Both are plain :class:`~diffopt.optim.SGD` whose ``lr`` is a learnable tensor
hyperparameter (nothing of SGD is duplicated):

* :func:`meta_sgd` (Li et al., 2017): :math:`\theta \leftarrow \theta - \alpha \odot g`
  with one rate per *element*, ``lr=PerParameter([α_1, ..., α_n])``, ``α_i`` of
  parameter ``i``'s shape, initialised ``U[low, high]`` (the paper's ``U[0.005, 0.1]``)
  or to a constant;
* :func:`per_layer_per_step` (Antoniou et al., 2019, "LSLR"): one scalar rate
  per parameter tensor and step, ``lr=PerParameter([Schedule(α_i), ...])`` with
  ``α_i`` of shape ``(steps,)``; beyond the last step the last rate is kept
  (``hold_last=True``) or the step is an error.

The rates are reported by ``hyperparameter_tensors()`` (so every engine mode
differentiates them) and by :meth:`LearnedSGD.meta_parameters`.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .._hyper import PerParameter, Schedule
from ...errors import LearnedRuleError
from ..sgd import SGD

__all__ = ["LearnedSGD", "meta_sgd", "per_layer_per_step"]


class LearnedSGD(SGD):
    """SGD whose learning rates are learned tensors (built by :func:`meta_sgd` / :func:`per_layer_per_step`).

    Attributes:
        kind: ``"meta_sgd"`` or ``"per_layer_per_step"``.
        lrs: the learned rate tensors, one per parameter (``nn.Parameter``).
    """

    kind = "sgd_lr"

    def __init__(self, params: Iterable[Any], lrs: list[Tensor], kind: str, hold_last: bool = True,
                 **sgd_options: Any) -> None:
        self.kind = kind
        self.lrs = list(lrs)
        self.hold_last = hold_last
        per_step = kind == "per_layer_per_step"
        lr = PerParameter([Schedule(t, hold_last=hold_last) if per_step else t for t in self.lrs])
        super().__init__(params, lr=lr, **sgd_options)
        if len(self.lrs) != len(self.params):
            raise ValueError(f"{kind}: got {len(self.lrs)} learning-rate tensors for {len(self.params)} parameters")
        if len(self.param_groups) != 1:
            raise ValueError(f"{kind}: pass a flat list of parameters (one group)")

    def meta_parameters(self) -> list[Tensor]:
        return [t for t in self.lrs if t.requires_grad]

    def sgd_options(self) -> dict[str, Any]:
        """The SGD options a saved rule keeps: numbers, and a 0-dim tensor's value (the saved rule's
        constant); a tensor of more elements is refused, since the file holds one number per option."""
        out = {}
        for key in ("momentum", "dampening", "weight_decay", "nesterov", "maximize"):
            value = self.param_groups[0][key]
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    raise LearnedRuleError(f"save: {key} is a tensor of shape {tuple(value.shape)}; a saved rule "
                                           "keeps one number per SGD option: set a number (or a 0-dim tensor)")
                value = float(value.detach())
            out[key] = value
        return out

    def state_dict(self) -> dict[str, Any]:
        groups = self.param_groups
        self.param_groups = [{k: v for k, v in g.items() if k != "lr"} for g in groups]
        try:
            return super().state_dict()
        finally:
            self.param_groups = groups


def _params_list(params: Iterable[Any]) -> list[Tensor]:
    if isinstance(params, Tensor):
        raise TypeError("params: expected an iterable of tensors, got a single tensor; wrap it in a list")
    items = list(params)
    if items and isinstance(items[0], dict):
        raise TypeError("params: learned learning rates take a flat list of tensors, not parameter groups")
    out = []
    for j, p in enumerate(items):
        p = p[1] if isinstance(p, tuple) else p
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{j}] is a {type(p).__name__}, not a tensor")
        out.append(p)
    if not out:
        raise ValueError("params: got an empty parameter list")
    return out


def meta_sgd(
    params: Iterable[Any],
    init: float | tuple[float, float] = (0.005, 0.1),
    *,
    generator: torch.Generator | None = None,
    requires_grad: bool = True,
    **sgd_options: Any,
) -> LearnedSGD:
    """Meta-SGD: SGD with a learnable learning rate for every element of every parameter.

    Args:
        params: the parameters (a flat list).
        init: a constant rate, or ``(low, high)`` for ``U[low, high]`` (the paper's default).
        generator: generator for the uniform initialisation.
        requires_grad: whether the rates are learnable (``nn.Parameter`` with grad).
        **sgd_options: ``momentum``, ``weight_decay``, ... of :class:`~diffopt.optim.SGD`.
    """
    tensors = _params_list(params)
    lrs = []
    for p in tensors:
        dtype = p.dtype if p.is_floating_point() else torch.get_default_dtype()
        if isinstance(init, (tuple, list)):
            low, high = (float(v) for v in init)
            if not 0 <= low <= high:
                raise ValueError(f"meta_sgd: init=(low, high) needs 0 <= low <= high, got {init!r}")
            value = torch.empty(p.shape, dtype=dtype, device=p.device).uniform_(low, high, generator=generator)
        else:
            if float(init) < 0:
                raise ValueError(f"meta_sgd: init must be >= 0, got {init!r}")
            value = torch.full(p.shape, float(init), dtype=dtype, device=p.device)
        lrs.append(nn.Parameter(value, requires_grad=requires_grad))
    return LearnedSGD(tensors, lrs, "meta_sgd", **sgd_options)


def per_layer_per_step(
    params: Iterable[Any],
    steps: int,
    init: float = 0.01,
    *,
    hold_last: bool = True,
    requires_grad: bool = True,
    **sgd_options: Any,
) -> LearnedSGD:
    """MAML++'s LSLR: SGD with a learnable scalar rate per parameter tensor and inner step.

    Args:
        params: the parameters (a flat list).
        steps: the number of steps with their own rate.
        init: the initial rate of every layer and step.
        hold_last: keep using the last step's rate after ``steps`` steps (else an error).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"per_layer_per_step: steps must be a positive int, got {steps!r}")
    if float(init) < 0:
        raise ValueError(f"per_layer_per_step: init must be >= 0, got {init!r}")
    tensors = _params_list(params)
    lrs = [
        nn.Parameter(torch.full((steps,), float(init), dtype=p.dtype if p.is_floating_point() else None,
                                device=p.device), requires_grad=requires_grad)
        for p in tensors
    ]
    return LearnedSGD(tensors, lrs, "per_layer_per_step", hold_last=hold_last, **sgd_options)
