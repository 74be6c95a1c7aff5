r"""Reptile (Nichol, Achiam & Schulman, 2018).

For each task, take k steps of SGD (or Adam) from θ to get W, then move θ
towards W:

.. math::
    \theta \leftarrow \theta + \epsilon_i\,(W - \theta)

*Serial* Reptile updates θ after every task; *batched* Reptile averages
``W − θ`` over the meta-batch. The outer step size ε_i follows a schedule,
linearly annealed to ``outer_lr_final`` by default as in the paper. The update
is applied through the outer optimizer as the pseudo-gradient ``θ − W``
(so SGD with lr ε is exactly the rule above; Adam on it is the paper's variant).
With one inner SGD step, ``θ − W = α∇L(θ)``: Reptile's step is a gradient step.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim import SGD, DifferentiableOptimizer
from ..unroll import InnerLoop
from ._base import InnerLoopLearner, check_episode


class Reptile(InnerLoopLearner):
    """Reptile, batched or serial.

    Args:
        model: the network whose parameters are θ.
        loss_fn: per-task loss.
        inner_lr, inner_steps: the task-level SGD (or ``inner_optimizer``).
        outer_lr, outer_lr_final: ε at the first and last iteration (linear schedule);
            ``outer_lr_final=None`` keeps ε constant. The schedule sets the outer
            optimizer's learning rate at every iteration.
        batched: average over the meta-batch (True) or update after every task (False).
        train_on_query: also train the inner loop on the query examples (Reptile
            has no support/query distinction at meta-training time).
    """

    outer_update = "towards_adapted"  # θ ← θ + ε (φ − θ): neither first- nor second-order MAML

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor] = F.mse_loss,
                 inner_lr: float = 0.02, inner_steps: int = 5, outer_lr: float = 1.0,
                 outer_lr_final: float | None = 0.0, batched: bool = True, train_on_query: bool = False,
                 inner_optimizer: DifferentiableOptimizer | torch.optim.Optimizer | None = None,
                 vectorize: bool | str = "auto", **engine_options: Any) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        self.inner_steps, self.outer_lr, self.outer_lr_final = inner_steps, outer_lr, outer_lr_final
        self.batched, self.train_on_query = batched, train_on_query
        optimizer = inner_optimizer if inner_optimizer is not None else SGD(model.parameters(), lr=inner_lr)
        self.loop = InnerLoop(model, optimizer, loss_fn, steps=inner_steps, mode="first_order",
                              vectorize=vectorize, **engine_options)

    def outer_step_size(self, iteration: int, total_iterations: int) -> float:
        """ε at ``iteration`` (0-based) of ``total_iterations``."""
        if self.outer_lr_final is None or total_iterations <= 1:
            return self.outer_lr
        fraction = min(iteration / total_iterations, 1.0)
        return self.outer_lr + fraction * (self.outer_lr_final - self.outer_lr)

    def pseudo_gradient(self, x: Tensor, y: Tensor) -> list[Tensor | None]:
        """``θ − mean_t W_t`` for the tasks in (x, y), one entry per parameter of θ: zero for one the
        inner optimizer does not hold, ``None`` for a frozen one (``requires_grad=False``), which the
        outer optimizer then leaves alone as it would in MAML (a zero would meet its weight decay)."""
        adapted = self.loop.adapt_without_graph(x, y)
        return [
            None if not theta.requires_grad else (theta - p.mean(0)).detach() if is_adapted
            else torch.zeros_like(theta)
            for theta, p, is_adapted in zip(self.loop.theta, adapted.params, adapted.adapted)
        ]

    def train_step(self, batch: tuple[Tensor, Tensor, Tensor, Tensor], optimizer: torch.optim.Optimizer,
                   iteration: int = 0, total_iterations: int = 1,
                   reduce: Callable[[list[Tensor]], None] | None = None) -> dict[str, float]:
        support_x, support_y, query_x, query_y = batch
        check_episode(support_x, support_y, query_x, query_y)
        if self.train_on_query:
            support_x, support_y = torch.cat([support_x, query_x], 1), torch.cat([support_y, query_y], 1)
        step_size = self.outer_step_size(iteration, total_iterations)
        for group in optimizer.param_groups:
            group["lr"] = step_size
        chunks = [(support_x, support_y)] if self.batched else [
            (support_x[t:t + 1], support_y[t:t + 1]) for t in range(support_x.shape[0])
        ]
        if reduce is not None and not self.batched:
            raise ValueError("serial Reptile updates θ after every task and cannot be sharded; use batched=True")
        for x, y in chunks:
            optimizer.zero_grad(set_to_none=True)
            for theta, g in zip(self.loop.theta, self.pseudo_gradient(x, y)):
                theta.grad = g
            if reduce is not None:
                reduce(list(self.parameters()))
            optimizer.step()
        with torch.no_grad():
            loss = self.loop.query_losses(self.loop.adapt_without_graph(support_x, support_y), query_x, query_y).mean()
        return {"meta_loss": float(loss), "outer_lr": step_size}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Any:
        """Reptile's adapted weights carry no meta-gradient."""
        return self.loop.adapt_without_graph(support_x, support_y)

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        """Query loss after adaptation (for monitoring; Reptile does not differentiate it)."""
        check_episode(support_x, support_y, query_x, query_y)
        adapted = self.loop.adapt_without_graph(support_x, support_y)
        return self.loop.query_losses(adapted, query_x, query_y).mean()

    def config(self) -> dict[str, Any]:
        return {"algorithm": "Reptile", "inner_steps": self.inner_steps, "batched": self.batched,
                "parameters": [list(p.shape) for p in self.parameters()]}

