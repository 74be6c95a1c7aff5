r"""A window of training steps replayed from a snapshot, and its hypergradient.

Training runs from weights :math:`w_s` and optimizer state :math:`S_s` through the batches
:math:`b_s, \dots, b_{s+k-1}` of a window,

.. math::
    (w_{t+1}, S_{t+1}) = \Phi\big(w_t, S_t, \nabla_w L_{\mathrm{train}}(w_t, b_t); \lambda\big),

and the hypergradient of the window is :math:`\mathrm d L_{\mathrm{val}}(w_{s+k}) / \mathrm d\lambda`
with :math:`(w_s, S_s)` held constant (the truncation: what happened before the window is not
differentiated). It is taken in

* **reverse mode**: the k steps are replayed on the autograd graph (with the graph through the
  training gradients, unless ``first_order``) and :math:`L_{\mathrm{val}}` is differentiated once;
  memory grows with k, cost is about that of 3k training steps whatever the number of hyperparameters;
* **forward mode**: the k steps are replayed with ``torch.autograd.forward_ad`` tangents
  :math:`\mathrm d(w_t, S_t)/\mathrm d\lambda_j` (Franceschi et al., 2017, "Forward and reverse
  gradient-based hyperparameter optimization"), one replay per scalar hyperparameter :math:`\lambda_j`;
  memory flat in k, so it suits long windows and a few scalars.

Both are exact for the window and agree to rounding (tests/test_hyper_tuner.py: 1e-10 in float64).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ..errors import NonFiniteError
from ..optim import DifferentiableOptimizer, PerParameter, Schedule
from ..optim._gradients import loss_gradients
from ._hyperparameters import Tuned

__all__ = ["Snapshot", "TrainLoss", "ValidationLoss", "advance", "hypergradient", "split", "window_loss"]

TrainLoss = Callable[[list[Tensor], Any], Tensor]
ValidationLoss = Callable[[list[Tensor]], Tensor]
MODES = ("reverse", "forward")

DROPPED_GRAPH_FIX = (
    "the optimizer dropped the graph: a grad_transform, update rule or scheduler that detaches (.detach(), "
    ".item(), float(...)) or runs under torch.no_grad() does this; diffopt.optim's optimizers and schedulers keep it"
)


@dataclass
class Snapshot:
    """Weights, optimizer state, step count, parameter groups and scheduler at one training step.

    Update rules never write in place, so the state tensors are shared, not copied."""

    params: list[Tensor]
    states: list[dict[str, Any] | None]
    step_count: int
    groups: list[dict[str, Any]]
    scheduler: Any = None

    @classmethod
    def capture(cls, optimizer: DifferentiableOptimizer, scheduler: Any = None) -> Snapshot:
        return cls([p.detach() for p in optimizer.params], [None if s is None else dict(s) for s in optimizer.state],
                   optimizer.step_count, [dict(g) for g in optimizer.param_groups],
                   None if scheduler is None else copy_scheduler(scheduler, scheduler.optimizer))

    def working_copy(self, template: DifferentiableOptimizer, *, first_order: bool = False
                     ) -> tuple[DifferentiableOptimizer, Any]:
        """An optimizer (a shallow copy of ``template``, its settings) and scheduler at this snapshot."""
        work = copy.copy(template)
        self.restore(work)
        work.params = [p.detach().requires_grad_() for p in self.params]
        work.first_order = first_order
        scheduler = None
        if self.scheduler is not None:
            scheduler = copy_scheduler(self.scheduler, work)
        return work, scheduler

    def restore(self, optimizer: DifferentiableOptimizer) -> None:
        """Put ``optimizer`` at this snapshot: its weights, state, step count and groups (the dicts
        copied, so the snapshot stays as it is)."""
        optimizer.params = list(self.params)
        optimizer.state = [None if s is None else dict(s) for s in self.states]
        optimizer.step_count = self.step_count
        optimizer.param_groups = [dict(g) for g in self.groups]

    # -- saving ------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        """Tensors and plain values only (``torch.load(weights_only=True)`` reads it back)."""
        return {"params": [p.detach().clone() for p in self.params],
                "states": [None if s is None else {k: _plain(v) for k, v in s.items()} for s in self.states],
                "step_count": self.step_count,
                "groups": [{k: _plain(v) for k, v in g.items()} for g in self.groups],
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict()}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], scheduler_template: Any = None) -> Snapshot:
        scheduler = None
        if payload["scheduler"] is not None:
            scheduler = copy_scheduler(scheduler_template, scheduler_template.optimizer)
            scheduler.load_state_dict(payload["scheduler"])
        return cls(list(payload["params"]), [None if s is None else {k: _unplain(v) for k, v in s.items()}
                                             for s in payload["states"]],
                   int(payload["step_count"]), [{k: _unplain(v) for k, v in g.items()} for g in payload["groups"]],
                   scheduler)


def copy_scheduler(scheduler: Any, optimizer: Any) -> Any:
    """A copy of ``scheduler`` that steps ``optimizer``: shallow (a tuned tensor attribute stays the same
    tensor, on the graph), with a composite's sub-schedulers (``SequentialLR``, ``ChainedScheduler``:
    ``_schedulers``) copied and rebound the same way, so that stepping the copy never moves the original
    or the optimizer it drives (a shallow copy had shared the live sub-schedulers)."""
    twin = copy.copy(scheduler)
    twin.optimizer = optimizer
    if hasattr(scheduler, "_schedulers"):
        twin._schedulers = [copy_scheduler(s, optimizer) for s in scheduler._schedulers]
    return twin


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, PerParameter):
        return {"__per_parameter__": [_plain(v) for v in value.values]}
    if isinstance(value, Schedule):
        raise TypeError("the tuner's state_dict cannot save a Schedule hyperparameter; give the group a number "
                        "or use a diffopt.optim.lr_scheduler scheduler")
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _unplain(value: Any) -> Any:
    if isinstance(value, dict) and "__per_parameter__" in value:
        return PerParameter([_unplain(v) for v in value["__per_parameter__"]])
    if isinstance(value, tuple):
        return tuple(_unplain(v) for v in value)
    return value


def advance(optimizer: DifferentiableOptimizer, scheduler: Any, batch: Any, train_loss: TrainLoss) -> Tensor:
    """One ordinary training step (no graph kept), then ``scheduler.step()``; returns the training loss."""
    params = [p.detach().requires_grad_() for p in optimizer.params]
    with torch.enable_grad():
        loss = train_loss(params, batch)
        grads = loss_gradients(loss, params, optimizer.step_count, first_order=True,
                               check_finite=optimizer.check_finite)
    with torch.no_grad():
        optimizer.step(params=params, grads=grads)
    optimizer.params = [p.detach() for p in optimizer.params]
    if scheduler is not None:
        scheduler.step()
    return loss.detach()


def replay(start: Snapshot, template: DifferentiableOptimizer, batches: Sequence[Any], train_loss: TrainLoss,
           values: Mapping[Tuned, Sequence[Tensor]], *, first_order: bool = False
           ) -> tuple[DifferentiableOptimizer, Any]:
    """The window's steps from ``start`` with ``values`` written in, on the graph."""
    work, scheduler = start.working_copy(template, first_order=first_order)
    for tuned, tensors in values.items():
        tuned.write(work, scheduler, list(tensors))
    with torch.enable_grad():
        for batch in batches:
            work.step(train_loss(work.params, batch))
            if scheduler is not None:
                scheduler.step()
    return work, scheduler


def _check_validation(loss: Any, where: str) -> None:
    """Refuse a validation loss that is not a finite scalar tensor computed from the weights it is given."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else ""
        raise TypeError(f"{where}: validation_loss(params) must return a scalar tensor, got {type(loss).__name__}"
                        f"{shape}")
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteError(f"{where}: the validation loss is {float(loss.detach())}; lower the learning rate "
                             "or the meta learning rate, or check the data")
    if not loss.requires_grad:
        raise ValueError(f"{where}: the validation loss does not depend on the weights passed to "
                         "validation_loss(params); compute it from those tensors (e.g. torch.func.functional_call("
                         "model, dict(zip(names, params)), x)), not from model(x), whose weights the tuner never "
                         "changes, and not under torch.no_grad()")


def _independent(where: str, dropped: list[str], unused: list[str]) -> ValueError:
    """The error for hyperparameters the validation loss does not depend on, saying why."""
    if dropped:
        return ValueError(
            f"{where}: the weights after the window do not depend on {', '.join(dropped)}, so its hypergradient "
            "would be silently zero. Either the optimizer does not use it in these steps (momentum and betas act "
            "only from the second step of a fresh optimizer: lengthen the window; or the optimizer's settings "
            f"ignore it), or {DROPPED_GRAPH_FIX}")
    return ValueError(
        f"{where}: the validation loss after the window does not depend on {', '.join(unused)}, although the "
        "weights do, so its hypergradient would be silently zero; compute validation_loss from the weights it "
        "moves, or stop tuning it")


def hypergradients(run: Callable[[list[Tensor]], tuple[Tensor, DifferentiableOptimizer]], leaves: Sequence[Tensor],
                   labels: Sequence[str], mode: str, where: str, tolerate: Collection[str] = (),
                   skipped: list[str] | None = None) -> tuple[Tensor, list[Tensor]]:
    """``(L, dL/d leaves)`` for ``L, work = run(leaves)``, in reverse or forward mode; an error names
    every leaf ``L`` does not depend on (and whether the optimizer dropped the graph), and a
    non-finite derivative. A leaf labelled in ``tolerate`` that the weights do not depend on in this
    window is not an error (a scheduler attribute known to reach the weights in other windows:
    StepLR's gamma acts only at its decay steps): its gradient is zero and its label goes to ``skipped``."""
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {MODES} here, got {mode!r}")
    dropped: list[str] = []
    unused: list[str] = []
    if mode == "reverse":
        inputs = [leaf.detach().requires_grad_() for leaf in leaves]
        loss, work = run(inputs)
        _check_validation(loss, where)
        found = torch.autograd.grad(loss.reshape(()), inputs, allow_unused=True, retain_graph=True)
        missing = [j for j, g in enumerate(found) if g is None]
        if missing:
            moved = [p.sum() for p in work.params if p.requires_grad]
            reach = torch.autograd.grad(moved, [inputs[j] for j in missing], allow_unused=True) if moved else \
                [None] * len(missing)
            for j, r in zip(missing, reach):
                (dropped if r is None else unused).append(labels[j])
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(found, inputs)]
        value = loss.detach()
    else:
        grads = [torch.zeros_like(leaf) for leaf in leaves]
        value = torch.tensor(float("nan"))
        for j, leaf in enumerate(leaves):
            flat = grads[j].view(-1)
            for e in range(leaf.numel()):
                direction = torch.zeros_like(leaf)
                direction.view(-1)[e] = 1
                with fwAD.dual_level():
                    inputs = [fwAD.make_dual(x.detach(), direction) if k == j else x.detach()
                              for k, x in enumerate(leaves)]
                    try:
                        loss, work = run(inputs)
                    except (RuntimeError, NotImplementedError) as error:
                        if not _forward_ad_limitation(error):
                            raise
                        raise RuntimeError(
                            f"{where}: forward mode failed inside PyTorch's forward-mode AD ({error}): it cannot "
                            "take the forward derivative of some losses' gradients (F.mse_loss / nn.MSELoss: "
                            "'ZeroTensors are immutable'; F.huber_loss: not implemented). Use mode='reverse' (the "
                            "same hypergradient), or write the loss out, e.g. ((prediction - target) ** 2).mean()"
                        ) from error
                    _check_validation(loss, where)
                    primal, tangent = fwAD.unpack_dual(loss)
                    if tangent is None:
                        moved = any(fwAD.unpack_dual(p).tangent is not None for p in work.params)
                        (unused if moved else dropped).append(labels[j])
                        break
                    flat[e] = tangent.reshape(())
                    value = primal.detach()
    if skipped is not None:
        skipped.extend(label for label in dropped if label in tolerate)
    dropped = [label for label in dropped if label not in tolerate]
    if dropped or unused:
        raise _independent(where, dropped, unused)
    for g, label in zip(grads, labels):
        if not torch.isfinite(g).all():
            raise NonFiniteError(f"{where}: the hypergradient of {label} is not finite; lower the meta learning "
                                 "rate, shorten the window or clip the training gradients (clip_grad_norm=...)")
    return value, grads



def _forward_ad_limitation(error: Exception) -> bool:
    """Whether ``error`` is one of PyTorch's forward-mode AD gaps (not a problem of the user's code)."""
    text = str(error)
    return ("ZeroTensors are immutable" in text or "forward AD" in text or "forward-mode AD" in text
            or ("derivative for" in text and "not implemented" in text))

def split(flat: Sequence[Tensor], counts: Mapping[Tuned, int]) -> dict[Tuned, list[Tensor]]:
    """``flat`` (the tensors of every tuned hyperparameter, in order) cut into ``counts[t]`` tensors per ``t``."""
    out, k = {}, 0
    for t, n in counts.items():
        out[t], k = list(flat[k:k + n]), k + n
    return out


def _as_values(values: Mapping[Any, Any], optimizer: DifferentiableOptimizer, mode: str
               ) -> dict[Tuned, list[Tensor]]:
    """``{name or Tuned: tensor or [tensors]}`` -> ``{Tuned: [tensors]}``, refusing Python numbers and
    (in reverse mode) tensors that do not require grad, and counts that do not match the scope."""
    out: dict[Tuned, list[Tensor]] = {}
    for key, value in values.items():
        tuned = key if isinstance(key, Tuned) else Tuned(key)
        tensors = list(value) if isinstance(value, (list, tuple)) else [value]
        for k, t in enumerate(tensors):
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"hypergradient: values[{tuned.name!r}] is a Python {type(t).__name__} ({t!r}), which no "
                    f"gradient can reach; pass a tensor: torch.tensor({t!r}, dtype=torch.float64, requires_grad=True)")
            if mode == "reverse" and not t.requires_grad:
                raise ValueError(f"hypergradient: values[{tuned.name!r}] does not require grad; create it with "
                                 "requires_grad=True (or call .requires_grad_()) to differentiate with respect to it")
        expected = {"global": 1, "group": len(optimizer.param_groups), "element": len(optimizer.params)}[tuned.scope]
        if len(tensors) != expected:
            raise ValueError(f"hypergradient: values[{tuned.name!r}] has {len(tensors)} tensors; scope "
                             f"{tuned.scope!r} takes {expected}")
        for k, t in enumerate(tensors):  # a wrong shape would broadcast silently (a (3,) lr over a (4, 3) weight)
            if tuned.scope == "element" and t.dim() > 0 and t.shape != optimizer.params[k].shape:
                raise ValueError(f"hypergradient: values[{tuned.name!r}][{k}] has shape {tuple(t.shape)}, but "
                                 f"parameter {k} has shape {tuple(optimizer.params[k].shape)}; scope 'element' "
                                 "takes one value per element (the parameter's shape) or one number (0-dim)")
            if tuned.scope != "element" and t.dim() != 0:
                raise ValueError(f"hypergradient: values[{tuned.name!r}] has shape {tuple(t.shape)}; scope "
                                 f"{tuned.scope!r} takes one number per tensor (0-dim); use "
                                 "Tuned(name, 'element') for per-element values")
        out[tuned] = tensors
    return out


def _check_batches(batches: Sequence[Any], name: str) -> None:
    if len(batches) == 0:
        raise ValueError(f"{name}: batches is empty, so there are no training steps to differentiate through; "
                         "pass the window's training batches (one per step)")


def window_loss(optimizer: DifferentiableOptimizer, batches: Sequence[Any], train_loss: TrainLoss,
                validation_loss: ValidationLoss, values: Mapping[Any, Any], *, scheduler: Any = None,
                first_order: bool = False) -> Tensor:
    """``validation_loss(w)`` after ``len(batches)`` training steps from the optimizer's current weights,
    state and scheduler, with the hyperparameters ``values`` (``{"lr": tensor}``, ``{Tuned("lr", "group"):
    [one per group]}``, ...), differentiable with respect to every tensor in ``values``. The optimizer
    and scheduler are left untouched."""
    tuned = _as_values(values, optimizer, "values")
    _check_batches(batches, "window_loss")
    work, _ = replay(Snapshot.capture(optimizer, scheduler), optimizer, batches, train_loss, tuned,
                     first_order=first_order)
    return validation_loss(work.params)


def hypergradient(optimizer: DifferentiableOptimizer, batches: Sequence[Any], train_loss: TrainLoss,
                  validation_loss: ValidationLoss, values: Mapping[Any, Any], *, scheduler: Any = None,
                  mode: str = "reverse", first_order: bool = False) -> dict[str, list[Tensor]]:
    """The gradient of :func:`window_loss` with respect to ``values``, by ``mode`` (``"reverse"`` or
    ``"forward"``), as ``{name: [one tensor per value]}``.

    Example::

        lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        grads = diffopt.hyper.hypergradient(opt, batches, train_loss, val_loss, {"lr": lr})
        grads["lr"][0]     # d val_loss / d lr through len(batches) SGD steps

    Raises ``TypeError`` for a Python number where a tensor is needed, ``ValueError`` when the
    validation loss does not depend on a value (naming it) or the optimizer drops the graph."""
    if not isinstance(optimizer, DifferentiableOptimizer):
        raise TypeError(f"hypergradient: optimizer must be a diffopt.optim optimizer, got {type(optimizer).__name__}"
                        "; convert a torch.optim one with diffopt.optim.from_torch(opt)")
    tuned = _as_values(values, optimizer, mode)
    _check_batches(batches, "hypergradient")
    start = Snapshot.capture(optimizer, scheduler)
    counts = {t: len(tensors) for t, tensors in tuned.items()}
    leaves = [x for tensors in tuned.values() for x in tensors]
    labels = [label for t in tuned for label in t.units(optimizer)]

    def run(inputs: list[Tensor]) -> tuple[Tensor, DifferentiableOptimizer]:
        work, _ = replay(start, optimizer, batches, train_loss, split(inputs, counts), first_order=first_order)
        return validation_loss(work.params), work

    _, grads = hypergradients(run, leaves, labels, mode, "hypergradient")
    return {t.name: g for t, g in split(grads, counts).items()}
