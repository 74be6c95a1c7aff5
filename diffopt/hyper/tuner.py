r"""Online hyperparameter tuning during training: :class:`OnlineTuner`.

The tuner owns a training loop's steps. Every ``every`` training steps it differentiates a
validation loss with respect to the chosen hyperparameters :math:`\lambda = T(u)` (reparameterised,
:mod:`diffopt.hyper._hyperparameters`) through a truncated window of the last ``window`` steps,

.. math::
    g = \frac{\mathrm d}{\mathrm d u}\, L_{\mathrm{val}}\big(w_{s+k}(u)\big), \qquad
    (w_{t+1}, S_{t+1}) = \Phi\big(w_t, S_t, \nabla L_{\mathrm{train}}(w_t, b_t); T(u)\big),\ t = s..s+k-1,

from the window's start :math:`(w_s, S_s)`, and takes one step of a meta-optimizer (Adam on
:math:`u` by default) — online hyperparameter optimisation in the spirit of Maclaurin et al. (2015),
Franceschi et al. (2017) and Baydin et al. (2018, whose one-step rule is ``window=1`` with plain SGD on
:math:`u`). The hypergradient comes from

* ``mode="reverse"``: the window replayed on the autograd graph (:mod:`diffopt.hyper._window`);
* ``mode="forward"``: the window replayed with forward-mode tangents, one replay per scalar;
* ``mode="pes"``: persistent evolution strategies (Vicol, Metz & Sohl-Dickstein, 2021, "Unbiased
  gradient estimation in unrolled computation graphs with persistent evolution strategies"):
  ``pes_samples`` antithetic pairs of particles, copies of the training run that advance through
  every step with :math:`u \pm \varepsilon_s` (:math:`\varepsilon_s \sim N(0, \sigma^2 I)` drawn
  afresh each window :math:`s`) and persist across windows; with :math:`\xi = \sum_s \varepsilon_s`,

  .. math::
      \hat g = \frac{1}{2\sigma^2 N}\sum_{i=1}^{N}\big[L_{\mathrm{val}}(w^{+}_i)
               - L_{\mathrm{val}}(w^{-}_i)\big]\,\xi_i,

  an unbiased estimate (for fixed :math:`u`) of the gradient of the smoothed validation loss
  through *every* step since the particles started (no truncation bias), at the price of variance.
  ``pes_horizon`` windows after they start, the particles restart from the training run.

**Backtracking.** A learning rate too high at the start of training does harm that no later value
undoes (Adam's first steps move every weight by about the rate, whatever the gradient's size; on the
benchmarks, 5 steps at 10x the best fixed rate and the best rate after them end 1.0-1.2x the best
rate's test loss). So while ``lr`` is tuned, each tuning step of the first period checks the
hypergradient's sign, as a backtracking line search checks a step: if the validation loss would fall
with all the rates lowered together, training restarts from its first step (the weights, optimizer
state and scheduler the tuner was built with) with the rates times ``backtrack_factor``, and the
meta-optimizer does not step; the first period whose hypergradient says "raise" (or ``backtrack``
restarts) ends the search and tuning goes on as above. A rate too low costs nothing of the kind
(training is only slower) and is left to the hypergradient. The restarted steps are spent: a run of
``n`` calls to :meth:`step` trains its final weights through the steps after the last restart
(``history`` marks restarts with ``"restarted": True``, ``restarts`` counts them).

**Warm-up on restart.** With ``restart_warmup=W``, the first restart also starts a linear warm-up:
the restarted run's rates are the tuned base rates times :math:`\min(1, t / W)` (:class:`LinearWarmup`,
:math:`t` the steps since the restart), through a :class:`~diffopt.optim.lr_scheduler.LambdaLR` the
tuner installs (``scheduler``), its tuning steps are held back for ``restart_delay`` steps, and the
search ends (no further restart). The warm-up is the standard remedy for Adam's large first steps
(Liu et al., 2020, RAdam; Ma & Yarats, 2021), and a backtracking restart is the evidence that the
run needs it: a run whose first period is not too fast keeps its rates as they are. Measured
(``benchmarks/RESULTS.md`` section 8, 10 seeds): from a learning rate 10x too high it brings the
digits' median test loss from 1.39x to 1.05x the best fixed rate's, but the synthetic regression's from
1.00x to 1.06x; it is off by default.

**Warm-up and delay.** Under a :class:`~diffopt.optim.lr_scheduler.LambdaLR` (say a linear warm-up,
``LambdaLR(opt, lambda t: min(1.0, t / 200))``) ``"lr"`` is the base rate the schedule multiplies
(:mod:`diffopt.hyper._hyperparameters`). A greedy hypergradient would undo a warm-up: it moves the
*effective* rate of the window towards the best rate over a few steps, which early in training is
higher than the best fixed rate of the whole run (the short-horizon bias, Wu et al., 2018), so the base
rate climbs as fast as the meta-optimizer allows. ``delay`` holds the tuning steps back for the first
``delay`` training steps of a run (and of every restart): the schedule alone sets the early rates,
and the first period after the delay makes the backtracking test.

Training itself is untouched: the weights follow exactly the trajectory the optimizer takes with
the values the tuner set, which change only between windows (``history`` records them;
tests/test_hyper_tuner.py replays them in ``torch.optim`` to 1e-10).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from os import PathLike
from typing import Any

import torch
from torch import Tensor

from .._io import atomic_save, check_writable, safe_load
from ..errors import NonFiniteError
from ..optim import DifferentiableOptimizer
from ..optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau
from ._hyperparameters import TRANSFORMS, Tuned, parse_hyperparameters
from ._window import Snapshot, TrainLoss, ValidationLoss, advance, hypergradients, replay, split

__all__ = ["LinearWarmup", "OnlineTuner"]

MODES = ("reverse", "forward", "pes")
MetaOptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"OnlineTuner: {name} must be an integer >= 1, got {value!r}")
    return value


class LinearWarmup:
    r"""A linear warm-up factor, ``LambdaLR``'s ``lr_lambda``: :math:`\min(1, t / \text{steps})` at step
    :math:`t` (0 at the first step). A class, not a lambda, so a scheduler's ``state_dict`` keeps it."""

    def __init__(self, steps: int) -> None:
        self.steps = _positive_int(steps, "LinearWarmup steps")

    def __call__(self, step: int) -> float:
        return min(1.0, step / self.steps)

    def __repr__(self) -> str:
        return f"LinearWarmup({self.steps})"


class OnlineTuner:
    """Tune an optimizer's hyperparameters by hypergradients of a validation loss while it trains.

    Args:
        optimizer: a :mod:`diffopt.optim` optimizer over the weights (its ``params``); it must keep
            the graph (not ``first_order=True``: pass ``first_order`` here instead).
        train_loss: ``train_loss(params, batch) -> scalar``, the training loss of the weights
            ``params`` (a list, in the optimizer's order) on one batch.
        validation_loss: ``validation_loss(params) -> scalar``, the loss whose hypergradient is taken.
        hyperparameters: what to tune: ``"lr"``, ``["lr", "momentum"]``, ``{"lr": "group"}`` or
            :class:`~diffopt.hyper.Tuned` objects (scope ``"global"``, ``"group"``, ``"element"``;
            transform ``"log"``, ``"logit"``, ``"softplus"``, ``"identity"``); ``"betas"`` means both;
            a number a scheduler keeps in the groups is a name too (OneCycleLR's peak ``"max_lr"``).
        every: training steps between tuning steps.
        window: training steps the hypergradient differentiates through, the last ``window`` of
            each ``every`` (default ``every``; PES always uses ``every``).
        mode: ``"reverse"``, ``"forward"`` or ``"pes"`` (module docstring).
        scheduler: a :mod:`diffopt.optim.lr_scheduler` scheduler of ``optimizer``, stepped after every
            training step (its attributes are tunable as ``"scheduler.<name>"``).
        meta_optimizer: ``f(raw_tensors) -> torch.optim.Optimizer`` (default ``Adam(lr=meta_lr)``).
        meta_lr: the default meta-optimizer's learning rate (on the reparameterised values: 0.1 moves
            a log-learning rate by at most about 10% per tuning step).
        backtrack: at most this many restarts of training from its first step while the learning rate
            is too high (module docstring, "Backtracking"); 0: never restart.
        backtrack_factor: the factor in (0, 1) each restart multiplies the learning rate(s) by.
        delay: training steps of a run (and after each restart) before its first period starts: no
            tuning step, no backtracking test, no replay during them (module docstring, "Warm-up").
        restart_warmup: with W > 0, the first restart also starts a linear warm-up over W steps and
            ends the search (module docstring, "Warm-up on restart"); needs ``backtrack`` >= 1, a
            tuned ``"lr"`` (scope global or group) and no ``scheduler``.
        restart_delay: the restarted run's steps before its first tuning step, with ``restart_warmup``
            (default: half the warm-up).
        first_order: treat the training gradients as constants in the window (cheaper, biased).
        pes_samples, pes_sigma, pes_horizon: PES's antithetic pairs, perturbation scale (on the
            reparameterised values) and windows before the particles restart (None: never).
        generator: the ``torch.Generator`` PES draws from (default: one seeded with 0).

    Use::

        tuner = OnlineTuner(opt, train_loss, val_loss, "lr", every=20, window=5)
        for batch in batches:
            params = tuner.step(batch)
    """

    def __init__(
        self,
        optimizer: DifferentiableOptimizer,
        train_loss: TrainLoss,
        validation_loss: ValidationLoss,
        hyperparameters: Any = "lr",
        *,
        every: int = 10,
        window: int | None = None,
        mode: str = "reverse",
        scheduler: LRScheduler | None = None,
        meta_optimizer: MetaOptimizerFactory | None = None,
        meta_lr: float = 0.1,
        backtrack: int = 8,
        backtrack_factor: float = 0.5,
        delay: int = 0,
        restart_warmup: int = 0,
        restart_delay: int | None = None,
        first_order: bool = False,
        pes_samples: int = 4,
        pes_sigma: float = 0.1,
        pes_horizon: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(optimizer, DifferentiableOptimizer):
            hint = " (convert it with diffopt.optim.from_torch(opt))" if isinstance(optimizer, torch.optim.Optimizer) \
                else ""
            raise TypeError(f"OnlineTuner: optimizer must be a diffopt.optim optimizer, whose steps can be "
                            f"differentiated, got {type(optimizer).__name__}{hint}")
        if optimizer.first_order:
            raise ValueError("OnlineTuner: the optimizer was built with first_order=True, which drops the graph "
                             "through its gradients; build it without, and pass first_order=True to OnlineTuner "
                             "for a first-order hypergradient")
        for name, fn in (("train_loss", train_loss), ("validation_loss", validation_loss)):
            if not callable(fn):
                raise TypeError(f"OnlineTuner: {name} must be a function, got {type(fn).__name__}")
        if scheduler is not None:
            if not isinstance(scheduler, LRScheduler) or isinstance(scheduler, ReduceLROnPlateau):
                raise TypeError("OnlineTuner: scheduler must be a diffopt.optim.lr_scheduler scheduler other than "
                                f"ReduceLROnPlateau, got {type(scheduler).__name__}")
            if scheduler.optimizer is not optimizer:
                raise ValueError("OnlineTuner: scheduler belongs to another optimizer")
        if mode not in MODES:
            raise ValueError(f"OnlineTuner: mode must be one of {MODES}, got {mode!r}")
        self.every = _positive_int(every, "every")
        self.window = self.every if window is None else _positive_int(window, "window")
        if self.window > self.every:
            raise ValueError(f"OnlineTuner: window ({window}) must be <= every ({every}): the hypergradient "
                             "differentiates through the last window steps of each period")
        if mode == "pes" and self.window != self.every:
            raise ValueError("OnlineTuner: PES particles advance through every training step, so window must "
                             f"equal every ({every}); leave window unset")
        if isinstance(backtrack, bool) or not isinstance(backtrack, int) or backtrack < 0:
            raise ValueError(f"OnlineTuner: backtrack must be an integer >= 0, got {backtrack!r}")
        if not (isinstance(backtrack_factor, (int, float)) and 0 < backtrack_factor < 1):
            raise ValueError(f"OnlineTuner: backtrack_factor must be a number in (0, 1), got {backtrack_factor!r}")
        if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
            raise ValueError(f"OnlineTuner: delay must be an integer >= 0, got {delay!r}")
        for name, value in (("restart_warmup", restart_warmup), ("restart_delay", restart_delay)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"OnlineTuner: {name} must be an integer >= 0, got {value!r}")
        _positive_int(pes_samples, "pes_samples")
        if not (isinstance(pes_sigma, (int, float)) and math.isfinite(pes_sigma) and pes_sigma > 0):
            raise ValueError(f"OnlineTuner: pes_sigma must be a number > 0, got {pes_sigma!r}")
        if pes_horizon is not None:
            _positive_int(pes_horizon, "pes_horizon")
        self.optimizer, self.scheduler, self.mode = optimizer, scheduler, mode
        self.train_loss, self.validation_loss, self.first_order = train_loss, validation_loss, bool(first_order)
        self.pes_samples, self.pes_sigma, self.pes_horizon = pes_samples, float(pes_sigma), pes_horizon
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.tuned: list[Tuned] = parse_hyperparameters(hyperparameters, optimizer, scheduler)
        if restart_warmup:
            lr = [t for t in self.tuned if t.name == "lr"]
            problem = ("backtrack is 0, so no restart happens" if not backtrack else
                       "'lr' is not tuned" if not lr else "'lr' is tuned per element; tune it globally or per group"
                       if lr[0].scope == "element" else "a scheduler was given; express the warm-up in it "
                       "(a LambdaLR, whose base rate 'lr' tunes) or drop restart_warmup" if scheduler is not None
                       else "")
            if problem:
                raise ValueError(f"OnlineTuner: restart_warmup={restart_warmup} warms the learning rate up after a "
                                 f"backtracking restart, but {problem}")
        self.raw: dict[Tuned, list[Tensor]] = {t: t.initial_raw(optimizer, scheduler) for t in self.tuned}
        leaves = self.raw_tensors()
        self.meta_optimizer = (meta_optimizer or (lambda ps: torch.optim.Adam(ps, lr=meta_lr)))(leaves)
        if not isinstance(self.meta_optimizer, torch.optim.Optimizer):
            raise TypeError("OnlineTuner: meta_optimizer(raw_tensors) must return a torch.optim.Optimizer, got "
                            f"{type(self.meta_optimizer).__name__}")
        self._commit()  # the replayed values equal the trained ones exactly from the first window on
        self.step_count = 0
        self.backtrack, self.backtrack_factor, self.delay = backtrack, float(backtrack_factor), delay
        self.restart_warmup = restart_warmup
        self.restart_delay = restart_warmup // 2 if restart_delay is None else restart_delay
        #: the step count at which the current run started (0, or the step of the last restart), and
        #: its delay (``delay``, or ``restart_delay`` after a restart that started the warm-up)
        self._run_start, self._run_delay = 0, delay
        #: restarts so far; ``_origin`` is the training state at the first step while restarts are possible
        self.restarts = 0
        self._origin: Snapshot | None = None
        if backtrack and any(t.name == "lr" for t in self.tuned):
            self._origin = Snapshot.capture(optimizer, scheduler)
        #: one entry per tuning step: ``step``, ``validation_loss`` (at the window's end, before the
        #: meta-step), ``values`` after it (per-element values as one mean per tensor) and the scalar
        #: entries of the ``hypergradient`` (d validation loss / d raw value)
        self.history: list[dict[str, Any]] = []
        #: the full hypergradient of the last tuning step, per raw tensor (per-element ones included)
        self.last_hypergradient: dict[str, Tensor] = {}
        self.last_standard_error: float = float("nan")
        #: labels with a hypergradient in some window; scheduler attributes the last window did not use
        #: (known to reach the weights in another window); those warned of
        self._connected: set[str] = set()
        self._skipped_now: set[str] = set()
        self._warned_skipped: set[str] = set()
        self._start: Snapshot | None = None
        self._batches: list[Any] = []
        self._particles: list[list[Snapshot]] | None = None
        self._xi: list[list[Tensor]] = []
        self._windows_since_reset = 0

    # -- public surface -------------------------------------------------------------------
    @property
    def params(self) -> list[Tensor]:
        """The current training weights (the optimizer's)."""
        return list(self.optimizer.params)

    def raw_tensors(self) -> list[Tensor]:
        """The reparameterised values :math:`u` the meta-optimizer moves, in tuning order."""
        return [u for t in self.tuned for u in self.raw[t]]

    def labels(self) -> list[str]:
        """One label per raw tensor (``lr``, ``lr[group 1]``, ...)."""
        return [label for t in self.tuned for label in t.units(self.optimizer)]

    def values(self) -> dict[str, Any]:
        """The current hyperparameter values: a float (scope "global"), a list of floats (per group) or
        a list of tensors (per element)."""
        out: dict[str, Any] = {}
        with torch.no_grad():
            for t in self.tuned:
                natural = t.natural(self.raw[t])
                if t.scope == "element":
                    out[t.name] = [v.detach().clone() for v in natural]
                else:
                    out[t.name] = float(natural[0]) if t.scope == "global" else [float(v) for v in natural]
        return out

    def step(self, batch: Any) -> list[Tensor]:
        """One training step on ``batch`` (then, at the end of each period, one tuning step); returns
        the new weights."""
        tuning = self.step_count - self._run_start - self._run_delay  # steps into this run's tuning periods
        if tuning >= 0 and tuning % self.every == self.every - self.window:
            self._start, self._batches = Snapshot.capture(self.optimizer, self.scheduler), []
        if self._start is not None:
            self._batches.append(batch)
        advance(self.optimizer, self.scheduler, batch, self.train_loss)
        self.step_count += 1
        if tuning >= 0 and (tuning + 1) % self.every == 0:
            self._tune()
        return self.params

    # -- tuning ---------------------------------------------------------------------------
    def _split(self, flat: Sequence[Tensor]) -> dict[Tuned, list[Tensor]]:
        return split(flat, {t: len(self.raw[t]) for t in self.tuned})

    def _natural(self, flat: Sequence[Tensor]) -> dict[Tuned, list[Tensor]]:
        return {t: t.natural(raw) for t, raw in self._split(flat).items()}

    def _commit(self) -> None:
        for t in self.tuned:
            t.commit(self.optimizer, self.scheduler, self.raw[t])
        for k, group in enumerate(self.optimizer.param_groups):
            self.optimizer.rule.validate_group(group, f"OnlineTuner (group {k})")

    def _tune(self) -> None:
        where = f"OnlineTuner, tuning after training step {self.step_count}"
        assert self._start is not None
        leaves = self.raw_tensors()
        if self.mode == "pes":
            value, grads = self._pes(leaves, where)
        else:
            start, batches = self._start, self._batches

            def run(inputs: list[Tensor]) -> tuple[Tensor, DifferentiableOptimizer]:
                work, _ = replay(start, self.optimizer, batches, self.train_loss, self._natural(inputs),
                                 first_order=self.first_order)
                return self.validation_loss(work.params), work

            skipped: list[str] = []
            intermittent = {label for label in self._connected if label.startswith("scheduler.")}
            value, grads = hypergradients(run, leaves, self.labels(), self.mode, where, intermittent, skipped)
            self._note_skipped(skipped)
            self._connected.update(label for label in self.labels() if label not in skipped)
        labels = self.labels()
        self.last_hypergradient = {label: g.detach().clone() for label, g in zip(labels, grads)}
        restart = self._origin is not None and self._lr_too_high(grads)
        if restart:
            self._restart()
        else:
            self._origin = None  # the first period that was not too fast: training goes on from here
            self._meta_step(leaves, grads, [label in self._skipped_now for label in labels])
        values = {name: [float(v.mean()) for v in value] if isinstance(value, list) and value
                  and isinstance(value[0], Tensor) else value for name, value in self.values().items()}
        self.history.append({"step": self.step_count, "validation_loss": float(value), "values": values,
                             "hypergradient": {label: float(g.detach()) for label, g in zip(labels, grads)
                                               if g.dim() == 0},
                             "restarted": restart})
        self._start, self._batches = None, []

    def _lr_too_high(self, grads: Sequence[Tensor]) -> bool:
        r"""Whether the hypergradient says: lower the learning rates, all together, i.e. the derivative of
        the validation loss along :math:`\log s`, every rate :math:`\lambda` scaled by :math:`s`, is
        positive: :math:`\sum g_u\,\lambda / T'(u) > 0` (:math:`g_u` the raw hypergradient)."""
        total = 0.0
        for t, gs in self._split(grads).items():
            if t.name != "lr":
                continue
            for u, g in zip(self.raw[t], gs):
                x = u.detach().requires_grad_()
                with torch.enable_grad():
                    rate = t.natural([x])[0]
                    (slope,) = torch.autograd.grad(rate.sum(), x)
                total += float((g.detach() * rate.detach() / slope).sum())
        return total > 0

    def _restart(self) -> None:
        """Training back to its first step, the learning rate(s) times ``backtrack_factor``."""
        assert self._origin is not None
        origin = self._origin
        origin.restore(self.optimizer)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(origin.scheduler.state_dict())
        with torch.no_grad():
            for t in self.tuned:
                if t.name == "lr":
                    inverse = TRANSFORMS[str(t.transform)][1]
                    for u, v in zip(self.raw[t], t.natural(self.raw[t])):
                        u.copy_(inverse(v * self.backtrack_factor))
        if self.restart_warmup:
            self._install_warmup()
            self._run_delay = self.restart_delay
        self._commit()
        self._particles = None
        self._run_start = self.step_count
        self.restarts += 1
        if self.restarts >= self.backtrack or self.restart_warmup:
            self._origin = None

    def _install_warmup(self) -> None:
        """The restart's warm-up: a LambdaLR of :class:`LinearWarmup` over the optimizer, whose base rates
        ``"lr"`` now tunes (written by :meth:`_commit`)."""
        self.scheduler = LambdaLR(self.optimizer, LinearWarmup(self.restart_warmup))

    def _note_skipped(self, skipped: list[str]) -> None:
        """Scheduler attributes the window's steps did not use: left alone by this meta-step (a zero
        gradient would still move them through the meta-optimizer's momentum), warned once each."""
        self._skipped_now = set(skipped)
        for label in skipped:
            if label not in self._warned_skipped:
                self._warned_skipped.add(label)
                warnings.warn(
                    f"OnlineTuner: {label} got no hypergradient in the window ending at training step "
                    f"{self.step_count}: the scheduler did not use it in those steps (StepLR's or MultiStepLR's "
                    "gamma acts only at a decay step, LinearLR's or ConstantLR's factors only until total_iters, "
                    "...). It keeps its value until a window contains such a step; a longer window (window=) "
                    "reaches more of them (warned once per hyperparameter)", UserWarning, stacklevel=4)

    def _meta_step(self, leaves: list[Tensor], grads: Sequence[Tensor], skip: Sequence[bool] = ()) -> None:
        self.meta_optimizer.zero_grad(set_to_none=True)
        for k, (leaf, g) in enumerate(zip(leaves, grads)):
            if not (k < len(skip) and skip[k]):  # (None: the meta-optimizer leaves it, momentum included)
                leaf.grad = g.detach().clone()
        before = [u.detach().clone() for u in leaves]
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        try:
            self._commit()
        except ValueError as error:  # out of the hyperparameter's range (transform='identity' does not keep it in)
            with torch.no_grad():
                for u, value in zip(leaves, before):
                    u.copy_(value)
            self._commit()
            raise ValueError(
                f"OnlineTuner, tuning after training step {self.step_count}: the meta-step took a hyperparameter "
                f"out of its range ({error}); the values are left as they were before it. A transform keeps each "
                "value in range (the defaults: 'log' for rates, 'logit' for momenta and betas); with "
                "transform='identity' nothing does, so use the default or a smaller meta_lr") from error

    def _pes(self, leaves: list[Tensor], where: str) -> tuple[Tensor, list[Tensor]]:
        """The PES estimate over this window (module docstring), advancing the particles."""
        assert self._start is not None
        if self._particles is None or (self.pes_horizon is not None and self._windows_since_reset >= self.pes_horizon):
            self._particles = [[self._start, self._start] for _ in range(self.pes_samples)]
            self._xi = [[torch.zeros_like(u) for u in leaves] for _ in range(self.pes_samples)]
            self._windows_since_reset = 0
        self._windows_since_reset += 1
        centre = [u.detach() for u in leaves]
        samples: list[list[Tensor]] = []
        for i in range(self.pes_samples):
            noise = [torch.randn(u.shape, generator=self.generator, dtype=u.dtype).to(u.device) * self.pes_sigma
                     for u in centre]
            losses = []
            for k, sign in enumerate((1.0, -1.0)):
                work, scheduler = self._particles[i][k].working_copy(self.optimizer)
                with torch.no_grad():
                    for t, values in self._natural([u + sign * e for u, e in zip(centre, noise)]).items():
                        t.write(work, scheduler, values)
                for batch in self._batches:
                    advance(work, scheduler, batch, self.train_loss)
                with torch.no_grad():
                    loss = self.validation_loss(work.params)
                if not isinstance(loss, Tensor) or loss.numel() != 1 or not torch.isfinite(loss).all():
                    raise NonFiniteError(f"{where}: PES particle {i}{'+-'[k]}: the validation loss is {loss!r}; "
                                         "lower pes_sigma or the meta learning rate")
                losses.append(loss.reshape(()))
                self._particles[i][k] = Snapshot.capture(work, scheduler)
            self._xi[i] = [x + e for x, e in zip(self._xi[i], noise)]
            scale = (losses[0] - losses[1]) / (2 * self.pes_sigma**2)
            samples.append([scale * x for x in self._xi[i]])
        stacked = [torch.stack([s[j] for s in samples]) for j in range(len(leaves))]
        if self.pes_samples > 1:
            variance = sum(float(s.var(0, unbiased=True).sum()) for s in stacked)
            self.last_standard_error = math.sqrt(variance / self.pes_samples)
        with torch.no_grad():
            value = self.validation_loss(self.optimizer.params)
        return value.detach(), [s.mean(0) for s in stacked]

    # -- saving and resuming ----------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"hyperparameters": [[t.name, t.scope, t.transform] for t in self.tuned], "every": self.every,
                "window": self.window, "mode": self.mode, "pes_samples": self.pes_samples,
                "backtrack": self.backtrack, "backtrack_factor": self.backtrack_factor, "delay": self.delay,
                "restart_warmup": self.restart_warmup, "restart_delay": self.restart_delay}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit: the optimizer's weights, state and
        groups, the scheduler, the raw values and the meta-optimizer, the window being recorded (its
        start and batches), PES's particles and generator, and the history. Tensors and plain values
        only (``torch.load(weights_only=True)`` reads it)."""
        return {
            "config": self._config(), "step_count": self.step_count, "restarts": self.restarts,
            "run_start": self._run_start, "run_delay": self._run_delay,
            "warmup_installed": self.restart_warmup > 0 and self.scheduler is not None,
            "origin": None if self._origin is None else self._origin.payload(),
            "training": Snapshot.capture(self.optimizer, self.scheduler).payload(),
            "raw": [u.detach().clone() for u in self.raw_tensors()],
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "start": None if self._start is None else self._start.payload(), "batches": list(self._batches),
            "particles": None if self._particles is None else [[p.payload() for p in pair]
                                                               for pair in self._particles],
            "xi": [[x.clone() for x in xi] for xi in self._xi], "windows_since_reset": self._windows_since_reset,
            "generator": self.generator.get_state(), "history": self.history,
            "last_hypergradient": self.last_hypergradient,
            "connected": sorted(self._connected), "warned_skipped": sorted(self._warned_skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (a tuner built with the same settings, optimizer and scheduler)."""
        saved = dict(state.get("config") or {})
        for key in ("delay", "restart_warmup"):  # checkpoints from before these options
            saved.setdefault(key, 0)
        saved.setdefault("restart_delay", saved["restart_warmup"] // 2)
        if saved != self._config():
            raise ValueError(f"OnlineTuner.load_state_dict: the saved tuner was built with {state.get('config')}, "
                             f"this one with {self._config()}; build it with the same settings")
        self._check_same_run(state)
        if self.restart_warmup:  # the scheduler is the tuner's own: there iff the saved run had restarted
            self.scheduler = None
            if state.get("warmup_installed"):
                self._install_warmup()
        Snapshot.from_payload(state["training"], self.scheduler).restore(self.optimizer)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["training"]["scheduler"])
        with torch.no_grad():
            for u, saved in zip(self.raw_tensors(), state["raw"], strict=True):
                u.copy_(saved)
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.step_count = int(state["step_count"])
        self.restarts = int(state["restarts"])
        self._run_start = int(state.get("run_start", 0))
        self._run_delay = int(state.get("run_delay", self.delay))
        self._origin = None if state["origin"] is None else Snapshot.from_payload(state["origin"], self.scheduler)
        self._start = None if state["start"] is None else Snapshot.from_payload(state["start"], self.scheduler)
        self._batches = list(state["batches"])
        self._particles = None if state["particles"] is None else [
            [Snapshot.from_payload(p, self.scheduler) for p in pair] for pair in state["particles"]]
        self._xi = [list(xi) for xi in state["xi"]]
        self._windows_since_reset = int(state["windows_since_reset"])
        self.generator.set_state(state["generator"])
        self.history = list(state["history"])
        self.last_hypergradient = dict(state["last_hypergradient"])
        # (checkpoints from before these: every label that has a hypergradient in the history reached the weights)
        self._connected = set(state.get("connected", {label for h in self.history for label in h["hypergradient"]}))
        self._warned_skipped = set(state.get("warned_skipped", ()))

    def _check_same_run(self, state: dict[str, Any]) -> None:
        """Refuse, before anything is loaded, a checkpoint of other parameters (count, shapes) or one
        saved with a scheduler into a tuner without one (or the reverse)."""
        saved = [tuple(p.shape) for p in state["training"]["params"]]
        here = [tuple(p.shape) for p in self.optimizer.params]
        if saved != here:
            raise ValueError(f"OnlineTuner.load_state_dict: the checkpoint trained {len(saved)} parameters of shapes "
                             f"{saved}, this tuner's optimizer has {len(here)} of shapes {here}; load it into a "
                             "tuner built over the same model")
        if not self.restart_warmup and (state["training"]["scheduler"] is None) != (self.scheduler is None):
            had, has = ("a", "no") if self.scheduler is None else ("no", "a")
            raise ValueError(f"OnlineTuner.load_state_dict: the checkpoint was saved with {had} scheduler, this "
                             f"tuner has {has} scheduler=; build it as the saved one was")

    def save(self, path: str | PathLike[str]) -> None:
        """Write :meth:`state_dict` atomically (a crash leaves the old file or the new one)."""
        check_writable(path, "tuner checkpoint")
        atomic_save(path, self.state_dict())

    def load(self, path: str | PathLike[str]) -> None:
        """Resume from a file written by :meth:`save` (read with ``weights_only=True``)."""
        self.load_state_dict(safe_load(path, "diffopt tuner checkpoint"))

    def __repr__(self) -> str:
        return (f"OnlineTuner({type(self.optimizer).__name__}, {[t.name for t in self.tuned]}, every={self.every}, "
                f"window={self.window}, mode={self.mode!r}, delay={self.delay}, step {self.step_count})")
