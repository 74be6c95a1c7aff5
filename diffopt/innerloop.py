"""``diffopt.innerloop``: higher's ``innerloop_ctx`` with diffopt's optimizers.

::

    with diffopt.innerloop(model, torch.optim.Adam(model.parameters(), lr=0.1)) as (fmodel, dopt):
        for _ in range(5):
            dopt.step(loss_fn(fmodel(x_support), y_support))
        loss_fn(fmodel(x_query), y_query).backward()   # meta-gradients reach model.parameters()
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import higher
import torch
from torch import Tensor, nn

from .optim import DifferentiableOptimizer, from_torch

__all__ = ["innerloop", "PatchedOptimizer"]


class PatchedOptimizer:
    """A differentiable optimizer bound to a monkeypatched model.

    ``step(loss)`` computes the update from ``fmodel``'s current fast weights
    and installs the result with ``fmodel.update_params``; it returns the new
    fast weights.
    """

    def __init__(self, fmodel: higher.patch._MonkeyPatchBase, optimizer: DifferentiableOptimizer,
                 positions: list[int]) -> None:
        self.fmodel = fmodel
        self.optimizer = optimizer
        self._position = positions  # where each optimizer parameter sits in fmodel.fast_params

    def step(self, loss: Tensor, *, override: dict[str, list[Any]] | None = None, **kwargs: Any) -> list[Tensor]:
        """One step from ``loss``; ``override`` sets hyperparameters from this step on, as
        higher's ``diffopt.step(loss, override={'lr': [lr]})`` (one value, or one per group)."""
        fast = list(self.fmodel.fast_params)
        current = [fast[j] for j in self._position]
        if override is not None:
            self.optimizer.apply_override(override, "step(override=...)")
        new = self.optimizer.step(loss, params=current, **kwargs)
        for j, tensor in zip(self._position, new):
            fast[j] = tensor
        self.fmodel.update_params(fast)
        return fast

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


@contextlib.contextmanager
def innerloop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | DifferentiableOptimizer,
    *,
    first_order: bool = False,
    copy_initial_weights: bool = False,
    track_higher_grads: bool = True,
    override: dict[str, list[Any]] | None = None,
    **options: Any,
) -> Iterator[tuple[higher.patch._MonkeyPatchBase, PatchedOptimizer]]:
    """Yield ``(fmodel, dopt)``: a monkeypatched ``model`` and its differentiable optimizer.

    Args:
        model: the module to unroll.
        optimizer: a torch.optim optimizer over (some of) ``model``'s parameters,
            converted with :func:`diffopt.optim.from_torch` (state included), or a
            diffopt optimizer constructed on ``model``'s parameters.
        first_order: no graph through the inner gradients (first-order MAML);
            tensor hyperparameters still receive gradients through the updates.
        copy_initial_weights: if True the fast weights start from detached copies,
            so no meta-gradient reaches ``model``'s parameters (higher's default);
            diffopt's default is False, as MAML needs.
        track_higher_grads: False runs the loop without any graph (evaluation).
        override: hyperparameters for the whole loop, as higher's ``innerloop_ctx(override=...)``:
            ``{"lr": [value]}`` for every parameter group or ``{"lr": [v0, v1, ...]}`` one per
            group; values may be tensors that require grad. ``dopt.step(loss, override=...)``
            overrides from that step on.
        **options: passed to ``from_torch`` (``check_finite``, clipping, ...).
    """
    fmodel = higher.monkeypatch(
        model, copy_initial_weights=copy_initial_weights, track_higher_grads=track_higher_grads
    )
    fast = list(fmodel.fast_params)
    if isinstance(optimizer, DifferentiableOptimizer):
        originals = optimizer.params
    elif isinstance(optimizer, torch.optim.Optimizer):
        originals = [p for g in optimizer.param_groups for p in g["params"]]
    else:
        raise TypeError(
            f"innerloop(optimizer=...): expected a torch.optim or diffopt optimizer, got "
            f"{type(optimizer).__name__}"
        )
    from .unroll.functional import ParameterLayout  # here: `import diffopt` must not load the engine

    positions = ParameterLayout(model).positions(originals, what="innerloop: the optimizer's parameter",
                                                 fix="build the optimizer on model.parameters()")
    starts = [fast[j] for j in positions]
    if isinstance(optimizer, DifferentiableOptimizer):
        if options:
            raise TypeError(f"innerloop: {', '.join(options)} are options of from_torch; give them to the "
                            f"diffopt optimizer's constructor instead")
        # A working copy: the caller's optimizer keeps its parameters, state and settings.
        dopt = optimizer.bound_to(starts, first_order=True if first_order else None)
    else:
        dopt = from_torch(optimizer, params=starts, first_order=first_order, **options)
    if override is not None:
        dopt.apply_override(override, "innerloop(override=...)")
    if track_higher_grads and not first_order:
        _attention_twice_differentiable(fmodel)
    yield fmodel, PatchedOptimizer(fmodel, dopt, positions)


def _attention_twice_differentiable(fmodel: nn.Module) -> None:
    """Run ``fmodel``'s forwards with attention by the MATH backend: any of them may feed
    ``dopt.step(loss)``, whose gradient is differentiated again, and the fused kernels have
    no double backward (see :mod:`diffopt.unroll.attention`)."""
    from .unroll.attention import double_differentiable  # here: `import diffopt` must not load the engine

    forward = fmodel.forward

    def twice_differentiable_forward(*args: Any, **kwargs: Any) -> Any:
        with double_differentiable():
            return forward(*args, **kwargs)

    fmodel.forward = twice_differentiable_forward
