r"""The parts every example-reweighting learner shares: the user's optimizer seen twice, per-example
losses checked, and the clean meta data.

**The optimizer seen twice.** A reweighting step asks "where would one step of *this* optimizer take
the weights if the examples were weighted so?" and then takes the real step. :class:`Lookahead` holds
the user's optimizer (a ``torch.optim`` optimizer or a :class:`~diffopt.optim.DifferentiableOptimizer`)
and gives

* :meth:`Lookahead.look_ahead` — one step of the optimizer's differentiable twin (converted with
  :func:`~diffopt.optim.from_torch`, with its current hyperparameters and state: momentum buffers,
  Adam's moments, step counts), returned as new weights on the autograd graph, keyed by
  ``model.named_parameters()`` names. Nothing of the user's is changed;
  With ``kind="sgd"`` the look-ahead is instead a plain SGD step at each group's learning rate (no
  momentum, no state), as in both papers' code;
* :meth:`Lookahead.step` — the real step: the optimizer's own ``step()`` on the gradients of the
  loss given, so training follows exactly the trajectory the optimizer takes on that loss.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch import Tensor, nn

from ..errors import NonFiniteError
from ..optim import SGD, DifferentiableOptimizer, from_torch
from ..optim.convert import twin_class
from ..unroll.functional import ParameterLayout, call

Optimizer = Union[torch.optim.Optimizer, DifferentiableOptimizer]
LossFn = Callable[[Any, Tensor], Tensor]

LOOKAHEADS = ("optimizer", "sgd")
REDUCTION_FIX = ("pass a loss with reduction='none', e.g. nn.CrossEntropyLoss(reduction='none') or "
                 "lambda out, y: F.cross_entropy(out, y, reduction='none')")


class Lookahead:
    """The user's ``optimizer`` over (a subset of) ``model``'s parameters, for a look-ahead step
    (``kind``: "optimizer" or "sgd") and the real step. ``where`` names the learner in error messages."""

    def __init__(self, model: nn.Module, optimizer: Optimizer, where: str, kind: str = "optimizer") -> None:
        if kind not in LOOKAHEADS:
            raise ValueError(f"{where}(lookahead=...): expected one of {LOOKAHEADS}, got {kind!r}")
        if isinstance(optimizer, torch.optim.Optimizer):
            twin_class(optimizer)  # no differentiable twin (e.g. LBFGS): refuse now, not at the first step
            params = [p for group in optimizer.param_groups for p in group["params"]]
        elif isinstance(optimizer, DifferentiableOptimizer):
            params = list(optimizer.params)
        else:
            raise TypeError(f"{where}(optimizer=...): expected a torch.optim optimizer or a diffopt.optim one, "
                            f"got {type(optimizer).__name__}")
        layout = ParameterLayout(model)
        positions = layout.positions(params, what=f"{where}(optimizer=...): parameter",
                                     fix="build the optimizer on model.parameters() (or a subset of them)")
        not_leaves = [layout.names[j] for j, p in zip(positions, params) if not (p.is_leaf and p.requires_grad)]
        if not_leaves:
            raise ValueError(f"{where}(optimizer=...): the parameters {not_leaves} are not leaf tensors that "
                             "require grad; build the optimizer on the model's own parameters, not on the "
                             "output of an earlier differentiable step")
        self.model = model
        self.optimizer = optimizer
        self.params = params
        self.names = [layout.names[j] for j in positions]
        self.kind = kind

    def look_ahead(self, loss: Tensor) -> dict[str, Tensor]:
        """The weights after one differentiable step of the optimizer on ``loss`` (a graph through the
        gradients, so derivatives reach whatever ``loss`` was weighted by), keyed by parameter name."""
        if self.kind == "sgd":
            groups, position = [], 0
            for group in self.optimizer.param_groups:  # the same groups (in order) with their learning rates
                count = len(group["params"])
                groups.append({"params": self.params[position:position + count], "lr": group["lr"]})
                position += count
            twin = SGD(groups)
        elif isinstance(self.optimizer, torch.optim.Optimizer):
            twin = from_torch(self.optimizer)
        else:
            twin = self.optimizer.bound_to(self.params, first_order=False)
        return dict(zip(self.names, twin.step(loss)))

    def step(self, loss: Tensor) -> None:
        """The real step: the optimizer's own update on ``d loss / d params`` (``None`` for a parameter
        the loss does not reach, as after ``zero_grad(set_to_none=True)`` and ``backward()``)."""
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        if isinstance(self.optimizer, torch.optim.Optimizer):
            for p, g in zip(self.params, grads):
                p.grad = g
            self.optimizer.step()
            return
        with torch.no_grad():
            new = self.optimizer.step(params=self.params, grads=grads)
            for p, value in zip(self.params, new):
                p.copy_(value)
        self.optimizer.params = list(self.params)  # the optimizer keeps stepping the model's own tensors

    def evaluate(self, weights: Mapping[str, Tensor], x: Tensor) -> Any:
        """``model(x)`` at ``weights`` (the others: the model's own), on copies of the model's buffers,
        so BatchNorm's running statistics are not updated by a look-ahead evaluation."""
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        return call(self.model, weights, x, buffers=buffers)


def check_loss_fn(loss_fn: Any, where: str) -> None:
    """Refuse a loss module that averages over the batch, and anything not callable."""
    if not callable(loss_fn):
        raise TypeError(f"{where}(loss_fn=...): expected a callable loss_fn(output, target) returning one loss per "
                        f"example, got {type(loss_fn).__name__}")
    reduction = getattr(loss_fn, "reduction", "none")
    if reduction != "none":
        raise ValueError(f"{where}(loss_fn=...): {type(loss_fn).__name__} has reduction={reduction!r}, so it "
                         f"returns one number for the whole batch; {REDUCTION_FIX}")


def per_example_losses(loss_fn: LossFn, output: Any, target: Tensor, count: int, where: str) -> Tensor:
    """``loss_fn(output, target)`` as a vector of ``count`` per-example losses.

    A loss with more dimensions (``MSELoss(reduction='none')`` on ``(n, d)`` targets) is averaged over
    all but the first, so that uniform weights ``1/n`` give the loss ``reduction='mean'`` would.
    A scalar, a wrong length or a non-finite value raises, naming ``where`` and the fix.
    """
    losses = loss_fn(output, target)
    if not isinstance(losses, Tensor):
        raise TypeError(f"{where}: loss_fn returned {type(losses).__name__}; it must return a tensor of one loss "
                        "per example")
    if losses.dim() == 0:
        raise ValueError(f"{where}: loss_fn returned one number for {count} examples, but reweighting needs one "
                         f"loss per example; {REDUCTION_FIX}")
    if losses.shape[0] != count:
        raise ValueError(f"{where}: loss_fn returned shape {tuple(losses.shape)} for {count} examples; it must "
                         f"return one loss per example (shape ({count},)); {REDUCTION_FIX}")
    if losses.dim() > 1:
        losses = losses.reshape(count, -1).mean(dim=1)
    bad = ~torch.isfinite(losses.detach())
    if bad.any():
        indices = bad.nonzero().flatten().tolist()
        raise NonFiniteError(f"{where}: the losses of examples {indices[:10]}{' ...' if len(indices) > 10 else ''} "
                             f"are {losses.detach()[bad][:3].tolist()}; check those inputs and targets, or lower the "
                             "learning rate if the model has diverged")
    return losses


class MetaData:
    """The clean meta (validation) set ``(x_val, y_val)``: checked once, and sampled per step.

    ``batch_size=None`` uses every example at every step; otherwise a batch is drawn without
    replacement from ``generator`` at each step.
    """

    def __init__(self, meta_data: Any, batch_size: int | None, generator: torch.Generator, where: str) -> None:
        if not (isinstance(meta_data, (tuple, list)) and len(meta_data) == 2
                and all(isinstance(t, Tensor) for t in meta_data)):
            raise TypeError(f"{where}(meta_data=...): expected a pair of tensors (x_val, y_val), the clean "
                            f"validation inputs and targets; got {_describe(meta_data)}")
        x, y = meta_data
        if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"{where}(meta_data=...): x_val has shape {tuple(x.shape)} and y_val "
                             f"{tuple(y.shape)}; both need the same number (>= 1) of examples along dimension 0")
        if batch_size is not None and not (isinstance(batch_size, int) and 1 <= batch_size <= x.shape[0]):
            raise ValueError(f"{where}(meta_batch_size=...): expected None (the whole meta set) or an int in "
                             f"[1, {x.shape[0]}], got {batch_size!r}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.generator = generator
        self.where = where

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def check_like(self, x: Tensor, y: Tensor) -> None:
        """Refuse training data shaped unlike the meta data (or inputs and targets of different lengths)."""
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"{self.where}.step(x, y): x and y must be tensors, got {type(x).__name__} and "
                            f"{type(y).__name__}")
        if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"{self.where}.step(x, y): x has shape {tuple(x.shape)} and y {tuple(y.shape)}; both "
                             "need the same number (>= 1) of examples along dimension 0")
        for name, train, meta in (("x", x, self.x), ("y", y, self.y)):
            if train.shape[1:] != meta.shape[1:]:
                raise ValueError(f"{self.where}: meta_data's {name}_val has examples of shape {tuple(meta.shape[1:])} "
                                 f"but the training {name} has {tuple(train.shape[1:])}; the clean meta set must be "
                                 "shaped like the training data")

    def batch(self) -> tuple[Tensor, Tensor]:
        if self.batch_size is None:
            return self.x, self.y
        pick = torch.randperm(len(self), generator=self.generator)[:self.batch_size].to(self.x.device)
        return self.x[pick], self.y[pick]


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}: ({', '.join(type(v).__name__ for v in value)})"
    return type(value).__name__
