"""The functional model under the inner loop: higher's monkeypatched module,
evaluated per task in a Python loop or for all tasks at once under ``torch.func.vmap``,
with an explicit BatchNorm policy.

BatchNorm policies
------------------
``"transductive"``
    Batch statistics everywhere (support batch in the inner loop, query batch
    at the outer loss), as in MAML's published Omniglot numbers. Running
    statistics are neither used nor updated.
``"per_task"``
    Each task carries its own copy of the running statistics, starting from
    the model's buffers: inner steps normalise with batch statistics and update
    the task's copy; the query is normalised with the task's adapted statistics
    (evaluation mode). Under vmap the per-task statistics are batched tensors.
``"frozen"``
    The model's running statistics everywhere (evaluation-mode BatchNorm);
    nothing is updated.

The model's own parameters and buffers are never modified.
"""
from __future__ import annotations

from collections.abc import Sequence

import higher
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

BATCHNORM_POLICIES = ("transductive", "per_task", "frozen")
BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")

# Layers that torch.func.vmap cannot batch in the configuration named (torch 2.13).
UNBATCHABLE = (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell)


class PatchedModel:
    """A model monkeypatched by higher, with a BatchNorm policy and per-task evaluation."""

    def __init__(self, model: nn.Module, batchnorm: str = "transductive") -> None:
        if batchnorm not in BATCHNORM_POLICIES:
            raise ValueError(
                f"batchnorm={batchnorm!r} is not a BatchNorm policy; choose one of {BATCHNORM_POLICIES}"
            )
        self.model = model
        self.policy = batchnorm
        self.fmodel = higher.monkeypatch(model, copy_initial_weights=True, track_higher_grads=False)
        self.names = [name for name, _ in model.named_parameters()]
        self.batchnorms = [m for m in self.fmodel.modules() if isinstance(m, _BatchNorm)]
        self.model_batchnorms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        if batchnorm == "per_task":
            missing = [type(m).__name__ for m in self.model_batchnorms if not m.track_running_stats]
            if missing:
                raise ValueError(
                    f"batchnorm='per_task' needs running statistics, but {missing[0]} was built with "
                    "track_running_stats=False; use batchnorm='transductive'"
                )

    # -- per-task BatchNorm statistics -------------------------------------------------
    def initial_buffers(self, tasks: int) -> list[Tensor]:
        """Per-task copies of the running statistics (``per_task`` policy), else ``[]``."""
        if self.policy != "per_task":
            return []
        out = []
        for module in self.model_batchnorms:
            for name in BUFFER_NAMES:
                value = getattr(module, name).detach()
                out.append(value.unsqueeze(0).repeat(tasks, *([1] * value.dim())))
        return out

    def _configure(self, phase: str, buffers: Sequence[Tensor]) -> None:
        """Set the patched BatchNorm layers for ``phase`` ("inner" or "outer")."""
        per_task = self.policy == "per_task"
        for k, (patched, original) in enumerate(zip(self.batchnorms, self.model_batchnorms)):
            if self.policy == "frozen" or (per_task and phase == "outer"):
                patched.training = False
                patched.track_running_stats = True
            elif per_task:
                patched.training = True
                patched.track_running_stats = True
            else:
                patched.training = True
                patched.track_running_stats = False
            if per_task:
                for j, name in enumerate(BUFFER_NAMES):
                    setattr(patched, name, buffers[3 * k + j])
            else:
                for name in BUFFER_NAMES:
                    setattr(patched, name, getattr(original, name))

    # -- evaluation --------------------------------------------------------------------
    def forward_one(self, params: Sequence[Tensor], buffers: Sequence[Tensor], x: Tensor, phase: str) -> Tensor:
        """The model on one task's inputs with that task's weights and statistics."""
        self._configure(phase, buffers)
        params = list(params)
        # higher writes a submodule's fast weights only when that submodule is called, so a
        # forward that reads a submodule's parameter directly (weight tying such as
        # ``h @ self.embedding.weight.T``) would see stale weights: write them all first.
        self.fmodel.update_params(params)
        return self.fmodel(x, params=params)

    def forward_tasks(
        self,
        params: Sequence[Tensor],
        buffers: Sequence[Tensor],
        x: Tensor,
        phase: str,
        vectorize: bool,
        adapted: Sequence[bool],
    ) -> tuple[Tensor, list[Tensor]]:
        """Outputs for every task (leading task dimension) and the updated statistics.

        ``params`` carry a leading task dimension where ``adapted`` is True and
        are shared otherwise. Statistics are cloned first, so earlier values
        (kept for checkpoint recomputation) are never mutated.
        """
        buffers = [b.clone() for b in buffers]
        if vectorize:
            in_dims = tuple(0 if a else None for a in adapted)

            def one(task_params: tuple[Tensor, ...], task_buffers: tuple[Tensor, ...], xt: Tensor) -> Tensor:
                return self.forward_one(task_params, task_buffers, xt, phase)

            out = torch.func.vmap(one, in_dims=(in_dims, 0, 0), randomness="different")(
                tuple(params), tuple(buffers), x
            )
            return out, buffers
        outs = []
        for t in range(x.shape[0]):
            task_params = [p[t] if a else p for p, a in zip(params, adapted)]
            outs.append(self.forward_one(task_params, [b[t] for b in buffers], x[t], phase))
        return torch.stack(outs), buffers


def vectorization_blockers(model: nn.Module) -> list[str]:
    """Layers that torch.func.vmap cannot batch, each with the reason."""
    reasons = []
    for name, module in model.named_modules():
        if isinstance(module, UNBATCHABLE):
            reasons.append(f"{name or 'model'} ({type(module).__name__}): no vmap batching rule for recurrent kernels")
    return reasons


def count_convolutions(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def choose_vectorize(model: nn.Module) -> tuple[bool, str]:
    """The ``vectorize="auto"`` rule, with its reason.

    Measured on CPU (see ``benchmarks/``): vmapped MLP inner loops are 3-9x
    faster than a task loop, while vmapped convolutions are 1.1-1.8x slower and
    use several times the memory, so convolutional models run task by task.
    Layers that vmap cannot batch force the task loop.
    """
    blockers = vectorization_blockers(model)
    if blockers:
        return False, "task loop: " + "; ".join(blockers)
    if count_convolutions(model):
        return False, "task loop: convolutions run faster per task than under vmap on CPU (measured)"
    return True, "vmap: no convolutional or recurrent layers, vectorised inner steps are faster (measured)"


def describe_vmap_failure(model: nn.Module, error: Exception) -> str:
    blockers = vectorization_blockers(model)
    layer = blockers[0] if blockers else "a layer of the model"
    return (
        f"vectorize=True failed: {layer} cannot run under torch.func.vmap ({error}). "
        "Use vectorize=False (task loop) or vectorize='auto'."
    )
