r"""Differentiable learning-rate schedulers: twins of ``torch.optim.lr_scheduler``.

Each class takes a :class:`~diffopt.optim.DifferentiableOptimizer` and the same
arguments as its torch namesake, and ``step()`` writes the new learning rate into
the optimizer's parameter groups, as torch's do::

    max_lr = torch.tensor(0.1, requires_grad=True)       # learnable peak
    pct = torch.tensor(0.3, requires_grad=True)          # learnable warm-up fraction
    opt = diffopt.optim.SGD(params, lr=0.01, momentum=0.9)
    sched = diffopt.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=100, pct_start=pct)
    for _ in range(100):
        params = opt.step(loss(params))
        sched.step()
    loss(params).backward()                              # reaches max_lr and pct

Numbers in, numbers out: with plain-number arguments the learning rates are
computed by torch's own ``get_lr`` code (the recursive, "chainable" form, or the
closed form for ``step(epoch)``), so they equal torch's bit for bit, including where
the chainable form differs from the closed form (a scheduler in a
:class:`ChainedScheduler` scales whatever learning rate the previous one left).
Any argument may instead be a tensor (``requires_grad=True``): the same arithmetic
then runs on tensors, and the learning rate written into the optimizer is a tensor
on the autograd graph. In particular (``R`` = receives gradients):

* base learning rates (a tensor ``lr`` in the optimizer) — every scheduler (R);
* ``gamma`` (Step/MultiStep/Exponential), ``factor`` (Constant), ``start_factor`` /
  ``end_factor`` (Linear), ``power`` (Polynomial), ``eta_min`` (CosineAnnealing,
  WarmRestarts), ``base_lr`` / ``max_lr`` / ``gamma`` (Cyclic), ``max_lr``,
  ``pct_start``, ``div_factor``, ``final_div_factor`` and the momenta (OneCycle) (R).

Branch decisions (which phase of OneCycle a step is in, a restart of the cosine)
are taken on the values and treated as constants: the derivative with respect to
``pct_start`` is that of the phase's linear/cosine interpolation, whose end point
moves with it (the schedule is continuous in ``pct_start``, piecewise smooth).

:class:`ReduceLROnPlateau` reduces the learning rate when a metric stalls: the
result is piecewise constant in the metric (zero derivative almost everywhere,
undefined at each reduction), so a metric that requires grad is refused with an
error; the learning rate it writes stays differentiable with respect to the
initial learning rate (``lr * factor**k``).

Also :meth:`LRScheduler.as_schedule` (a :class:`~diffopt.optim.Schedule` of the
learning rates for the next steps, for pure ``update`` calls and the inner-loop
engine) and :func:`scheduler_from_torch` (continue a torch scheduler mid-training).
"""
from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import Any, SupportsFloat

import torch
from torch import Tensor
from torch.optim import lr_scheduler as _torch
from torch.optim.lr_scheduler import _enable_get_lr_call, _format_param, _param_groups_val_list

from ._hyper import PerParameter, Schedule
from .optimizer import DifferentiableOptimizer

__all__ = [
    "LRScheduler", "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR", "LinearLR",
    "ExponentialLR", "SequentialLR", "CosineAnnealingLR", "ChainedScheduler", "ReduceLROnPlateau", "CyclicLR",
    "CosineAnnealingWarmRestarts", "OneCycleLR", "PolynomialLR", "scheduler_from_torch",
]

#: keys schedulers keep in parameter groups (copied by :func:`scheduler_from_torch`)
SCHEDULER_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum")


def _cos(x: Any) -> Any:
    return torch.cos(x) if isinstance(x, Tensor) else math.cos(x)


def _check_optimizer(optimizer: Any, name: str) -> None:
    if not isinstance(optimizer, DifferentiableOptimizer):
        hint = ""
        if isinstance(optimizer, torch.optim.Optimizer):
            hint = (" (for a torch.optim optimizer use torch.optim.lr_scheduler, or convert both with "
                    "diffopt.optim.from_torch and scheduler_from_torch)")
        raise TypeError(f"{name}: optimizer must be a diffopt.optim.DifferentiableOptimizer, got "
                        f"{type(optimizer).__name__}{hint}")
    for k, group in enumerate(optimizer.param_groups):
        if isinstance(group["lr"], (Schedule, PerParameter)):
            raise TypeError(
                f"{name}: param_groups[{k}]['lr'] is a {type(group['lr']).__name__}; a scheduler computes the "
                "learning rate itself from a number or a tensor. Give the group a number or tensor lr (or use "
                "the Schedule alone)"
            )


class LRScheduler(_torch.LRScheduler):
    """Base of the twins: torch's ``LRScheduler`` over a differentiable optimizer.

    The new learning rates are *assigned* to the parameter groups (torch writes into
    a tensor learning rate in place with ``fill_``, which would cut the graph).
    """

    def __init__(self, optimizer: DifferentiableOptimizer, last_epoch: int = -1) -> None:
        _check_optimizer(optimizer, type(self).__name__)
        self.optimizer = optimizer  # type: ignore[assignment]
        for i, group in enumerate(optimizer.param_groups):
            if last_epoch == -1:
                group.setdefault("initial_lr", group["lr"])
            elif "initial_lr" not in group:
                raise KeyError(
                    f"{type(self).__name__}: param_groups[{i}] has no 'initial_lr'; last_epoch={last_epoch} resumes "
                    "a schedule, which needs the optimizer state of the run it resumes (or use last_epoch=-1)"
                )
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self._initial_step()

    def step(self, epoch: int | None = None) -> None:  # type: ignore[override]
        """Advance one step (``epoch``: jump to that step with the closed form, as torch's deprecated form)."""
        self._step_count += 1
        self._update_lr(epoch)

    def _update_lr(self, epoch: int | None = None) -> None:
        with _enable_get_lr_call(self):
            if epoch is None:
                self.last_epoch += 1
                values = self.get_lr()
            else:
                self.last_epoch = epoch
                values = self._get_closed_form_lr() if hasattr(self, "_get_closed_form_lr") else self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values, strict=True):
            group["lr"] = lr
        self._last_lr = _param_groups_val_list(self.optimizer, "lr")  # type: ignore[arg-type]

    def as_schedule(self, steps: int) -> list[Schedule]:
        """The learning rates of the next ``steps`` steps (advancing this scheduler), as a
        :class:`~diffopt.optim.Schedule` per parameter group, for pure ``update`` calls and the
        inner-loop engine (which calls ``update`` with the step index and never ``scheduler.step()``)::

            schedules = OneCycleLR(opt, max_lr=peak, total_steps=K).as_schedule(K)
            for group, schedule in zip(opt.param_groups, schedules):
                group["lr"] = schedule          # entry t is the learning rate of step t, on the graph
        """
        per_group: list[list[Any]] = [[] for _ in self.optimizer.param_groups]
        for _ in range(steps):
            for values, group in zip(per_group, self.optimizer.param_groups):
                values.append(group["lr"])
            self.step()
        return [Schedule(values) for values in per_group]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in state.items()}


class LambdaLR(_torch.LambdaLR, LRScheduler):
    """``torch.optim.lr_scheduler.LambdaLR``: ``lr = base_lr * lr_lambda(step)`` (a lambda may return a tensor)."""


class MultiplicativeLR(_torch.MultiplicativeLR, LRScheduler):
    """``torch.optim.lr_scheduler.MultiplicativeLR``: ``lr *= lr_lambda(step)``."""


def _positive_steps(value: Any, name: str, where: str) -> None:
    """A step count the schedule divides by: a bare ZeroDivisionError at the first step otherwise (torch's too)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
        raise ValueError(f"{where}: {name} must be a number of steps >= 1, got {value!r}")


class StepLR(_torch.StepLR, LRScheduler):
    """``torch.optim.lr_scheduler.StepLR``; ``gamma`` may be a tensor."""

    def __init__(self, optimizer: Any, step_size: int, *args: Any, **kwargs: Any) -> None:
        _positive_steps(step_size, "step_size", "StepLR")
        super().__init__(optimizer, step_size, *args, **kwargs)


class MultiStepLR(_torch.MultiStepLR, LRScheduler):
    """``torch.optim.lr_scheduler.MultiStepLR``; ``gamma`` may be a tensor."""


class ConstantLR(_torch.ConstantLR, LRScheduler):
    """``torch.optim.lr_scheduler.ConstantLR``; ``factor`` may be a tensor."""


class LinearLR(_torch.LinearLR, LRScheduler):
    """``torch.optim.lr_scheduler.LinearLR``; ``start_factor`` and ``end_factor`` may be tensors."""


class ExponentialLR(_torch.ExponentialLR, LRScheduler):
    """``torch.optim.lr_scheduler.ExponentialLR``; ``gamma`` may be a tensor."""


class PolynomialLR(_torch.PolynomialLR, LRScheduler):
    """``torch.optim.lr_scheduler.PolynomialLR``; ``power`` may be a tensor."""


class CosineAnnealingLR(_torch.CosineAnnealingLR, LRScheduler):
    """``torch.optim.lr_scheduler.CosineAnnealingLR``; ``eta_min`` may be a tensor."""

    def __init__(self, optimizer: Any, T_max: int, *args: Any, **kwargs: Any) -> None:
        _positive_steps(T_max, "T_max", "CosineAnnealingLR")
        super().__init__(optimizer, T_max, *args, **kwargs)


class CosineAnnealingWarmRestarts(_torch.CosineAnnealingWarmRestarts, LRScheduler):
    """``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts`` (SGDR); ``eta_min`` may be a tensor."""

    def __init__(self, optimizer: DifferentiableOptimizer, T_0: int, T_mult: int = 1, eta_min: float | Tensor = 0.0,
                 last_epoch: int = -1) -> None:
        if not isinstance(T_0, int) or T_0 <= 0:
            raise ValueError(f"CosineAnnealingWarmRestarts: expected a positive integer T_0, got {T_0!r}")
        if not isinstance(T_mult, int) or T_mult < 1:
            raise ValueError(f"CosineAnnealingWarmRestarts: expected an integer T_mult >= 1, got {T_mult!r}")
        if isinstance(eta_min, bool) or not isinstance(eta_min, (float, int, Tensor)):
            raise TypeError(f"CosineAnnealingWarmRestarts: eta_min must be a number or a tensor, got {eta_min!r}")
        self.T_0, self.T_i, self.T_mult, self.eta_min, self.T_cur = T_0, T_0, T_mult, eta_min, last_epoch
        LRScheduler.__init__(self, optimizer, last_epoch)

    def step(self, epoch: float | None = None) -> None:  # type: ignore[override]
        """torch's step (restarts, ``T_mult``, the deprecated ``epoch``), assigning the rates."""
        if epoch is None and self.last_epoch < 0:
            epoch = 0
        if epoch is None:
            epoch = self.last_epoch + 1
            self.T_cur = self.T_cur + 1
            if self.T_cur >= self.T_i:
                self.T_cur = self.T_cur % self.T_i
                self.T_i = self.T_i * self.T_mult
        else:
            if epoch < 0:
                raise ValueError(f"CosineAnnealingWarmRestarts.step: expected a non-negative epoch, got {epoch}")
            if epoch >= self.T_0:
                if self.T_mult == 1:
                    self.T_cur = epoch % self.T_0
                else:
                    n = int(math.log((epoch / self.T_0 * (self.T_mult - 1) + 1), self.T_mult))
                    self.T_cur = epoch - self.T_0 * (self.T_mult**n - 1) / (self.T_mult - 1)
                    self.T_i = self.T_0 * self.T_mult ** (n)
            else:
                self.T_i = self.T_0
                self.T_cur = epoch
        self.last_epoch = math.floor(epoch)
        with _enable_get_lr_call(self):
            for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
                group["lr"] = lr
        self._last_lr = _param_groups_val_list(self.optimizer, "lr")  # type: ignore[arg-type]


class ChainedScheduler(_torch.ChainedScheduler, LRScheduler):
    """``torch.optim.lr_scheduler.ChainedScheduler``: every scheduler steps, each scaling the rate the previous left."""

    def __init__(self, schedulers: Sequence[LRScheduler], optimizer: DifferentiableOptimizer | None = None) -> None:
        for k, scheduler in enumerate(schedulers):
            if not isinstance(scheduler, LRScheduler) or isinstance(scheduler, ReduceLROnPlateau):
                raise TypeError(f"ChainedScheduler: schedulers[{k}] must be a diffopt scheduler other than "
                                f"ReduceLROnPlateau, got {type(scheduler).__name__}")
        _torch.ChainedScheduler.__init__(self, schedulers, optimizer)  # type: ignore[arg-type]


class SequentialLR(_torch.SequentialLR, LRScheduler):
    """``torch.optim.lr_scheduler.SequentialLR``: scheduler ``k`` runs from milestone ``k-1`` (restarted there)."""

    def __init__(self, optimizer: DifferentiableOptimizer, schedulers: list[LRScheduler], milestones: list[int],
                 last_epoch: int = -1) -> None:
        _check_optimizer(optimizer, "SequentialLR")
        if not schedulers:
            raise ValueError("SequentialLR: expects at least one scheduler")
        for k, scheduler in enumerate(schedulers):
            if not isinstance(scheduler, LRScheduler) or isinstance(scheduler, ReduceLROnPlateau):
                raise TypeError(f"SequentialLR: schedulers[{k}] must be a diffopt scheduler other than "
                                f"ReduceLROnPlateau, got {type(scheduler).__name__}")
            if scheduler.optimizer is not optimizer:
                raise ValueError(f"SequentialLR: schedulers[{k}] belongs to another optimizer")
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(f"SequentialLR: {len(schedulers)} schedulers need {len(schedulers) - 1} milestones, "
                             f"got {len(milestones)}")
        self._schedulers = schedulers
        self._milestones = milestones
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer  # type: ignore[assignment]
        for group in optimizer.param_groups:  # torch: reset to initial_lr (with fill_ for tensors)
            group["lr"] = group["initial_lr"]
        self.recursive_undo()
        idx = bisect_right(self._milestones, 0)
        self._schedulers[idx]._initial_step()
        self._last_lr = schedulers[idx].get_last_lr()


def _start_cycled_momentum(optimizer: Any, max_momentums: Sequence[Any], base_momentums: Sequence[Any],
                           use_beta1: bool) -> None:
    """CyclicLR's and OneCycleLR's first epoch: every group starts at its ``max_momentum`` (the first
    beta for Adam-family optimizers) and records both bounds, as torch's schedulers do."""
    for m_momentum, b_momentum, group in zip(max_momentums, base_momentums, optimizer.param_groups):
        if use_beta1:
            group["betas"] = (m_momentum, *group["betas"][1:])
        else:
            group["momentum"] = m_momentum
        group["max_momentum"] = m_momentum
        group["base_momentum"] = b_momentum


class CyclicLR(_torch.CyclicLR, LRScheduler):
    """``torch.optim.lr_scheduler.CyclicLR``; ``base_lr``, ``max_lr``, ``gamma`` and the momenta may be tensors."""

    def __init__(self, optimizer: DifferentiableOptimizer, base_lr: Any, max_lr: Any, step_size_up: int = 2000,
                 step_size_down: int | None = None, mode: str = "triangular", gamma: Any = 1.0,
                 scale_fn: Callable[[float], float] | None = None, scale_mode: str = "cycle",
                 cycle_momentum: bool = True, base_momentum: Any = 0.8, max_momentum: Any = 0.9,
                 last_epoch: int = -1) -> None:
        _check_optimizer(optimizer, "CyclicLR")
        self.optimizer = optimizer  # type: ignore[assignment]
        base_lrs = _format_param("base_lr", optimizer, base_lr)  # type: ignore[arg-type]
        if last_epoch == -1:
            for lr, group in zip(base_lrs, optimizer.param_groups, strict=True):
                group["lr"] = lr
        self.max_lrs = _format_param("max_lr", optimizer, max_lr)  # type: ignore[arg-type]
        _positive_steps(step_size_up, "step_size_up", "CyclicLR")
        if step_size_down is not None:
            _positive_steps(step_size_down, "step_size_down", "CyclicLR")
        step_size_up = float(step_size_up)
        step_size_down = float(step_size_down) if step_size_down is not None else step_size_up
        self.total_size = step_size_up + step_size_down
        self.step_ratio = step_size_up / self.total_size
        if mode not in ["triangular", "triangular2", "exp_range"] and scale_fn is None:
            raise ValueError(
                f"CyclicLR: mode {mode!r} is not triangular, triangular2 or exp_range, and scale_fn is None"
            )
        self.mode, self.gamma, self._scale_fn_custom, self.scale_mode = mode, gamma, scale_fn, scale_mode
        self._init_scale_fn()
        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            if "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
                raise ValueError("CyclicLR: cycle_momentum=True needs an optimizer with momentum or betas; "
                                 "pass cycle_momentum=False")
            self.use_beta1 = "betas" in optimizer.defaults
            self.base_momentums = _format_param("base_momentum", optimizer, base_momentum)  # type: ignore[arg-type]
            self.max_momentums = _format_param("max_momentum", optimizer, max_momentum)  # type: ignore[arg-type]
            if last_epoch == -1:
                _start_cycled_momentum(optimizer, self.max_momentums, self.base_momentums, self.use_beta1)
        LRScheduler.__init__(self, optimizer, last_epoch)
        self.base_lrs = base_lrs


class OneCycleLR(_torch.OneCycleLR, LRScheduler):
    """``torch.optim.lr_scheduler.OneCycleLR`` (Smith & Topin, 2018); ``max_lr`` (the peak),
    ``pct_start`` (the warm-up fraction), ``div_factor``, ``final_div_factor`` and the momenta may
    be tensors. A tensor ``pct_start`` moves the end of the warm-up phase continuously: the
    phase a step falls in is decided on its value (a constant for differentiation)."""

    def __init__(self, optimizer: DifferentiableOptimizer, max_lr: Any, total_steps: int | None = None,
                 epochs: int | None = None, steps_per_epoch: int | None = None, pct_start: float | Tensor = 0.3,
                 anneal_strategy: str = "cos", cycle_momentum: bool = True, base_momentum: Any = 0.85,
                 max_momentum: Any = 0.95, div_factor: Any = 25.0, final_div_factor: Any = 1e4,
                 three_phase: bool = False, last_epoch: int = -1) -> None:
        _check_optimizer(optimizer, "OneCycleLR")
        self.optimizer = optimizer  # type: ignore[assignment]
        if total_steps is not None:
            if total_steps <= 0 or not isinstance(total_steps, int):
                raise ValueError(f"OneCycleLR: expected a positive integer total_steps, got {total_steps!r}")
            self.total_steps = total_steps
        elif epochs is not None and steps_per_epoch is not None:
            if not (isinstance(epochs, int) and epochs > 0 and isinstance(steps_per_epoch, int)
                    and steps_per_epoch > 0):
                raise ValueError(f"OneCycleLR: epochs and steps_per_epoch must be positive integers, got "
                                 f"{epochs!r}, {steps_per_epoch!r}")
            self.total_steps = epochs * steps_per_epoch
        else:
            raise ValueError("OneCycleLR: give total_steps, or epochs and steps_per_epoch")
        pct_value = float(pct_start.detach()) if isinstance(pct_start, Tensor) else pct_start
        if not isinstance(pct_value, float) or not 0 <= pct_value <= 1:
            raise ValueError(f"OneCycleLR: expected a float pct_start in [0, 1], got {pct_start!r}")
        if isinstance(pct_start, Tensor) and pct_start.dtype != torch.float64:
            pct_start = pct_start.to(torch.float64)  # torch computes the phase ends in Python doubles
        warmup_end = pct_start * self.total_steps - 1
        if three_phase:
            self._schedule_phases = [
                {"end_step": warmup_end, "start_lr": "initial_lr", "end_lr": "max_lr",
                 "start_momentum": "max_momentum", "end_momentum": "base_momentum"},
                {"end_step": 2 * pct_start * self.total_steps - 2, "start_lr": "max_lr", "end_lr": "initial_lr",
                 "start_momentum": "base_momentum", "end_momentum": "max_momentum"},
                {"end_step": self.total_steps - 1, "start_lr": "initial_lr", "end_lr": "min_lr",
                 "start_momentum": "max_momentum", "end_momentum": "max_momentum"},
            ]
        else:
            self._schedule_phases = [
                {"end_step": warmup_end, "start_lr": "initial_lr", "end_lr": "max_lr",
                 "start_momentum": "max_momentum", "end_momentum": "base_momentum"},
                {"end_step": self.total_steps - 1, "start_lr": "max_lr", "end_lr": "min_lr",
                 "start_momentum": "base_momentum", "end_momentum": "max_momentum"},
            ]
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"OneCycleLR: anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        self._anneal_func_type = anneal_strategy
        max_lrs = _format_param("max_lr", optimizer, max_lr)  # type: ignore[arg-type]
        if last_epoch == -1:
            for idx, group in enumerate(optimizer.param_groups):
                group["initial_lr"] = max_lrs[idx] / div_factor
                group["max_lr"] = max_lrs[idx]
                group["min_lr"] = group["initial_lr"] / final_div_factor
        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            if "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
                raise ValueError("OneCycleLR: cycle_momentum=True needs an optimizer with momentum or betas; "
                                 "pass cycle_momentum=False")
            self.use_beta1 = "betas" in optimizer.defaults
            max_momentums = _format_param("max_momentum", optimizer, max_momentum)  # type: ignore[arg-type]
            base_momentums = _format_param("base_momentum", optimizer, base_momentum)  # type: ignore[arg-type]
            if last_epoch == -1:
                _start_cycled_momentum(optimizer, max_momentums, base_momentums, self.use_beta1)
        LRScheduler.__init__(self, optimizer, last_epoch)

    @staticmethod
    def _annealing_cos(start: Any, end: Any, pct: Any) -> Any:
        cos_out = _cos(math.pi * pct) + 1
        return end + (start - end) / 2.0 * cos_out


class ReduceLROnPlateau(_torch.ReduceLROnPlateau):
    """``torch.optim.lr_scheduler.ReduceLROnPlateau`` over a differentiable optimizer.

    The reductions are decided on the metric's value: the learning rate is a
    piecewise-constant function of the metric, so ``step(metrics)`` refuses a metric
    that requires grad (pass ``loss.detach()`` or ``float(loss)``). The rate it writes,
    ``max(lr * factor, min_lr)``, stays differentiable in the initial ``lr``.
    """

    def __init__(self, optimizer: DifferentiableOptimizer, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: list[float] | float = 0, eps: float = 1e-8) -> None:
        _check_optimizer(optimizer, "ReduceLROnPlateau")
        if factor >= 1.0:
            raise ValueError(f"ReduceLROnPlateau: factor must be < 1.0, got {factor}")
        self.factor = factor
        self.optimizer = optimizer  # type: ignore[assignment]
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != len(optimizer.param_groups):
                raise ValueError(
                    f"ReduceLROnPlateau: expected {len(optimizer.param_groups)} min_lrs, got {len(min_lr)}"
                )
            self.default_min_lr = None
            self.min_lrs = list(min_lr)
        else:
            self.default_min_lr = min_lr
            self.min_lrs = [min_lr] * len(optimizer.param_groups)
        self.patience, self.cooldown, self.eps, self.last_epoch = patience, cooldown, eps, 0
        self._last_lr = _param_groups_val_list(optimizer, "lr")  # type: ignore[arg-type]
        self._init_is_better(mode=mode, threshold=threshold, threshold_mode=threshold_mode)
        self._reset()

    def step(self, metrics: SupportsFloat, epoch: int | None = None) -> None:  # type: ignore[override]
        if isinstance(metrics, Tensor) and metrics.requires_grad:
            raise TypeError(
                f"ReduceLROnPlateau.step at epoch {self.last_epoch + 1}: the metric requires grad, but the learning "
                "rate is a piecewise-constant function of it (derivative 0 almost everywhere, undefined at each "
                "reduction), so no gradient can flow through it; pass metrics.detach() or float(metrics)"
            )
        super().step(metrics, epoch)

    def _reduce_lr(self, epoch: int) -> None:
        if len(self.optimizer.param_groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError("ReduceLROnPlateau: the optimizer has more parameter groups than min_lrs")
            self.min_lrs = [self.default_min_lr] * len(self.optimizer.param_groups)
        for i, group in enumerate(self.optimizer.param_groups):
            old_lr = group["lr"]
            old_value = float(old_lr.detach()) if isinstance(old_lr, Tensor) else float(old_lr)
            new_value = max(old_value * self.factor, self.min_lrs[i])
            if old_value - new_value > self.eps:
                # a tensor keeps its graph: max(lr * factor, min_lr), the same value
                group["lr"] = old_lr.mul(self.factor).clamp(min=self.min_lrs[i]) if isinstance(old_lr, Tensor) \
                    else new_value


def scheduler_from_torch(scheduler: Any, optimizer: DifferentiableOptimizer) -> Any:
    """The twin of a torch scheduler, continuing its schedule on ``optimizer`` (the twin of its
    optimizer, e.g. from :func:`diffopt.optim.from_torch`), mid-training.

    The scheduler's state (step counts, base rates, phases, ...) and the
    scheduler-owned keys of the torch optimizer's parameter groups (``initial_lr``,
    OneCycle's ``max_lr``/``min_lr``, the momenta) are copied; the twin's next
    ``step()`` writes the learning rate torch's next ``step()`` would.
    """
    twin_cls = globals().get(type(scheduler).__name__)
    if twin_cls is None or not isinstance(scheduler, getattr(_torch, type(scheduler).__name__, ())):
        raise TypeError(f"scheduler_from_torch: no twin for {type(scheduler).__name__}")
    torch_groups = scheduler.optimizer.param_groups
    if len(torch_groups) != len(optimizer.param_groups):
        raise ValueError(f"scheduler_from_torch: the scheduler's optimizer has {len(torch_groups)} parameter groups, "
                         f"the twin optimizer {len(optimizer.param_groups)}")
    def copy(value: Any) -> Any:  # (torch writes into a tensor lr in place: never share one with it)
        return value.detach().clone() if isinstance(value, Tensor) else value

    for theirs, mine in zip(torch_groups, optimizer.param_groups):
        for key in SCHEDULER_GROUP_KEYS:
            if key in theirs:
                mine[key] = copy(theirs[key])
        mine["lr"] = copy(theirs["lr"])
    twin = object.__new__(twin_cls)
    state = {k: v for k, v in scheduler.__dict__.items() if k not in ("optimizer", "_schedulers")}
    twin.__dict__.update(state)
    twin.optimizer = optimizer
    if hasattr(scheduler, "_schedulers"):
        twin._schedulers = [scheduler_from_torch(s, optimizer) for s in scheduler._schedulers]
    return twin
