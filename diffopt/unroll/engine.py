"""The inner-loop engine: K steps on a meta-batch of tasks, and the meta-gradient in any mode.

``InnerLoop(model, optimizer, loss_fn, steps=K, mode=...)`` adapts the model's
weights on each task's support set with a differentiable update rule and
returns the adapted (task-batched) fast weights; ``meta_loss`` evaluates them
on the query sets. The result is differentiable with respect to the model's
parameters and every tensor hyperparameter, by the mode chosen:

=================  ==============================================================
``second_order``   full reverse-mode unroll (MAML).
``first_order``    inner gradients treated as constants (first-order MAML); the
                   updates stay differentiable, so tensor hyperparameters still
                   get their gradient.
``truncated``      reverse mode through the last ``truncate`` steps; the earlier
                   steps are run without a graph and contribute the identity to
                   the initial weights (``truncate=K`` equals second order).
``checkpointed``   segments of ``segment`` steps (default ⌈√K⌉) are recomputed in
                   the backward pass: memory grows about as √K, gradients equal
                   second order.
``implicit``       implicit-function theorem at the inner solution, with a
                   conjugate-gradient or Neumann solve over Hessian-vector
                   products (iMAML with ``proximal=λ``).
``forward``        forward-mode tangents through the unroll for the tensors in
                   ``forward_wrt`` (default: the tensor hyperparameters); memory
                   independent of K.
``es`` / ``pes``   antithetic evolution strategies, and persistent ES over
                   truncations of ``pes_truncation`` steps (Vicol et al., 2021).
=================  ==============================================================

Tasks are independent, so one ``torch.autograd.grad`` of the sum of the
per-task inner losses gives every task its own gradient.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim import SGD, DifferentiableOptimizer, NonFiniteError, from_torch
from ..optim._hyper import PerParameter, Schedule
from . import modes
from .carry import Carry, detached
from .patched import PatchedModel, choose_vectorize, describe_vmap_failure

MODES = ("second_order", "first_order", "truncated", "checkpointed", "implicit", "forward", "es", "pes")
LossFn = Callable[[Tensor, Tensor], Tensor]


class Adapted:
    """Adapted fast weights: ``params`` in ``model.parameters()`` order.

    Adapted parameters carry a leading task dimension; parameters the inner
    optimizer does not update are the model's own tensors (``adapted[j]`` False).
    """

    def __init__(self, params: list[Tensor], adapted: list[bool], buffers: list[Tensor], info: dict[str, Any]):
        self.params = params
        self.adapted = adapted
        self.buffers = buffers
        self.info = info

    def task(self, t: int) -> list[Tensor]:
        """Task ``t``'s weights (no task dimension)."""
        return [p[t] if a else p for p, a in zip(self.params, self.adapted)]


class InnerLoop:
    """K differentiable inner steps on a meta-batch of tasks.

    Args:
        model: the module whose parameters are the meta-learned initialisation θ.
        optimizer: the inner update rule: a ``diffopt.optim`` optimizer or a
            ``torch.optim`` optimizer built on (some of) ``model.parameters()``;
            only those parameters are adapted. Default: SGD with lr 0.01 on all.
        loss_fn: per-task loss ``loss_fn(prediction, target) -> scalar``
            (default mean squared error).
        steps: K, the number of inner steps.
        mode: one of ``MODES`` (see the module docstring).
        vectorize: True (vmap over tasks), False (task loop) or "auto".
        batchnorm: "transductive", "per_task" or "frozen" (see ``patched``).
        proximal: λ of iMAML's proximal term ``λ/2 ||φ − θ||²`` added to the
            inner objective (any mode); None for none.
        truncate: steps to backpropagate through in ``truncated`` mode.
        segment: steps per recomputed segment in ``checkpointed`` mode.
        solver, solver_iterations, solver_tol, damping, neumann_alpha: the
            ``implicit`` mode's linear solve ``(H + damping·I) w = v``.
        forward_wrt: tensors differentiated in ``forward`` mode.
        es_wrt, es_samples, es_sigma, pes_truncation, generator: the ``es``
            and ``pes`` estimators (antithetic pairs, perturbation scale, the
            truncation length, and the random generator for perturbations).
        meta_parameters: other tensors the inner loss depends on (for example
            a learned loss's weights): they receive meta-gradients in every mode.
        check_finite: raise naming the task and step on a non-finite inner loss
            or gradient (default True).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: DifferentiableOptimizer | torch.optim.Optimizer | None = None,
        loss_fn: LossFn | None = None,
        *,
        steps: int = 1,
        mode: str = "second_order",
        vectorize: bool | str = "auto",
        batchnorm: str = "transductive",
        proximal: float | Tensor | None = None,
        truncate: int | None = None,
        segment: int | None = None,
        solver: str = "cg",
        solver_iterations: int = 100,
        solver_tol: float = 1e-10,
        damping: float = 0.0,
        neumann_alpha: float = 0.1,
        forward_wrt: Sequence[Tensor] | None = None,
        es_wrt: Sequence[Tensor] | None = None,
        es_samples: int = 16,
        es_sigma: float = 1e-2,
        pes_truncation: int | None = None,
        generator: torch.Generator | None = None,
        meta_parameters: Sequence[Tensor] = (),
        check_finite: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not a mode; valid modes: {', '.join(MODES)}")
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        self.model = model
        self.theta = list(model.parameters())
        self.optimizer = self._inner_optimizer(optimizer)
        self.loss_fn = loss_fn or F.mse_loss
        self.steps = steps
        self.mode = mode
        self.patched = PatchedModel(model, batchnorm)
        self.vectorize, self.vectorize_reason = self._vectorize(vectorize)
        self.proximal = proximal
        self.truncate = truncate
        self.segment = segment
        self.solver, self.solver_iterations, self.solver_tol = solver, solver_iterations, solver_tol
        self.damping, self.neumann_alpha = damping, neumann_alpha
        self.forward_wrt = forward_wrt
        self.es_wrt, self.es_samples, self.es_sigma = es_wrt, es_samples, es_sigma
        self.pes_truncation = pes_truncation
        self.generator = generator
        self.meta_parameters = list(meta_parameters)
        self.check_finite = check_finite
        self.last_info: dict[str, Any] = {}
        self._validate_mode_options()

    # -- configuration -------------------------------------------------------------
    def _inner_optimizer(self, optimizer: Any) -> DifferentiableOptimizer:
        if optimizer is None:
            optimizer = SGD(self.model.parameters(), lr=0.01)
        elif isinstance(optimizer, torch.optim.Optimizer):
            optimizer = from_torch(optimizer)
        elif not isinstance(optimizer, DifferentiableOptimizer):
            raise TypeError(
                f"optimizer must be a diffopt.optim or torch.optim optimizer, got {type(optimizer).__name__}"
            )
        index = {id(p): j for j, p in enumerate(self.theta)}
        positions = []
        for k, p in enumerate(optimizer.params):
            if id(p) not in index:
                raise ValueError(
                    f"optimizer parameter {k} (shape {tuple(p.shape)}) is not a parameter of the model; "
                    "build the inner optimizer on model.parameters() (or a subset of them)"
                )
            positions.append(index[id(p)])
        self.positions = positions
        self.adapted_mask = [j in set(positions) for j in range(len(self.theta))]
        return optimizer

    def _vectorize(self, vectorize: bool | str) -> tuple[bool, str]:
        if vectorize == "auto":
            return choose_vectorize(self.model)
        if vectorize is True:
            return True, "vmap: requested (vectorize=True)"
        if vectorize is False:
            return False, "task loop: requested (vectorize=False)"
        raise ValueError(f"vectorize must be True, False or 'auto', got {vectorize!r}")

    def _validate_mode_options(self) -> None:
        if self.mode == "truncated":
            if self.truncate is None or not 0 <= self.truncate <= self.steps:
                raise ValueError(
                    f"mode='truncated' needs truncate=k with 0 <= k <= steps ({self.steps}); got {self.truncate!r}"
                )
        if self.mode == "checkpointed" and self.segment is not None and self.segment < 1:
            raise ValueError(f"segment must be a positive number of steps, got {self.segment!r}")
        if self.mode == "implicit" and self.solver not in ("cg", "neumann"):
            raise ValueError(f"solver={self.solver!r}: choose 'cg' or 'neumann'")
        if self.mode == "pes" and self.pes_truncation is not None and self.pes_truncation < 1:
            raise ValueError(f"pes_truncation must be a positive number of steps, got {self.pes_truncation!r}")
        if self.mode in ("es", "pes") and (self.es_samples < 1 or not self.es_sigma > 0):
            raise ValueError("es_samples must be >= 1 and es_sigma > 0")

    def meta_tensors(self) -> list[Tensor]:
        """Tensors other than the carry that the inner steps depend on and that require grad."""
        found: dict[int, Tensor] = {}
        candidates = list(self.optimizer.hyperparameter_tensors()) + self.meta_parameters
        if self.proximal is not None:
            candidates += [self.theta[j] for j in self.positions]
            if isinstance(self.proximal, Tensor):
                candidates.append(self.proximal)
        for t in candidates:
            if isinstance(t, Tensor) and t.requires_grad:
                found.setdefault(id(t), t)
        return list(found.values())

    # -- data checks ---------------------------------------------------------------
    @staticmethod
    def _check_pair(x: Tensor, y: Tensor, what: str) -> None:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"{what}: inputs and targets must be tensors")
        if x.dim() < 2 or y.dim() < 1:
            raise ValueError(
                f"{what}: inputs need a leading task dimension and an example dimension, got shape "
                f"{tuple(x.shape)}; add one with x.unsqueeze(0) for a single task"
            )
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{what}: inputs have {x.shape[0]} tasks but targets have {y.shape[0]} (leading dimension)"
            )

    def _check_tasks(self, sx: Tensor, sy: Tensor, qx: Tensor | None = None, qy: Tensor | None = None) -> None:
        self._check_pair(sx, sy, "support")
        if qx is not None and qy is not None:
            self._check_pair(qx, qy, "query")
            if qx.shape[0] != sx.shape[0]:
                raise ValueError(
                    f"support has {sx.shape[0]} tasks but query has {qx.shape[0]}; both need the same "
                    "leading task dimension"
                )

    # -- the step ------------------------------------------------------------------
    def initial_carry(self, tasks: int, theta: Sequence[Tensor] | None = None) -> Carry:
        theta = self.theta if theta is None else list(theta)
        params = [
            p.unsqueeze(0).expand(tasks, *p.shape) if adapted else p for p, adapted in zip(theta, self.adapted_mask)
        ]
        adapted = [params[j] for j in self.positions]
        states = self.optimizer.initial_states(adapted)
        return Carry(params, states, self.patched.initial_buffers(tasks), 0)

    def task_losses(
        self, params: Sequence[Tensor], buffers: Sequence[Tensor], x: Tensor, y: Tensor, phase: str,
        loss_fn: LossFn | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Per-task losses, shape (T,), and the updated per-task statistics."""
        loss_fn = loss_fn or self.loss_fn
        try:
            outputs, buffers = self.patched.forward_tasks(params, buffers, x, phase, self.vectorize, self.adapted_mask)
        except RuntimeError as error:
            if self.vectorize and ("vmap" in str(error) or "batch" in str(error).lower()):
                raise RuntimeError(describe_vmap_failure(self.model, error)) from error
            raise
        losses = self._per_task_loss(loss_fn, outputs, y)
        if losses.dim() != 1:
            raise ValueError(
                f"loss_fn must return a scalar per task, got shape {tuple(losses.shape[1:])} per task; reduce "
                "it over the examples (e.g. reduction='mean')"
            )
        return losses, buffers

    def _per_task_loss(self, loss_fn: LossFn, outputs: Tensor, y: Tensor) -> Tensor:
        if self.vectorize:
            try:
                return torch.func.vmap(loss_fn)(outputs, y)
            except (RuntimeError, ValueError):
                pass  # a loss vmap cannot batch: fall back to the task loop below
        return torch.stack([loss_fn(outputs[t], y[t]) for t in range(outputs.shape[0])])

    def inner_objective(self, carry: Carry, x: Tensor, y: Tensor, theta: Sequence[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """Per-task inner objective: the inner loss plus iMAML's proximal term if set."""
        losses, buffers = self.task_losses(carry.params, carry.buffers, x, y, "inner")
        if self.proximal is not None:
            theta = self.theta if theta is None else theta
            distance = sum(
                ((carry.params[j] - theta[j]) ** 2).flatten(1).sum(1) for j in self.positions
            )
            losses = losses + 0.5 * self.proximal * distance
        return losses, buffers

    def step(self, carry: Carry, x: Tensor, y: Tensor, graph: str, optimizer: DifferentiableOptimizer | None = None,
             theta: Sequence[Tensor] | None = None) -> Carry:
        """One inner step. ``graph``: "full" (second order), "first_order" or "none" (no graph)."""
        optimizer = optimizer or self.optimizer
        if not torch.is_grad_enabled():
            # Under torch.no_grad (evaluation) nothing will be differentiated; the carry's
            # tensors do not require grad there, so the inner gradient needs fresh leaves.
            graph = "none"
        if graph == "none":
            carry = detached(carry, requires_grad=True)
        with torch.enable_grad():
            losses, buffers = self.inner_objective(carry, x, y, theta)
            if self.check_finite and not torch.isfinite(losses.detach()).all():
                bad = torch.nonzero(~torch.isfinite(losses.detach())).flatten().tolist()
                raise NonFiniteError(
                    f"inner loss is not finite for task(s) {bad} at inner step {carry.step} "
                    f"(values {losses.detach()[bad].tolist()}); lower the inner learning rate, clip "
                    "gradients or check the support data"
                )
            adapted = [carry.params[j] for j in self.positions]
            # Frozen parameters (requires_grad=False) get no gradient and stay put, as in
            # torch.optim, in every mode (graph="none" makes every carry tensor a leaf).
            trainable = [k for k, j in enumerate(self.positions) if self.theta[j].requires_grad]
            computed = torch.autograd.grad(
                losses.sum(), [adapted[k] for k in trainable], create_graph=graph == "full", allow_unused=True
            ) if trainable else ()
            grads: list[Tensor | None] = [None] * len(adapted)
            for k, g in zip(trainable, computed):
                grads[k] = g
        grads = self._transform(optimizer, grads, carry.step)
        if self.check_finite and not _all_finite(grads):
            for k, g in enumerate(grads):
                if g is not None and not torch.isfinite(g.detach()).all():
                    tasks = torch.nonzero(~torch.isfinite(g.detach()).flatten(1).all(1)).flatten().tolist()
                    raise NonFiniteError(
                        f"inner gradient of {self.patched.names[self.positions[k]]} is not finite for task(s) "
                        f"{tasks} at inner step {carry.step}; lower the inner learning rate or clip gradients"
                    )
        if graph == "none":
            with torch.no_grad():
                new, states = optimizer.update(adapted, grads, carry.states, carry.step)
        else:
            new, states = optimizer.update(adapted, grads, carry.states, carry.step)
        params = list(carry.params)
        for j, p in zip(self.positions, new):
            params[j] = p
        return Carry(params, states, buffers, carry.step + 1)

    @staticmethod
    def _transform(optimizer: DifferentiableOptimizer, grads: list[Tensor | None], step: int) -> list[Tensor | None]:
        """The optimizer's gradient transforms (clipping, ``grad_transform``) applied task by task.

        Tasks are independent inner problems: a global-norm clip over the task-batched
        gradients would couple them, so each task's gradients are transformed alone.
        """
        out = optimizer.transforms(list(grads), step)
        present = [g for g in grads if g is not None]
        if all(a is b for a, b in zip(out, grads)) or not present:
            return out  # no transform configured
        per_task = [optimizer.transforms([None if g is None else g[t] for g in grads], step)
                    for t in range(present[0].shape[0])]
        return [None if g is None else torch.stack([task[k] for task in per_task]) for k, g in enumerate(grads)]

    def run(self, carry: Carry, n: int, x: Tensor, y: Tensor, graph: str, **kwargs: Any) -> Carry:
        for _ in range(n):
            carry = self.step(carry, x, y, graph, **kwargs)
        if graph == "none":
            carry = detached(carry)
        return carry

    # -- public ------------------------------------------------------------------------
    def adapt(self, support_x: Tensor, support_y: Tensor) -> Adapted:
        """Run the K inner steps; the result is differentiable as the mode prescribes."""
        self._check_tasks(support_x, support_y)
        carry0 = self.initial_carry(support_x.shape[0])
        info: dict[str, Any] = {"mode": self.mode, "steps": self.steps, "vectorize": self.vectorize,
                                "vectorize_reason": self.vectorize_reason}
        carry = modes.adapt(self, carry0, support_x, support_y, info)
        self.last_info = info
        return Adapted(carry.params, list(self.adapted_mask), carry.buffers, info)

    def query_losses(self, adapted: Adapted, query_x: Tensor, query_y: Tensor, loss_fn: LossFn | None = None) -> Tensor:
        """Per-task query losses (T,) at the adapted weights."""
        losses, _ = self.task_losses(adapted.params, adapted.buffers, query_x, query_y, "outer", loss_fn)
        return losses

    def predict(self, adapted: Adapted, x: Tensor) -> Tensor:
        """Outputs of the adapted model for every task (leading task dimension)."""
        outputs, _ = self.patched.forward_tasks(
            adapted.params, [b.clone() for b in adapted.buffers], x, "outer", self.vectorize, self.adapted_mask
        )
        return outputs

    def meta_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
        loss_fn: LossFn | None = None,
    ) -> Tensor:
        """Mean query loss over the tasks after adaptation; ``.backward()`` gives the meta-gradient."""
        self._check_tasks(support_x, support_y, query_x, query_y)
        if self.mode in ("es", "pes"):
            return modes.evolution_strategies_loss(self, support_x, support_y, query_x, query_y, loss_fn)
        adapted = self.adapt(support_x, support_y)
        return self.query_losses(adapted, query_x, query_y, loss_fn).mean()

    def adapt_without_graph(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Adapted:
        """``steps`` inner steps (default K) with no graph: for evaluation and for Reptile."""
        self._check_tasks(support_x, support_y)
        carry = self.run(self.initial_carry(support_x.shape[0]), self.steps if steps is None else steps,
                         support_x, support_y, "none")
        return Adapted(carry.params, list(self.adapted_mask), carry.buffers, {"mode": "none"})

    def query_losses_along(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, at: Sequence[int],
        graph: str = "none", metric: LossFn | None = None,
    ) -> Tensor:
        """Per-task query losses (or ``metric``) after each step count in ``at``: shape (len(at), T).

        ``graph="none"`` evaluates without any graph (test-time adaptation with any
        number of steps); ``"full"`` or ``"first_order"`` keep the graph, for
        multi-step losses such as MAML++'s.
        """
        self._check_tasks(support_x, support_y, query_x, query_y)
        if not at or min(at) < 0:
            raise ValueError(f"at must be a non-empty list of step counts >= 0, got {list(at)!r}")
        carry = self.initial_carry(support_x.shape[0])
        rows: dict[int, Tensor] = {}
        for step in range(max(at) + 1):
            if step in at:
                adapted = Adapted(carry.params, self.adapted_mask, carry.buffers, {})
                with torch.set_grad_enabled(graph != "none" and torch.is_grad_enabled()):
                    rows[step] = self.query_losses(adapted, query_x, query_y, metric)
            if step < max(at):
                carry = self.step(carry, support_x, support_y, graph)
        return torch.stack([rows[step] for step in at])

    def rebind(self, theta: Sequence[Tensor] | None = None, hyperparameters: dict[int, Tensor] | None = None) -> "InnerLoop":
        """A shallow copy whose initialisation is ``theta`` and whose tensor hyperparameters are
        replaced (``{id(old): new}``): the meta-loss as a function of explicit tensors, for
        finite differences and ``torch.autograd.gradcheck``. The patched model is shared."""
        clone = copy.copy(self)
        if theta is not None:
            theta = list(theta)
            if len(theta) != len(self.theta) or any(a.shape != b.shape for a, b in zip(theta, self.theta)):
                raise ValueError("rebind(theta=...): give one tensor per model parameter, with the same shapes")
            clone.theta = theta
        if hyperparameters:
            clone.optimizer = self.with_hyperparameters(hyperparameters)
        clone.last_info = {}
        return clone

    # -- perturbation support for ES/PES -------------------------------------------------
    def with_hyperparameters(self, mapping: dict[int, Tensor]) -> DifferentiableOptimizer:
        """A copy of the inner optimizer whose tensor hyperparameters are replaced by ``mapping[id]``."""
        def swap(value: Any) -> Any:
            if isinstance(value, Tensor):
                return mapping.get(id(value), value)
            if isinstance(value, tuple):
                return tuple(swap(v) for v in value)
            if isinstance(value, PerParameter):
                return PerParameter([swap(v) for v in value.values])
            if isinstance(value, Schedule) and isinstance(value.values, Tensor):
                return value.with_values(swap(value.values))
            if isinstance(value, Schedule) and not callable(value.values):
                return value.with_values([swap(v) for v in value.values])
            return value

        clone = copy.copy(self.optimizer)
        clone.param_groups = [
            {k: (v if k == "params" else swap(v)) for k, v in group.items()} for group in self.optimizer.param_groups
        ]
        return clone


def _all_finite(tensors: Sequence[Tensor | None]) -> bool:
    """One synchronisation: a NaN or infinity anywhere makes the sum of sums non-finite."""
    sums = [t.detach().sum() for t in tensors if t is not None]
    return not sums or bool(torch.isfinite(torch.stack(sums).sum()))


def default_segment(steps: int) -> int:
    return max(1, math.ceil(math.sqrt(steps)))
