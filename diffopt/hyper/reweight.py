r"""Learning to reweight training examples from a small clean set, inside your own training loop.

Two learners, each a few lines for the user::

    rw = LearningToReweight(model, optimizer, loss_fn=nn.CrossEntropyLoss(reduction="none"),
                            meta_data=(x_val, y_val))
    for x, y in loader:
        result = rw.step(x, y)          # result.loss, result.weights (one per example)

``optimizer`` is the model's own optimizer — a ``torch.optim`` one (its differentiable twin from
:func:`~diffopt.optim.from_torch` takes the look-ahead step) or a :mod:`diffopt.optim` one — and the
real step is that optimizer's own step on the weighted loss :math:`\sum_i w_i \ell_i(\theta)`.

**Learning to Reweight** (Ren, Zeng, Yang & Urtasun, ICML 2018, "Learning to Reweight Examples for
Robust Deep Learning"). Per training batch, with per-example weights :math:`\epsilon` at zero,

.. math::
    \theta'(\epsilon) &= \mathrm{step}\big(\theta, \nabla_\theta \textstyle\sum_i \epsilon_i \ell_i(\theta)\big)
        \qquad\text{(one look-ahead step of the optimizer)} \\
    g_i &= \partial L_{\mathrm{val}}(\theta'(\epsilon)) / \partial \epsilon_i \big|_{\epsilon = 0} \\
    \tilde w_i &= \max(-g_i, 0), \qquad
    w_i = \tilde w_i \big/ \big(\textstyle\sum_j \tilde w_j + \delta(\sum_j \tilde w_j)\big)

with :math:`\delta(0) = 1` and :math:`\delta(a) = 0` otherwise (the paper's normalisation): when no example
helps the clean loss, every weight is 0 and the real step sees a zero gradient (momentum and weight
decay still act, as they would in the optimizer). For plain SGD,
:math:`g_i = -\alpha\,\nabla L_{\mathrm{val}}(\theta)^\top \nabla \ell_i(\theta)`: an example is kept in
proportion to how well its gradient agrees with the clean set's. With momentum the look-ahead starts
from the momentum step and :math:`g_i` is scaled by :math:`1-\tau` (Nesterov: :math:`1+\mu`); with
Adam the inner product is preconditioned by Adam's denominator. (At Adam's very first step, with no
second moment yet, the derivative of :math:`\sqrt{v}` at 0 is taken as 0 — see
:func:`~diffopt.optim.safe_sqrt` — and the normalised weights equal plain SGD's.)

In practice L2RW's weights concentrate on the few examples of a batch whose gradients agree most with
the clean one, so the weighted gradient cancels less than a batch mean does: on the digits with an
MLP without normalisation layers, training with SGD momentum 0.9 (lr 0.1 or 0.03) diverged, while
plain SGD trained well (``benchmarks/RESULTS.md``, section 6). Meta-Weight-Net's weights, a smooth
function of the loss, did not show this.

**Meta-Weight-Net** (Shu, Xie, Yi, Zhao, Zhou, Xu & Meng, NeurIPS 2019, "Meta-Weight-Net: Learning an
Explicit Mapping For Sample Weighting"). A small network :math:`V(\ell; \Theta)` (1-100-1, ReLU,
sigmoid output) maps each example's loss (a constant input, as in the authors' code) to its weight.
Per training batch:

.. math::
    \hat\theta(\Theta) &= \mathrm{step}\big(\theta, \nabla_\theta \textstyle\sum_i w_i(\Theta)\,\ell_i(\theta)\big),
        \qquad w_i(\Theta) = V(\ell_i;\Theta) \big/ \textstyle\sum_j V(\ell_j;\Theta) \\
    \Theta &\leftarrow \mathrm{meta\ step}\big(\Theta, \nabla_\Theta L_{\mathrm{val}}(\hat\theta(\Theta))\big) \\
    \theta &\leftarrow \mathrm{step}\big(\theta, \nabla_\theta \textstyle\sum_i w_i(\Theta)\,\ell_i(\theta)\big)
        \quad\text{(with the updated } \Theta\text{, held constant)}

The weights are normalised to sum 1 in the batch (with L2RW's convention for a zero sum), as in the
widely used earlier version of the authors' code; ``normalize=False`` gives their current
``MW-Net.py``, :math:`w_i = V(\ell_i;\Theta)/n`. The meta step is
Adam (lr 1e-3, weight decay 1e-4), as in the authors' code, unless you pass ``meta_optimizer``.

**What is evaluated where.** The training batch is run through the model once; its per-example losses
serve the look-ahead and the real step (so BatchNorm statistics and dropout masks are those of one
ordinary forward). The clean loss :math:`L_{\mathrm{val}}` is the mean loss on the meta data (or a
batch of ``meta_batch_size`` drawn from it at each step) at the looked-ahead weights, evaluated on
copies of the model's buffers, in the model's current train/eval mode.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import NonFiniteError
from ._lookahead import Lookahead, LossFn, MetaData, Optimizer, check_loss_fn, per_example_losses

__all__ = ["LearningToReweight", "MetaWeightNet", "ReweightStep", "WeightNet"]


@dataclass(frozen=True)
class ReweightStep:
    """What one reweighting step did (every tensor detached).

    Attributes:
        loss: the weighted training loss :math:`\\sum_i w_i \\ell_i` the real step minimised.
        weights: the example weights ``(n,)``: non-negative, summing to 1 (or all 0 for L2RW when no
            example helps the clean loss).
        losses: the per-example training losses ``(n,)`` before the step.
        meta_loss: the clean loss at the looked-ahead weights.
    """

    loss: Tensor
    weights: Tensor
    losses: Tensor
    meta_loss: Tensor


class _Reweighter:
    """The loop both learners share: forward once, weigh, take the real step; checkpoints."""

    def __init__(self, model: nn.Module, optimizer: Optimizer, loss_fn: LossFn, meta_data: Any,
                 meta_batch_size: int | None, seed: int, lookahead: str) -> None:
        where = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{where}(model=...): expected an nn.Module, got {type(model).__name__}")
        check_loss_fn(loss_fn, where)
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.lookahead = Lookahead(model, optimizer, where, lookahead)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.meta = MetaData(meta_data, meta_batch_size, self.generator, where)
        self.step_count = 0

    # -- the step -----------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> ReweightStep:
        """One training step on the batch ``(x, y)``: weigh its examples, then the optimizer's step on
        the weighted loss. Returns the loss, the weights and the clean loss of the look-ahead."""
        losses = self._losses(x, y)
        weights, meta_loss = self._weigh(losses)
        loss = (weights * losses).sum()
        self.lookahead.step(loss)
        self.step_count += 1
        return ReweightStep(loss.detach(), weights, losses.detach(), meta_loss.detach())

    def _weigh(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _losses(self, x: Tensor, y: Tensor) -> Tensor:
        self.meta.check_like(x, y)
        return per_example_losses(self.loss_fn, self.model(x), y, int(x.shape[0]),
                                  f"{type(self).__name__}.step {self.step_count}: the training batch")

    def _meta_loss(self, weights: Mapping[str, Tensor]) -> Tensor:
        """The mean clean loss at ``weights`` (on the graph)."""
        x, y = self.meta.batch()
        losses = per_example_losses(self.loss_fn, self.lookahead.evaluate(weights, x), y, int(x.shape[0]),
                                    f"{type(self).__name__}.step {self.step_count}: meta_data at the looked-ahead "
                                    "weights")
        return losses.mean()

    def _check_finite(self, name: str, values: Tensor) -> None:
        if not torch.isfinite(values).all():
            raise NonFiniteError(f"{type(self).__name__}.step {self.step_count}: the {name} is not finite; the "
                                 "look-ahead step diverged: lower the optimizer's learning rate or check the data")

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: the model, its optimizer, the step count and the meta-batch
        sampler's random state (and, for Meta-Weight-Net, the weight net and its optimizer)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step_count": self.step_count, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output into this learner's model and optimizers (in place)."""
        missing = [k for k in self.state_dict() if k not in state]
        if missing:
            raise KeyError(f"{type(self).__name__}.load_state_dict: the state has no {missing}; pass the dict "
                           f"{type(self).__name__}.state_dict() returned")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step_count"])
        self.generator.set_state(state["generator"])


class LearningToReweight(_Reweighter):
    """Learning to Reweight (Ren et al. 2018): each example's weight from one look-ahead step.

    Args:
        model: the model being trained (``model(x)`` gives the outputs ``loss_fn`` takes).
        optimizer: its optimizer, ``torch.optim`` (not LBFGS) or :mod:`diffopt.optim`, over
            ``model.parameters()`` or a subset.
        loss_fn: ``loss_fn(output, target)`` returning one loss per example (``reduction='none'``).
        meta_data: ``(x_val, y_val)``, the small clean set.
        meta_batch_size: examples of the clean set per step (default: all of them).
        seed: seeds the generator that draws the clean batches.
        lookahead: ``"optimizer"`` (default): the look-ahead is one step of ``optimizer`` itself, from its
            current state (momentum, Adam's moments); ``"sgd"``: a plain SGD step at each parameter
            group's learning rate, as in the authors' code.

    See the module docstring for the maths.
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer, *, loss_fn: LossFn, meta_data: Any,
                 meta_batch_size: int | None = None, seed: int = 0, lookahead: str = "optimizer") -> None:
        super().__init__(model, optimizer, loss_fn, meta_data, meta_batch_size, seed, lookahead)

    def epsilon_gradient(self, x: Tensor, y: Tensor) -> Tensor:
        r""":math:`\partial L_{\mathrm{val}}(\theta'(\epsilon)) / \partial \epsilon` at :math:`\epsilon = 0`
        for the batch ``(x, y)``, without taking a step (the model's forward runs once, so BatchNorm
        running statistics update as in any training-mode forward)."""
        gradient, _ = self._epsilon_gradient(self._losses(x, y))
        return gradient

    def _epsilon_gradient(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        epsilon = torch.zeros_like(losses.detach(), requires_grad=True)
        meta_loss = self._meta_loss(self.lookahead.look_ahead((epsilon * losses).sum()))
        (gradient,) = torch.autograd.grad(meta_loss, epsilon, retain_graph=True)
        self._check_finite("gradient of the clean loss with respect to the example weights", gradient)
        return gradient, meta_loss

    def _weigh(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        gradient, meta_loss = self._epsilon_gradient(losses)
        raw = torch.clamp(-gradient, min=0)
        total = raw.sum()
        return (raw / total if total > 0 else raw), meta_loss


class WeightNet(nn.Module):
    """Meta-Weight-Net's network: loss -> weight in (0, 1), ``Linear(1, hidden)``, ReLU, ``Linear(hidden, 1)``,
    sigmoid. Initialised as ``nn.Linear`` initialises (uniform in :math:`\\pm 1/\\sqrt{\\text{fan in}}`) from
    ``generator``."""

    def __init__(self, hidden: int = 100, *, generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not (isinstance(hidden, int) and hidden >= 1):
            raise ValueError(f"WeightNet(hidden=...): expected a positive int, got {hidden!r}")
        self.hidden = nn.Linear(1, hidden, dtype=dtype, device=device)
        self.out = nn.Linear(hidden, 1, dtype=dtype, device=device)
        with torch.no_grad():
            for layer in (self.hidden, self.out):
                bound = 1 / math.sqrt(layer.in_features)
                for p in (layer.weight, layer.bias):
                    p.copy_(torch.rand(p.shape, generator=generator, dtype=p.dtype).mul(2 * bound).sub(bound))

    def forward(self, losses: Tensor) -> Tensor:
        """Weights ``(n,)`` for losses ``(n,)``."""
        return torch.sigmoid(self.out(torch.relu(self.hidden(losses.unsqueeze(-1))))).squeeze(-1)


class MetaWeightNet(_Reweighter):
    """Meta-Weight-Net (Shu et al. 2019): a small network, learnt on the clean set, maps loss to weight.

    Args:
        model, optimizer, loss_fn, meta_data, meta_batch_size, seed, lookahead: as for :class:`LearningToReweight`
            (``seed`` also initialises the weight net).
        weight_net: the loss -> weight network (default: :class:`WeightNet` with ``hidden`` units, in the
            dtype and on the device of the model's first parameter).
        meta_optimizer: a ``torch.optim`` optimizer over ``weight_net``'s parameters (default:
            ``Adam(lr=meta_lr, weight_decay=meta_weight_decay)``, the authors' choice).
        normalize: weights ``V / sum(V)`` in the batch (default), or ``V / n``.

    See the module docstring for the maths.
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer, *, loss_fn: LossFn, meta_data: Any,
                 weight_net: nn.Module | None = None, meta_optimizer: torch.optim.Optimizer | None = None,
                 hidden: int = 100, meta_lr: float = 1e-3, meta_weight_decay: float = 1e-4, normalize: bool = True,
                 meta_batch_size: int | None = None, seed: int = 0, lookahead: str = "optimizer") -> None:
        super().__init__(model, optimizer, loss_fn, meta_data, meta_batch_size, seed, lookahead)
        if weight_net is None:
            first = next(model.parameters())
            weight_net = WeightNet(hidden, generator=self.generator, dtype=first.dtype, device=first.device)
        elif not isinstance(weight_net, nn.Module):
            raise TypeError(f"MetaWeightNet(weight_net=...): expected an nn.Module mapping losses (n,) to weights "
                            f"(n,), got {type(weight_net).__name__}")
        if meta_optimizer is None:
            meta_optimizer = torch.optim.Adam(weight_net.parameters(), lr=meta_lr, weight_decay=meta_weight_decay)
        elif not isinstance(meta_optimizer, torch.optim.Optimizer):
            raise TypeError(f"MetaWeightNet(meta_optimizer=...): expected a torch.optim optimizer over "
                            f"weight_net.parameters(), got {type(meta_optimizer).__name__}")
        self.weight_net = weight_net
        self.meta_optimizer = meta_optimizer
        self.meta_params = [p for group in meta_optimizer.param_groups for p in group["params"]]
        self.normalize = bool(normalize)

    def weights_of(self, losses: Tensor) -> Tensor:
        """The example weights the weight net gives ``losses`` (on the graph to its parameters)."""
        values = self.weight_net(losses.detach())
        if values.shape != losses.shape:
            raise ValueError(f"MetaWeightNet: weight_net returned shape {tuple(values.shape)} for losses of shape "
                             f"{tuple(losses.shape)}; it must return one weight per example")
        if not self.normalize:
            return values / values.shape[0]
        total = values.sum()
        return values / total if total.detach() != 0 else values

    def meta_gradient(self, x: Tensor, y: Tensor) -> list[Tensor]:
        r""":math:`\nabla_\Theta L_{\mathrm{val}}(\hat\theta(\Theta))` for the batch ``(x, y)``, one tensor per
        parameter of the meta optimizer, without a step of either optimizer."""
        gradient, _ = self._meta_gradient(self._losses(x, y))
        return gradient

    def _meta_gradient(self, losses: Tensor) -> tuple[list[Tensor], Tensor]:
        meta_loss = self._meta_loss(self.lookahead.look_ahead((self.weights_of(losses) * losses).sum()))
        gradient = torch.autograd.grad(meta_loss, self.meta_params, retain_graph=True, allow_unused=True)
        gradient = [torch.zeros_like(p) if g is None else g for p, g in zip(self.meta_params, gradient)]
        for g in gradient:
            self._check_finite("gradient of the clean loss with respect to the weight net", g)
        return gradient, meta_loss

    def _weigh(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        gradient, meta_loss = self._meta_gradient(losses)
        for p, g in zip(self.meta_params, gradient):
            p.grad = g
        self.meta_optimizer.step()
        with torch.no_grad():
            weights = self.weights_of(losses)
        return weights, meta_loss

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "weight_net": self.weight_net.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.weight_net.load_state_dict(state["weight_net"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
