"""What every meta-learner offers the training loop, the CLI and the diagnostics."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..unroll._shapes import no_example_dimension


def is_classification(targets: Tensor) -> bool:
    return not (targets.is_floating_point() or targets.is_complex())


#: Targets equal to this are not counted (``F.cross_entropy``'s default ``ignore_index``: padding).
IGNORE_INDEX = -100


def correct_fraction(logits: Tensor, labels: Tensor) -> Tensor:
    """The fraction of labelled positions whose arg-max class (last dimension of ``logits``) is the label.

    ``logits`` (..., C), ``labels`` (...): one task's (N, C) and (N,), or a sequence task's
    (N, L, C) and (N, L); positions labelled ``IGNORE_INDEX`` (−100) are not counted.
    """
    counted = labels != IGNORE_INDEX
    total = counted.sum()
    if int(total) == 0:
        raise ValueError(f"every query label of a task is {IGNORE_INDEX} (ignored): no position to score accuracy on")
    dtype = logits.dtype if logits.is_floating_point() else torch.float32
    return ((logits.argmax(-1) == labels) & counted).sum().to(dtype) / total.to(dtype)


def accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-task accuracy, shape (T,), for logits (T, N, ..., C) and labels (T, N, ...): the classes are the
    last dimension, and positions labelled −100 (``F.cross_entropy``'s ``ignore_index``) are not counted."""
    return torch.stack([correct_fraction(o, y) for o, y in zip(logits, targets)])


class MetaLearner(nn.Module):
    """Base class: a meta-learner is a module whose parameters are meta-parameters.

    Subclasses implement :meth:`meta_loss` (mean over the tasks of the meta-batch,
    all tensors with a leading task dimension) and :meth:`predict`. The default
    :meth:`train_step` differentiates the meta-loss and steps the outer optimizer.
    """

    #: Whether the learner adapts weights in an inner loop (``self.loop``); metric-based
    #: learners (Prototypical, Matching, Siamese) solve a task by comparing embeddings.
    has_inner_loop: bool = False

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Predictions for the query inputs after learning from the support set (leading task dim)."""
        raise NotImplementedError

    def train_step(self, batch: tuple[Tensor, Tensor, Tensor, Tensor], optimizer: torch.optim.Optimizer,
                   iteration: int = 0, total_iterations: int = 1,
                   reduce: Callable[[list[Tensor]], None] | None = None) -> dict[str, float]:
        """One outer step; ``reduce(parameters)`` runs between backward and the step (all-reduce)."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.meta_loss(*batch)
        loss.backward()
        if reduce is not None:
            reduce(list(self.parameters()))
        optimizer.step()
        return {"meta_loss": float(loss.detach())}

    def evaluate(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> dict[str, Tensor]:
        """Per-task query metrics without any graph: loss, and accuracy for classification."""
        check_episode(support_x, support_y, query_x, query_y)
        with torch.no_grad():
            out = self.predict(support_x, support_y, query_x)
        return self.query_metrics(out, query_y)

    def query_metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Per-task loss with the learner's ``loss_fn`` (the one it trains on; cross-entropy or MSE for a
        learner without one), and :func:`accuracy` for integer targets."""
        fn = getattr(self, "loss_fn", None) or (nn.functional.cross_entropy if is_classification(targets)
                                                else nn.functional.mse_loss)
        losses = torch.stack([fn(o, y) for o, y in zip(outputs, targets)])
        if is_classification(targets):
            return {"loss": losses, "accuracy": accuracy(outputs, targets)}
        return {"loss": losses}

    def config(self) -> dict[str, Any]:
        """The settings that must match for a checkpoint to be loaded into this learner."""
        return {"algorithm": type(self).__name__}


class InnerLoopLearner(MetaLearner):
    """A meta-learner built on an :class:`~diffopt.unroll.InnerLoop` stored as ``self.loop``.

    ``inputs(x)`` maps raw inputs to what the inner loop sees (ANIL maps them to features).
    """

    loop: Any
    has_inner_loop = True
    #: How the outer step uses the inner loop: ``"meta_gradient"`` (the gradient of the query
    #: loss through the adapted weights, in the loop's mode: MAML and its family) or
    #: ``"towards_adapted"`` (θ moves towards the adapted weights: Reptile).
    outer_update: str = "meta_gradient"
    #: How :meth:`train_step` back-propagates the meta-loss (the mean of the task losses):
    #: ``"per_task"`` — one backward per task, so each task's graph is freed before the next is
    #: built (what the peers' per-task loops do: peak memory of one task, not of the meta-batch);
    #: ``"batch"`` — one backward of the mean (one graph over the whole meta-batch); ``"auto"`` —
    #: per task when the inner loop runs a task loop (convolutional and recurrent models, where the
    #: meta-batch's graphs dominate memory and the loop costs the same either way), at once when it
    #: is vectorised (the graph is small and one backward is faster) or zero-order (ES/PES draw
    #: their noise per meta-loss). The gradient is the same up to the order of the summation.
    meta_backward: str = "auto"

    def backward_per_task(self) -> bool:
        """Whether :meth:`train_step` back-propagates task by task (see :attr:`meta_backward`)."""
        if self.meta_backward not in ("auto", "per_task", "batch"):
            raise ValueError(f"meta_backward={self.meta_backward!r}: choose 'auto', 'per_task' or 'batch'")
        if self.meta_backward != "auto":
            return self.meta_backward == "per_task"
        return self.loop.vectorize is False and self.loop.mode.differentiates_adapted_weights

    def train_step(self, batch: tuple[Tensor, Tensor, Tensor, Tensor], optimizer: torch.optim.Optimizer,
                   iteration: int = 0, total_iterations: int = 1,
                   reduce: Callable[[list[Tensor]], None] | None = None) -> dict[str, float]:
        """One outer step; the meta-gradient of the mean task loss, task by task where
        :meth:`backward_per_task` says so (gradients accumulate in ``.grad``)."""
        if not self.backward_per_task():
            return super().train_step(batch, optimizer, iteration, total_iterations, reduce)
        check_episode(*batch)
        optimizer.zero_grad(set_to_none=True)
        tasks = batch[0].shape[0]
        total = 0.0
        for t in range(tasks):
            loss = self.meta_loss(*(part[t:t + 1] for part in batch)) / tasks
            loss.backward()
            total += float(loss.detach())
        if reduce is not None:
            reduce(list(self.parameters()))
        optimizer.step()
        return {"meta_loss": total}

    @property
    def adapts_features(self) -> bool:
        """Whether the inner loop adapts a head on features of the raw inputs (``inputs`` is not the identity)."""
        return type(self).inputs is not InnerLoopLearner.inputs

    def inputs(self, x: Tensor) -> Tensor:
        return x

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Any:
        """Adapted fast weights for every task (differentiable as the mode prescribes)."""
        return self.loop.adapt(self.inputs(support_x), support_y)

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, steps: int | None = None) -> Tensor:
        """Query predictions after ``steps`` (default K) inner steps, without a graph."""
        check_episode(support_x, support_y, query_x)
        with torch.no_grad():
            support, query = self.inputs(support_x), self.inputs(query_x)
        adapted = self.loop.adapt_without_graph(support, support_y, steps)
        with torch.no_grad():
            return self.loop.predict(adapted, query)

    def evaluate_steps(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
        steps: Sequence[int] = (0, 1, 5, 10),
    ) -> dict[str, Tensor]:
        """Per-task query loss (and accuracy) after each number of test-time steps: shape (len(steps), T)."""
        check_episode(support_x, support_y, query_x, query_y)
        with torch.no_grad():
            support, query = self.inputs(support_x), self.inputs(query_x)
        out = {"loss": self.loop.query_losses_along(support, support_y, query, query_y, steps)}
        if is_classification(query_y):
            out["accuracy"] = self.loop.query_losses_along(support, support_y, query, query_y, steps,
                                                           metric=correct_fraction)
        return out

    def config(self) -> dict[str, Any]:
        return {"algorithm": type(self).__name__, "inner_steps": self.loop.steps, "mode": self.loop.mode.name,
                "parameters": [list(p.shape) for p in self.parameters()]}


def ways_of(labels: Tensor) -> int:
    """The number of classes of an episode with labels 0..N-1 (the same N for every task)."""
    if labels.numel() == 0:
        raise ValueError("support labels are empty")
    return int(labels.max()) + 1


def embed_tasks(encoder: nn.Module, x: Tensor) -> Tensor:
    """Embeddings of (T, N, ...) inputs as (T, N, D).

    Encoders with BatchNorm run task by task so that batch statistics stay
    within an episode; others run on all tasks at once.
    """
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules()):
        return torch.stack([encoder(xt) for xt in x])
    flat = encoder(x.flatten(0, 1))
    return flat.reshape(x.shape[0], x.shape[1], *flat.shape[1:]).flatten(2)


def embed_episode(encoder: nn.Module, support_x: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
    """Embeddings of a meta-batch's support (T, S, ...) and query (T, Q, ...) inputs: (T, S, D), (T, Q, D).

    Each task's support and query go through the encoder as one batch of S + Q
    examples, as in Snell et al.'s and learn2learn's Prototypical Networks: an
    encoder with batch statistics (BatchNorm) then normalises a query with its
    episode's statistics, so its embedding does not depend on how the queries
    are grouped (one at a time or all together), and a single query is no batch
    of one. Encoders without BatchNorm run on all tasks at once.
    """
    joint = embed_tasks(encoder, torch.cat([support_x, query_x], dim=1))
    return joint[:, :support_x.shape[1]], joint[:, support_x.shape[1]:]


def check_episode(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor | None = None) -> None:
    """Shapes shared by every learner: a task dimension, matching tasks and examples."""
    if support_x.dim() < 2 or query_x.dim() < 2:
        raise ValueError(
            f"inputs need a leading task dimension and an example dimension; got support {tuple(support_x.shape)} "
            f"and query {tuple(query_x.shape)}"
        )
    no_example_dimension(support_x, "support")
    no_example_dimension(query_x, "query")
    if support_x.shape[:2] != support_y.shape[:2]:
        raise ValueError(
            f"support inputs {tuple(support_x.shape[:2])} and labels {tuple(support_y.shape[:2])} disagree on "
            "(tasks, examples)"
        )
    if support_x.shape[0] != query_x.shape[0]:
        raise ValueError(f"support has {support_x.shape[0]} tasks but query has {query_x.shape[0]}")
    if support_x.shape[2:] != query_x.shape[2:]:
        raise ValueError(
            f"support examples have shape {tuple(support_x.shape[2:])} but query examples {tuple(query_x.shape[2:])}"
        )
    if query_y is not None and query_x.shape[:2] != query_y.shape[:2]:
        raise ValueError(
            f"query inputs {tuple(query_x.shape[:2])} and labels {tuple(query_y.shape[:2])} disagree on (tasks, examples)"
        )
