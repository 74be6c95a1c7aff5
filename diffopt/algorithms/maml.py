r"""MAML and its family: first-order MAML, iMAML, Meta-SGD and MAML++.

MAML (Finn, Abbeel & Levine, 2017) learns an initialisation θ such that a few
gradient steps on a task's support set S give weights that do well on its
query set Q:

.. math::
    \min_\theta \; \mathbb{E}_{\text{task}}\; \mathcal{L}_Q\bigl(U^K(\theta; S)\bigr),
    \qquad U(\phi; S) = \phi - \alpha \nabla_\phi \mathcal{L}_S(\phi).

The meta-gradient is computed by :class:`diffopt.unroll.InnerLoop` in any of its
modes: ``first_order`` is first-order MAML, ``implicit`` with ``proximal=λ`` is
iMAML (Rajeswaran et al., 2019), and so on.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim import SGD, DifferentiableOptimizer
from ..optim.learned.lr import meta_sgd, per_layer_per_step
from ..unroll import InnerLoop
from ._base import InnerLoopLearner, check_episode

LossFn = Callable[[Tensor, Tensor], Tensor]


class MAML(InnerLoopLearner):
    """Model-Agnostic Meta-Learning.

    Args:
        model: the network whose parameters are the initialisation θ.
        loss_fn: per-task loss ``loss_fn(prediction, target)`` (inner and outer).
        inner_lr: α, a number or a tensor; a tensor that requires grad is learned: it is
            registered as the parameter ``learner.inner_lr`` (a copy, if it was not already an
            ``nn.Parameter``), so ``learner.parameters()`` and checkpoints include it.
        inner_steps: K at meta-training time.
        mode: any engine mode (``second_order``, ``first_order``, ``truncated``,
            ``checkpointed``, ``implicit``, ``forward``, ``es``, ``pes``).
        inner_optimizer: a ``diffopt.optim`` or ``torch.optim`` optimizer on
            ``model.parameters()`` (or a subset) to use instead of SGD(α).
        vectorize: True, False or "auto" (see :class:`~diffopt.unroll.InnerLoop`).
        **engine_options: passed to :class:`~diffopt.unroll.InnerLoop`
            (``batchnorm``, ``proximal``, ``truncate``, ``segment``, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn = F.mse_loss,
        inner_lr: float | Tensor = 0.01,
        inner_steps: int = 1,
        mode: str = "second_order",
        inner_optimizer: DifferentiableOptimizer | torch.optim.Optimizer | None = None,
        vectorize: bool | str = "auto",
        **engine_options: Any,
    ) -> None:
        _refuse_peer_names(type(self).__name__, engine_options)
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        if isinstance(inner_lr, Tensor) and inner_lr.requires_grad:
            # A learnable learning rate is a meta-parameter: register it so that the outer
            # optimizer (learner.parameters()) trains it and checkpoints save it.
            if not isinstance(inner_lr, nn.Parameter):
                inner_lr = nn.Parameter(inner_lr.detach().clone())
            self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.mode = mode
        optimizer = inner_optimizer if inner_optimizer is not None else self._inner_optimizer(inner_lr)
        self._engine_options = dict(engine_options, vectorize=vectorize)
        self.loop = InnerLoop(model, optimizer, loss_fn, steps=inner_steps, mode=mode, **self._engine_options)

    def _inner_optimizer(self, inner_lr: float | Tensor) -> DifferentiableOptimizer:
        return SGD(self.model.parameters(), lr=inner_lr)

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        """Mean query loss over the tasks after K inner steps on each support set (higher's MAML
        example sums over tasks instead: multiply by the number of tasks to reproduce it)."""
        check_episode(support_x, support_y, query_x, query_y)
        return self.loop.meta_loss(support_x, support_y, query_x, query_y)


# Arguments of the peers' MAML classes (learn2learn's, higher's examples) and diffopt's names for them.
PEER_NAMES = {
    "lr": "inner_lr=", "adapt_lr": "inner_lr=", "fast_lr": "inner_lr=", "first_order": "mode='first_order'",
    "adaptation_steps": "inner_steps=", "adapt_steps": "inner_steps=", "n_inner_iter": "inner_steps=",
    "steps": "inner_steps=",
}


def _refuse_peer_names(cls: str, options: dict[str, Any]) -> None:
    """A peer's argument name given to a diffopt learner: name diffopt's, before InnerLoop
    refuses it without saying which class or what to write instead."""
    for key in options:
        if key in PEER_NAMES:
            ours = "lr_init=(low, high) or a constant " if cls == "MetaSGD" and key == "lr" else PEER_NAMES[key]
            raise TypeError(
                f"{cls}: unknown argument {key!r}; did you mean {ours}...? "
                f"(learn2learn's MAML(model, lr=..., first_order=...) with clone()/adapt(loss) is "
                "diffopt.ports.learn2learn.algorithms.MAML)"
            )


class FOMAML(MAML):
    """First-order MAML: MAML with ``mode="first_order"``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn = F.mse_loss, inner_lr: float | Tensor = 0.01,
                 inner_steps: int = 1, **options: Any) -> None:
        super().__init__(model, loss_fn, inner_lr, inner_steps, mode="first_order", **options)


class iMAML(MAML):  # noqa: N801 - the paper's name
    r"""Implicit MAML (Rajeswaran et al., 2019).

    The inner problem is :math:`\min_\phi \mathcal{L}_S(\phi) + \tfrac{\lambda}{2}\|\phi-\theta\|^2`,
    solved approximately by ``inner_steps`` steps; the meta-gradient is
    :math:`(I + H/\lambda)^{-1}\nabla\mathcal{L}_Q(\phi^*)` by conjugate gradient.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn = F.mse_loss, inner_lr: float | Tensor = 0.01,
                 inner_steps: int = 10, regularization: float = 1.0, **options: Any) -> None:
        options.setdefault("solver_iterations", 20)
        super().__init__(model, loss_fn, inner_lr, inner_steps, mode="implicit", proximal=regularization, **options)


class MetaSGD(MAML):
    r"""Meta-SGD (Li et al., 2017): a learned learning rate for every weight.

    The inner update is :math:`\phi \leftarrow \phi - \alpha \odot \nabla\mathcal{L}_S(\phi)`
    with α of the parameters' shapes, initialised U[0.005, 0.1] as in the paper,
    and meta-learned with θ.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn = F.mse_loss, inner_steps: int = 1,
                 lr_init: tuple[float, float] = (0.005, 0.1), generator: torch.Generator | None = None,
                 **options: Any) -> None:
        self._lr_init, self._generator = lr_init, generator  # used by _inner_optimizer
        super().__init__(model, loss_fn, inner_lr=0.0, inner_steps=inner_steps, **options)

    def _inner_optimizer(self, inner_lr: float | Tensor) -> DifferentiableOptimizer:
        optimizer = meta_sgd(self.model.parameters(), init=self._lr_init, generator=self._generator)
        self.inner_lrs = nn.ParameterList(optimizer.lrs)  # registered: trained and checkpointed with θ
        return optimizer


class MAMLPlusPlus(MAML):
    """MAML++ essentials (Antoniou, Edwards & Storkey, 2019).

    * per-layer, per-step learnable learning rates (LSLR): one scalar α_{l,k}
      for every parameter tensor l and inner step k (test-time adaptation longer
      than K steps keeps using the last step's rates);
    * the multi-step loss (MSL): a weighted sum of the query losses after every
      inner step, the weights annealed towards the last step over
      ``multi_step_loss_epochs`` epochs;
    * derivative-order annealing (DA): first-order meta-gradients for the first
      ``first_order_epochs`` epochs, second order afterwards.

    Call :meth:`set_epoch` as training proceeds: ``diffopt train`` does, one epoch
    per 500 iterations as in the paper; with your own :class:`~diffopt.training.Trainer`
    pass ``before_step=diffopt.training.experiment.set_epoch`` (or your own schedule).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn = F.mse_loss, inner_lr: float = 0.01, inner_steps: int = 5,
                 multi_step_loss_epochs: int = 10, first_order_epochs: int = 50, **options: Any) -> None:
        if "mode" in options:  # derivative-order annealing picks each meta-step's graph; a mode would be ignored
            raise TypeError(f"MAMLPlusPlus takes no mode= (got {options['mode']!r}): derivative-order annealing "
                            "chooses the graph, first order for the first first_order_epochs epochs and second order "
                            "after; for first order throughout pass a large first_order_epochs, or use MAML(mode=...)")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"MAMLPlusPlus: inner_steps must be an integer >= 1 (one learnable rate per layer and "
                             f"step), got {inner_steps!r}")
        self.multi_step_loss_epochs = multi_step_loss_epochs
        self.first_order_epochs = first_order_epochs
        self.epoch = 0
        super().__init__(model, loss_fn, inner_lr=inner_lr, inner_steps=inner_steps, **options)

    def _inner_optimizer(self, inner_lr: float | Tensor) -> DifferentiableOptimizer:
        optimizer = per_layer_per_step(self.model.parameters(), self.inner_steps, float(inner_lr), hold_last=True)
        self.step_lrs = nn.ParameterList(optimizer.lrs)  # registered: trained and checkpointed with θ
        return optimizer

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def step_weights(self) -> Tensor:
        """MSL importance of each inner step's query loss at the current epoch (sums to 1)."""
        k = self.inner_steps
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        if k == 1:
            return weights
        decay = 1.0 / k / max(self.multi_step_loss_epochs, 1)
        floor = 0.03 / k
        weights[:-1] = torch.clamp(weights[:-1] - self.epoch * decay, min=floor)
        weights[-1] = 1.0 - weights[:-1].sum()
        return weights

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        check_episode(support_x, support_y, query_x, query_y)
        graph = "first_order" if self.epoch < self.first_order_epochs else "full"
        if self.epoch >= self.multi_step_loss_epochs:
            steps = [self.inner_steps]
            weights = torch.ones(1, dtype=torch.float64)
        else:
            steps = list(range(1, self.inner_steps + 1))
            weights = self.step_weights()
        losses = self.loop.query_losses_along(support_x, support_y, query_x, query_y, steps, graph=graph)
        return (weights.to(losses.dtype).unsqueeze(1) * losses).sum(0).mean()

    def config(self) -> dict[str, Any]:
        return {**super().config(), "multi_step_loss_epochs": self.multi_step_loss_epochs,
                "first_order_epochs": self.first_order_epochs}
