"""The inner-loop engine: K steps on a meta-batch of tasks, and the meta-gradient in any mode.

``InnerLoop(model, optimizer, loss_fn, steps=K, mode=...)`` adapts the model's
weights on each task's support set with a differentiable update rule and
returns the adapted (task-batched) fast weights; ``meta_loss`` evaluates them
on the query sets. The result is differentiable with respect to the model's
parameters and every tensor hyperparameter, by the mode chosen: an object of
:mod:`diffopt.unroll.modes` (``Truncated(3)``, ``Implicit(CG(20))``, ...) or its name
(``"second_order"``, ``"first_order"``, ``"truncated"``, ``"checkpointed"``,
``"implicit"``, ``"forward"``, ``"es"``, ``"pes"``), which owns its options and how the
unroll is made differentiable. The engine itself is one loop::

    carry = (θ expanded over tasks, optimizer states, per-task statistics, step 0)
    repeat K times:
        losses = inner loss of every task at carry.params        (one vmap'd forward)
        grads  = autograd.grad(losses.sum(), adapted weights)    (task t's own gradient)
        carry  = optimizer.update(carry, grads)                  (pure, never in place)

Tasks are independent, so one ``torch.autograd.grad`` of the sum of the
per-task inner losses gives every task its own gradient.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad as fwAD

from ..optim import SGD, DifferentiableOptimizer, NonFiniteError, from_torch
from ..optim.lbfgs import LBFGS
from ..optim._gradients import all_finite, graph_leaves, inside_torch_func
from ..optim._hyper import PerParameter, Schedule
from ._shapes import no_example_dimension
from . import closure_step
from .carry import Adapted, Carry, detached
from .attention import ATTENTION, check_double_backward, double_differentiable
from .modes import MODES, Mode, as_mode, default_segment
from .functional import ParameterLayout
from .lowered import per_task_loss
from .lowered_backprop import ExplicitBackprop
from .lowered_hessian import (ExplicitHessian, SGDStep, StepContext, StepHyperparameters, forward_ad_active,
                              sgd_hyperparameters, sgd_values, written_out_task_losses)
from .patched import PatchedModel, choose_vectorize, describe_vmap_failure

LossFn = Callable[[Tensor, Tensor], Tensor]

__all__ = ["MODES", "Adapted", "InnerLoop", "default_segment"]


def _refuse_functorch_transform(entry: str) -> None:
    """Name the limitation and the alternatives instead of torch's message about ``requires_grad_``
    or ``.item()`` deep inside the inner loop."""
    if inside_torch_func():
        raise RuntimeError(
            f"InnerLoop.{entry} was called inside a torch.func transform (grad, vjp, jvp, jacrev, jacfwd or "
            "vmap): its inner steps differentiate the inner loss with torch.autograd, which those transforms "
            "cannot trace. Differentiate the result with .backward() or torch.autograd.grad instead; for "
            "forward mode use mode='forward' or torch.autograd.forward_ad dual numbers; for several "
            "hyperparameter values, call it once per value"
        )


def _checks_at_exit(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run an entry point (``adapt``, ``meta_loss``, ...) with the inner steps' non-finite checks
    deferred to its end: each step only records its losses, and one read at exit checks them
    and the last weights. If anything is not finite the entry point runs again with a check
    at every step, which raises the :class:`NonFiniteError` naming the first bad step, task
    and tensor. (Steps run later, in a backward pass, check at once.)"""
    @functools.wraps(method)
    def checked(self: InnerLoop, *args: Any, **kwargs: Any) -> Any:
        _refuse_functorch_transform(method.__name__)
        self.patched.refuse_checkpointing_switched_on(f"InnerLoop.{method.__name__}")
        self._refuse_adapting_nothing(method.__name__)
        if self._pending_checks is not None or not self.check_finite:
            return method(self, *args, **kwargs)
        self._pending_checks, self._last_adapted = [], None
        try:
            result = method(self, *args, **kwargs)
            bad = self._deferred_checks_found_non_finite()
        except Exception as error:
            bad = self._deferred_checks_found_non_finite()  # a NaN upstream may explain the failure
            if not bad:
                raise
            self._pending_checks = None
            self._diagnose(method, args, kwargs, error)
            raise
        finally:
            self._pending_checks, self._last_adapted = None, None
        if bad:
            self._diagnose(method, args, kwargs, None)
        return result

    return checked


def _adaptable(tensor: Tensor) -> Tensor:
    """``tensor`` as the initialisation of a trainable parameter: a plain tensor (finite differences) still
    adapts, so it becomes a leaf that requires grad (the inner gradient needs one); a forward-mode dual keeps
    its tangent; inside a torch.func transform it is left as it is (the loop then says what to use)."""
    if tensor.requires_grad or inside_torch_func():
        return tensor
    primal, tangent = fwAD.unpack_dual(tensor)
    leaf = primal.detach().requires_grad_()
    return leaf if tangent is None else fwAD.make_dual(leaf, tangent)


class InnerLoop:
    """K differentiable inner steps on a meta-batch of tasks.

    Args:
        model: the module whose parameters are the meta-learned initialisation θ.
        optimizer: the inner update rule: a ``diffopt.optim`` optimizer or a
            ``torch.optim`` optimizer built on (some of) ``model.parameters()``;
            only those parameters are adapted. Default: SGD with lr 0.01 on all.
            A :class:`diffopt.optim.LBFGS` runs one L-BFGS per task, task by task,
            in modes second_order, first_order, truncated and implicit (see
            :mod:`diffopt.unroll.closure_step`).
        loss_fn: per-task loss ``loss_fn(prediction, target) -> scalar``
            (default mean squared error).
        steps: K, the number of inner steps.
        mode: a :mod:`diffopt.unroll.modes` object (``Truncated(3)``,
            ``Implicit(CG(20), damping=0.1)``, ...) or one of the names in ``MODES``;
            ``loop.mode`` is the object (it compares equal to its name).
        vectorize: True (all tasks at once), False (task loop), "auto" or "vmap". All tasks
            at once runs a ``Sequential`` of known layers (Linear, Conv, BatchNorm, pooling,
            activations) as task-batched kernels (:mod:`diffopt.unroll.lowered`: ``baddbmm``,
            grouped convolutions) and anything else under ``torch.func.vmap``; "vmap" forces
            vmap. ``loop.vectorize_reason`` says which and why.
        batchnorm: "transductive", "per_task" or "frozen" (see ``patched``).
        backend: how the model is evaluated at the fast weights: "higher"
            (monkeypatched copy), "functional_call" (``torch.func.functional_call``)
            or "auto": functional_call for Hugging Face ``transformers`` / ``peft``
            models (higher cannot patch their ``ModuleList`` slicing), higher
            otherwise. ``loop.backend_reason`` says which and why.
        autocast: ``torch.bfloat16`` or ``torch.float16`` runs the model's forwards and the
            losses under ``torch.autocast`` (mixed precision); the fast weights, their
            updates and the meta-gradients stay in the parameters' dtype (float32).
            Measured on CPU in ``benchmarks/mixed_precision.md``. None (default): off.
        attention: how attention is differentiated twice in the steps that need it (see
            :mod:`diffopt.unroll.attention`): "math" (the MATH backend, default) or
            "blockwise" (:mod:`diffopt.unroll.blockwise`: fused forward, backward recomputed
            in blocks of rows; less memory at long sequences, ``benchmarks/transformer_meta.md``).
        proximal: λ of iMAML's proximal term ``λ/2 ||φ − θ||²`` added to the
            inner objective (any mode); None for none.
        meta_parameters: other tensors the inner loss depends on (for example
            a learned loss's weights): they receive meta-gradients in the modes that
            differentiate through the inner gradients (second order, truncated,
            checkpointed, implicit, ES/PES); first order gives them zero by design
            (its inner gradients are constants), forward mode only when listed in its ``wrt``.
        check_finite: raise naming the task and step on a non-finite inner loss
            or gradient (default True).
        **mode_options: a named mode's options as keywords, as before modes were
            objects: ``truncate`` (``truncated``), ``segment`` (``checkpointed``),
            ``solver``, ``solver_iterations``, ``solver_tol``, ``damping``,
            ``neumann_alpha`` (``implicit``), ``forward_wrt`` (``forward``),
            ``es_wrt``, ``es_samples``, ``es_sigma``, ``generator`` (``es``, ``pes``),
            ``pes_truncation`` (``pes``). Options of the other modes are ignored, so that one set of
            keywords can sweep the modes; an unknown keyword is an error naming the closest option.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: DifferentiableOptimizer | torch.optim.Optimizer | LBFGS | None = None,
        loss_fn: LossFn | None = None,
        *,
        steps: int = 1,
        mode: Mode | str = "second_order",
        vectorize: bool | str = "auto",
        batchnorm: str = "transductive",
        backend: str = "auto",
        autocast: torch.dtype | None = None,
        attention: str = "math",
        proximal: float | Tensor | None = None,
        meta_parameters: Sequence[Tensor] = (),
        check_finite: bool = True,
        **mode_options: Any,
    ) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        self.mode = as_mode(mode, **mode_options)
        self.mode.validate(steps)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be a callable loss_fn(prediction, target) -> scalar, got {loss_fn!r}; "
                            "for example torch.nn.functional.mse_loss")
        _check_proximal(proximal)
        self.model = model
        self.theta = list(model.parameters())
        # which tensors adapt is the model's: a parameter with requires_grad=False is frozen, whatever
        # tensors rebind(theta=...) puts in its place (plain ones, for finite differences)
        self.model_parameters = list(self.theta)
        self.optimizer = self._inner_optimizer(optimizer)
        self.loss_fn = loss_fn or F.mse_loss
        self.steps = steps
        self.patched = PatchedModel(model, batchnorm, backend)
        self.backend, self.backend_reason = self.patched.backend, self.patched.backend_reason
        self.autocast = _check_autocast(autocast, self.theta)
        #: the widest floating dtype among the weights (float32 for a bfloat16 base with float32 adapters)
        self._weights_dtype = functools.reduce(torch.promote_types, [p.dtype for p in self.theta
                                                                       if p.is_floating_point()], torch.float32)
        self.vectorize, self.vectorize_reason = self._vectorize(vectorize)
        self._backprop = ExplicitBackprop.build(self.patched.lowered)
        self._hessian = ExplicitHessian.build(self._backprop)
        self.proximal = proximal
        self.meta_parameters = list(meta_parameters)
        if (self.mode.name == "implicit" and proximal is None
                and any(self.model_parameters[j].requires_grad for j in self.positions)):
            warnings.warn(
                "InnerLoop(mode='implicit') without proximal=: the inner solution does not depend on where the "
                "steps start, so the adapted weights' initialisation gets no meta-gradient (only the inner "
                "problem's other inputs do: hyperparameters, meta_parameters, shared weights, the data); pass "
                "proximal=λ (iMAML) to meta-learn it",
                UserWarning, stacklevel=2,
            )
        self.check_finite = check_finite
        if attention not in ATTENTION:
            raise ValueError(f"attention={attention!r}: choose 'math' (the MATH backend) or 'blockwise' "
                             "(a backward recomputed in blocks of rows)")
        self.attention = attention
        self.last_info: dict[str, Any] = {}
        self._double_backward_checked = False
        self._dependencies_checked = False
        self._pending_checks: list[Tensor] | None = None  # inner losses recorded for one check at exit
        self._last_adapted: list[Tensor] | None = None

    # -- configuration -------------------------------------------------------------
    def _inner_optimizer(self, optimizer: Any) -> DifferentiableOptimizer:
        if optimizer is None:
            optimizer = SGD(self.model.parameters(), lr=0.01)
        elif isinstance(optimizer, torch.optim.Optimizer):
            optimizer = from_torch(optimizer)
        elif not isinstance(optimizer, (DifferentiableOptimizer, LBFGS)):
            raise TypeError(
                f"optimizer must be a diffopt.optim or torch.optim optimizer, got {type(optimizer).__name__}"
            )
        positions = ParameterLayout(self.model).positions(optimizer.params)
        self.positions = positions
        self.adapted_mask = [j in set(positions) for j in range(len(self.theta))]
        return optimizer

    def _vectorize(self, vectorize: bool | str) -> tuple[bool, str]:
        if isinstance(self.optimizer, LBFGS):
            return closure_step.check_closure_optimizer(self, vectorize)
        if vectorize == "vmap":  # the generic vectorised path, even where task-batched kernels exist
            if self.autocast is not None:
                self._vmap_under_autocast(vectorize)
            self.patched.lowered, self.patched.lowered_reason = None, "vmap: requested (vectorize='vmap')"
            return True, "vmap: requested (vectorize='vmap')"
        if vectorize == "auto":
            chosen, reason = choose_vectorize(self.model, self.patched.policy, self.patched.lowered is not None)
        elif vectorize is True:
            chosen, reason = True, "vmap: requested (vectorize=True)"
        elif vectorize is False:
            return False, "task loop: requested (vectorize=False)"
        else:
            raise ValueError(f"vectorize must be True, False, 'auto' or 'vmap', got {vectorize!r}")
        if chosen and self.patched.lowered is not None:
            return True, f"{self.patched.lowered_reason}: {reason.split(': ', 1)[1]}"
        if chosen and self.autocast is not None:
            return self._vmap_under_autocast(vectorize)
        return chosen, reason

    def _vmap_under_autocast(self, vectorize: bool | str) -> tuple[bool, str]:
        """torch.autocast does not reach operations traced by torch.func.vmap: a vmapped forward would run in
        the weights' precision (or mix dtypes and fail in attention), so autocast takes the task loop."""
        why = ("torch.autocast does not reach the operations torch.func.vmap traces (the forward would silently run "
               "in the weights' precision)")
        if vectorize == "auto":
            return False, f"task loop: autocast={self.autocast}: {why}"
        raise ValueError(f"InnerLoop(vectorize={vectorize!r}, autocast={self.autocast}): {why}; use vectorize='auto' "
                         "or False (the task loop, which autocast reaches), or drop autocast")

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

    def _refuse_adapting_nothing(self, where: str) -> None:
        """The inner optimizer holds parameters, all frozen (``requires_grad=False``): they stay put as in
        torch.optim, so K steps would adapt nothing, silently (a meta-loss equal to K = 0's)."""
        if self.steps and self.positions and not any(self.model_parameters[j].requires_grad for j in self.positions):
            raise ValueError(
                f"InnerLoop.{where}: every parameter the inner optimizer holds ({len(self.positions)}) is frozen "
                "(requires_grad=False), so the inner steps would adapt nothing. Give the optimizer trainable "
                "parameters (e.g. select_parameters(model, 'lora')), or unfreeze them with requires_grad_()")

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
        if x.shape[1] == 0 or (y.dim() >= 2 and y.shape[1] == 0):
            raise ValueError(
                f"{what}: got 0 examples per task (inputs {tuple(x.shape)}, targets {tuple(y.shape)}; the second "
                "dimension counts the examples): a task's loss needs at least one example (a mean over none is NaN)"
            )
        no_example_dimension(x, what)

    def _check_tasks(self, sx: Tensor, sy: Tensor, qx: Tensor | None = None, qy: Tensor | None = None) -> None:
        self._check_pair(sx, sy, "support")
        if sx.shape[0] == 0:
            raise ValueError("support: got 0 tasks (leading dimension 0); a meta-batch needs at least one task")
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
        if isinstance(self.optimizer, LBFGS):
            states = closure_step.initial_states(tasks)
        else:
            states = self.optimizer.initial_states(adapted)
        return Carry(params, states, self.patched.initial_buffers(tasks), 0)

    def task_losses(
        self, params: Sequence[Tensor], buffers: Sequence[Tensor], x: Tensor, y: Tensor, phase: str,
        loss_fn: LossFn | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Per-task losses, shape (T,), and the updated per-task statistics."""
        loss_fn = loss_fn or self.loss_fn
        if (phase == "outer" and torch.is_grad_enabled() and self._hessian is not None
                and self._writes_out_gradients(loss_fn)):
            losses = written_out_task_losses(self._hessian, params, x, y, loss_fn)
            if losses is not None:  # (the query losses with their gradients, lowered_hessian.TaskLosses)
                return losses, list(buffers)
        with self._autocast():
            try:
                outputs, buffers = self.patched.forward_tasks(params, buffers, x, phase, self.vectorize,
                                                              self.adapted_mask)
            except RuntimeError as error:
                raise self._forward_failure(error, params, buffers, x, phase) from error
            losses = self._per_task_loss(loss_fn, outputs, y)
        if self.autocast is not None and self.theta:  # a low-precision loss_fn's value, at least in the weights'
            losses = losses.to(torch.promote_types(losses.dtype, self._weights_dtype))  # widest dtype: never down
        if losses.dim() != 1:
            raise ValueError(
                f"loss_fn must return a scalar per task, got shape {tuple(losses.shape[1:])} per task; reduce "
                "it over the examples (e.g. reduction='mean')"
            )
        return losses, buffers

    def _autocast(self) -> Any:
        """``torch.autocast`` on the parameters' device when ``autocast`` is set, else nothing."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.theta[0].device.type if self.theta else "cpu", dtype=self.autocast)

    def _per_task_loss(self, loss_fn: LossFn, outputs: Tensor, y: Tensor) -> Tensor:
        if self.vectorize:
            batched = per_task_loss(loss_fn, outputs, y)  # mse / cross-entropy: one kernel, no vmap
            if batched is not None:
                return batched
        with warnings.catch_warnings():
            # torch's losses only warn when the target broadcasts against a prediction of
            # another shape ((N, 1) against (N,) gives an N x N loss): here that is an error.
            warnings.filterwarnings("error", message=".*target size.*different to the input size.*")
            try:
                return self._per_task_loss_unchecked(loss_fn, outputs, y)
            except UserWarning as warning:
                raise ValueError(
                    f"loss_fn: the model's output per task has shape {tuple(outputs.shape[1:])} but the targets "
                    f"{tuple(y.shape[1:])}; they broadcast to a wrong loss ({warning}). Give targets of the "
                    "output's shape (e.g. y.unsqueeze(-1))"
                ) from None

    def _per_task_loss_unchecked(self, loss_fn: LossFn, outputs: Tensor, y: Tensor) -> Tensor:
        if self.vectorize:
            try:
                return torch.func.vmap(loss_fn)(outputs, y)
            except (RuntimeError, ValueError):
                pass  # a loss vmap cannot batch: fall back to the task loop below
        return torch.stack([loss_fn(out, target) for out, target in zip(outputs.unbind(0), y.unbind(0))])

    def _forward_failure(self, error: RuntimeError, params: Sequence[Tensor], buffers: Sequence[Tensor], x: Tensor,
                         phase: str) -> RuntimeError:
        """The error to raise when the model's forward failed on a task batch: the first task run alone
        in the task loop tells data that does not fit the model (named with its shape) from a model
        that cannot run vectorised (vmap or the task-batched kernels)."""
        which = "support" if phase == "inner" else "query"
        try:
            first = [p[:1] if adapted else p for p, adapted in zip(params, self.adapted_mask)]
            self.patched.forward_tasks(first, [b[:1] for b in buffers], x[:1], phase, False, self.adapted_mask)
        except RuntimeError as alone:
            return RuntimeError(
                f"the model's forward failed on the {which} inputs of shape {tuple(x.shape)} (tasks, examples, "
                f"...), for the first task alone as well: {alone}. Check that the {which} inputs have the shape "
                "the model takes after the task and example dimensions"
            )
        if self.vectorize and self.patched.lowered is None:
            return RuntimeError(describe_vmap_failure(self.model, error, self.patched.policy))
        if self.vectorize:
            return RuntimeError(
                f"the task-batched kernels of diffopt.unroll.lowered failed on the {which} inputs of shape "
                f"{tuple(x.shape)}, which the model takes task by task ({error}); use vectorize='vmap' or False, "
                "and please report it"
            )
        return error

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
        second_order = graph == "full"
        if isinstance(optimizer, LBFGS):  # needs the objective at trial points: one L-BFGS per task
            with double_differentiable(second_order, self.attention):
                return closure_step.lbfgs_step(self, carry, x, y, graph, None if theta is None else list(theta))
        adapted = [carry.params[j] for j in self.positions]
        deferred = self._pending_checks is not None
        hyper = sgd_hyperparameters(optimizer, len(adapted), carry.step)  # None: not a plain SGD step
        if second_order and hyper is not None:
            fused = self._written_out_sgd_step(carry, x, y, hyper)
            if fused is not None:
                losses, grads, new = fused
                self._record_or_check_losses(losses, carry.step, deferred)
                if not deferred:
                    self._check_finite_gradients(list(grads), carry.step)
                return self._next_carry(carry, new, list(carry.states), carry.buffers)
        written_out = self._written_out_gradients(carry, x, y, second_order)
        if written_out is not None:
            (losses, grads), buffers = written_out, carry.buffers
        else:
            losses, buffers, grads = self._autograd_gradients(carry, x, y, theta, adapted, second_order)
        self._record_or_check_losses(losses, carry.step, deferred)  # named before anything else of the step
        if written_out is None and second_order and not self._double_backward_checked:
            self._check_double_backward(grads, adapted, carry, x, y, theta)
        grads = self._transform(optimizer, grads, carry.step)
        if not deferred:
            self._check_finite_gradients(grads, carry.step)
        with torch.set_grad_enabled(graph != "none"):
            if hyper is not None and all(g is not None for g in grads):
                # plain SGD's arithmetic written directly (sgd_values, the same operations as
                # torch.optim.SGD's), skipping the optimizer's group bookkeeping: 4% / 8% / 7% of a
                # first-order sinusoid meta-step at K = 1 / 5 / 10 (in-process A/B); SGD keeps no state
                new, states = sgd_values(adapted, grads, hyper), list(carry.states)  # type: ignore[arg-type]
            else:
                new, states = optimizer.update(adapted, grads, carry.states, carry.step)
        return self._next_carry(carry, new, states, buffers)

    def _record_or_check_losses(self, losses: Tensor, step: int, deferred: bool) -> None:
        """The step's non-finite check of its inner losses, or, inside :meth:`deferred_checks`, the
        losses kept for one check when the loop ends."""
        if deferred:
            self._pending_checks.append(losses.detach())  # type: ignore[union-attr]
        else:
            self._check_finite_losses(losses, step)

    def _next_carry(self, carry: Carry, new: Sequence[Tensor], states: list[Any], buffers: list[Tensor]) -> Carry:
        """The carry after a step: the adapted positions replaced by ``new`` (kept, inside
        :meth:`deferred_checks`, for the check when the loop ends)."""
        if self._pending_checks is not None:
            self._last_adapted = list(new)
        params = list(carry.params)
        for j, p in zip(self.positions, new):
            params[j] = p
        return Carry(params, states, buffers, carry.step + 1)

    def _autograd_gradients(
        self, carry: Carry, x: Tensor, y: Tensor, theta: Sequence[Tensor] | None, adapted: list[Tensor],
        second_order: bool,
    ) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
        """The inner objective's per-task losses, updated statistics and ``autograd.grad`` inner gradients."""
        # A graph differentiated twice needs attention with a double backward: the MATH
        # backend, for exactly this forward (see diffopt.unroll.attention). Task-batched kernels
        # (diffopt.unroll.lowered) contain no attention.
        lowered = self.vectorize and self.patched.lowered is not None
        with torch.enable_grad(), double_differentiable(second_order and not lowered, self.attention):
            losses, buffers = self.inner_objective(carry, x, y, theta)
        with torch.enable_grad():
            grads = self._inner_gradients(losses, adapted, create_graph=second_order)
        return losses, buffers, grads

    def _written_out_sgd_step(self, carry: Carry, x: Tensor, y: Tensor, hyper: list[StepHyperparameters],
                              ) -> tuple[Tensor, list[Tensor], list[Tensor]] | None:
        """A second-order plain-SGD step (``hyper``: its hyperparameters) whose backward is written out
        (:mod:`diffopt.unroll.lowered_hessian`): ``(losses, gradients, new adapted tensors)``, or ``None``
        where it does not apply:
        where the inner gradient is not written out, another update rule or option (momentum,
        clipping), frozen adapted tensors, other meta-parameters, targets that require grad (or
        inputs that do, unless the network starts with a Linear), or forward-mode AD."""
        hessian = self._hessian
        if (hessian is None or not self._writes_out_gradients() or self.meta_parameters
                or (x.requires_grad and not hessian.differentiates_inputs) or y.requires_grad or forward_ad_active()
                or not all(self.model_parameters[j].requires_grad for j in self.positions)):
            return None
        adapted = [carry.params[j] for j in self.positions]
        with torch.no_grad():
            recorded = hessian.record(carry.params, x, y, self.loss_fn)
            if recorded is None:
                return None
            losses, by_position, tape = recorded
            if any(j not in by_position for j in self.positions):
                return None  # an adapted tensor the model does not use: autograd gives it no gradient
            grads = [by_position[j] for j in self.positions]
            new = sgd_values(adapted, grads, hyper)  # (plain SGD keeps no state)
        lr_inputs = list({id(h.lr): h.lr for h in hyper if isinstance(h.lr, Tensor) and h.lr.requires_grad}.values())
        with_x = x.requires_grad  # (ANIL's features: the support inputs carry the body's graph)
        context = StepContext(hessian, self.loss_fn, x, y, list(self.positions), hyper, len(carry.params), lr_inputs,
                              (grads, tape, new), with_x)
        new = list(SGDStep.apply(context, *carry.params, *lr_inputs, *([x] if with_x else [])))
        return losses, grads, new

    def _writes_out_gradients(self, loss_fn: LossFn | None = None) -> bool:
        """Whether :mod:`diffopt.unroll.lowered_backprop` covers this loop's model and loss (default:
        the inner loss): not the task loop or vmap, iMAML's proximal term, autocast or another loss."""
        backprop = self._backprop
        return not (backprop is None or not self.vectorize or backprop.lowered is not self.patched.lowered
                    or self.proximal is not None or self.autocast is not None
                    or not backprop.supports_loss(loss_fn or self.loss_fn))

    def _written_out_gradients(self, carry: Carry, x: Tensor, y: Tensor,
                               second_order: bool) -> tuple[Tensor, list[Tensor | None]] | None:
        """The inner losses and gradients by backpropagation written out as task-batched operations
        (:mod:`diffopt.unroll.lowered_backprop`), or ``None`` where it does not apply
        (:meth:`_writes_out_gradients`)."""
        backprop = self._backprop
        if not self._writes_out_gradients():
            return None
        trainable = [j for j in self.positions if self.model_parameters[j].requires_grad]
        with torch.set_grad_enabled(second_order):
            result = backprop.loss_and_gradients(carry.params, x, y, self.loss_fn, trainable)
        if result is None:
            return None
        losses, by_position = result
        return losses, [by_position.get(j) for j in self.positions]

    def _check_double_backward(self, grads: list[Tensor | None], adapted: list[Tensor], carry: Carry, x: Tensor,
                               y: Tensor, theta: Sequence[Tensor] | None) -> None:
        """Once per loop: refuse, naming the module and the op, an inner gradient whose graph
        holds an op without a double backward (the meta-gradient would fail in ``.backward()``)."""
        self._double_backward_checked = True
        if any(g is not None and g.is_meta for g in grads):
            return  # shapes only: nothing to differentiate

        def rerun() -> None:  # one task-loop forward with module hooks, only when something is missing
            vectorize, self.vectorize = self.vectorize, False
            try:
                with double_differentiable(attention=self.attention):
                    self.inner_objective(carry, x, y, theta)
            finally:
                self.vectorize = vectorize

        module = self.patched.fmodel if self.patched.fmodel is not None else self.model
        check_double_backward(grads, adapted, module, rerun, self.mode.name, self.model)

    def check_declared_dependencies(self, carry: Carry, x: Tensor, y: Tensor) -> None:
        """Once per loop, for the modes whose backward routes meta-gradients only to what they were
        given (checkpointed, implicit): refuse an inner loss that depends on a tensor which requires
        grad but is neither the weights, the data nor a declared meta-parameter (a tensor ``loss_fn``
        closes over, say). Those modes would drop its gradient silently; second order, truncated and
        forward mode follow the graph and find it on their own."""
        if self._dependencies_checked:
            return
        self._dependencies_checked = True
        probe = Carry([p.detach() for p in carry.params], carry.states, [b.clone() for b in carry.buffers], carry.step)
        devices = [x.device] if x.device.type == "cuda" else []  # the probe must not move the random
        with torch.random.fork_rng(devices=devices), torch.enable_grad():  # stream Dropout draws from
            losses, _ = self.inner_objective(probe, x.detach(), y.detach(), [t.detach() for t in self.theta])
        if not losses.requires_grad:
            return
        declared = {id(t) for t in self.meta_tensors()}
        undeclared = [t for t in graph_leaves([losses]) if id(t) not in declared]
        if undeclared:
            shapes = ", ".join(str(tuple(t.shape)) for t in undeclared)
            raise ValueError(
                f"InnerLoop(mode={self.mode.name!r}): the inner loss depends on {len(undeclared)} tensor(s) that "
                f"require grad but are not declared (shapes {shapes}; e.g. the weights of a learned loss that "
                f"loss_fn closes over). This mode routes meta-gradients only to the weights, the data and "
                "meta_parameters, so their gradient through the inner steps would be lost: pass them as "
                "InnerLoop(..., meta_parameters=[...]), or use mode='second_order'"
            )

    def _inner_gradients(self, losses: Tensor, adapted: list[Tensor], create_graph: bool) -> list[Tensor | None]:
        """Every task's gradient in one call: tasks are independent, so the gradient of the
        sum of the task losses with respect to task t's weights is task t's gradient.
        Frozen parameters (requires_grad=False) get None and stay put, as in torch.optim."""
        trainable = [k for k, j in enumerate(self.positions) if self.model_parameters[j].requires_grad]
        grads: list[Tensor | None] = [None] * len(adapted)
        if trainable:
            computed = torch.autograd.grad(losses.sum(), [adapted[k] for k in trainable], create_graph=create_graph,
                                           allow_unused=True)
            for k, g in zip(trainable, computed):
                grads[k] = g
        return grads

    # -- non-finite checks: one synchronisation per entry point, not two per inner step ------
    def _deferred_checks_found_non_finite(self) -> bool:
        """One read: any recorded inner loss, or the last adapted weights, not finite (a non-finite
        gradient reaches the next weights through the update)."""
        pending = [v for v in self._pending_checks or [] if not v.is_meta]
        return not all_finite([torch.cat(pending) if pending else None, *(self._last_adapted or [])])

    def _diagnose(self, method: Callable[..., Any], args: tuple, kwargs: dict[str, Any],
                  cause: Exception | None) -> None:
        """Run ``method`` again checking every step at once; it raises the precise error."""
        try:
            method(self, *args, **kwargs)
        except NonFiniteError as error:
            raise error from cause
        raise NonFiniteError("an inner loss or the adapted weights were not finite, but a rerun with a check at "
                             "every step found nothing (a random inner loop?); lower the inner learning rate or "
                             "clip gradients") from cause

    def _check_finite_losses(self, losses: Tensor, step: int) -> None:
        if losses.is_meta or not self.check_finite:  # shapes only (torch's meta device): no values to check
            return
        if not torch.isfinite(losses.detach()).all():
            bad = torch.nonzero(~torch.isfinite(losses.detach())).flatten().tolist()
            raise NonFiniteError(
                f"inner loss is not finite for task(s) {bad} at inner step {step} "
                f"(values {losses.detach()[bad].tolist()}); lower the inner learning rate, clip "
                "gradients or check the support data"
            )

    def _check_finite_gradients(self, grads: list[Tensor | None], step: int) -> None:
        if not self.check_finite or all_finite(grads):
            return
        for k, g in enumerate(grads):
            if g is not None and not torch.isfinite(g.detach()).all():
                tasks = torch.nonzero(~torch.isfinite(g.detach()).flatten(1).all(1)).flatten().tolist()
                raise NonFiniteError(
                    f"inner gradient of {self.patched.names[self.positions[k]]} is not finite for task(s) "
                    f"{tasks} at inner step {step}; lower the inner learning rate or clip gradients"
                )

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
    @_checks_at_exit
    def adapt(self, support_x: Tensor, support_y: Tensor) -> Adapted:
        """Run the K inner steps; the result is differentiable as the mode prescribes."""
        self._check_tasks(support_x, support_y)
        info = self._info()
        carry = self.mode.adapt(self, self.initial_carry(support_x.shape[0]), support_x, support_y, info)
        self.last_info = info
        return Adapted(carry.params, list(self.adapted_mask), carry.buffers, info)

    def _info(self) -> dict[str, Any]:
        """What ``last_info`` reports for every mode; the mode adds its own entries."""
        return {"mode": self.mode.name, "steps": self.steps, "vectorize": self.vectorize,
                "vectorize_reason": self.vectorize_reason, "backend": self.backend,
                "backend_reason": self.backend_reason}

    def query_losses(self, adapted: Adapted, query_x: Tensor, query_y: Tensor, loss_fn: LossFn | None = None) -> Tensor:
        """Per-task query losses (T,) at the adapted weights."""
        losses, _ = self.task_losses(adapted.params, adapted.buffers, query_x, query_y, "outer", loss_fn)
        return losses

    def predict(self, adapted: Adapted, x: Tensor) -> Tensor:
        """Outputs of the adapted model for every task (leading task dimension)."""
        tasks = next((p.shape[0] for p, a in zip(adapted.params, adapted.adapted) if a), None)
        if not isinstance(x, Tensor) or x.dim() < 2 or (tasks is not None and x.shape[0] != tasks):
            raise ValueError(f"predict: inputs need the adapted tasks' leading dimension ({tasks}) and an example "
                             f"dimension, got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        no_example_dimension(x, "predict")
        self.patched.refuse_checkpointing_switched_on("InnerLoop.predict")
        outputs, _ = self.patched.forward_tasks(
            adapted.params, [b.clone() for b in adapted.buffers], x, "outer", self.vectorize, self.adapted_mask
        )
        return outputs

    @_checks_at_exit
    def meta_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
        loss_fn: LossFn | None = None,
    ) -> Tensor:
        """Mean query loss over the tasks after adaptation; ``.backward()`` gives the meta-gradient."""
        self._check_tasks(support_x, support_y, query_x, query_y)
        info = self._info()
        loss = self.mode.meta_loss(self, support_x, support_y, query_x, query_y, loss_fn, info)
        self.last_info = info
        return loss

    @_checks_at_exit
    def adapt_without_graph(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Adapted:
        """``steps`` inner steps (default K) with no graph: for evaluation and for Reptile."""
        self._check_tasks(support_x, support_y)
        carry = self.run(self.initial_carry(support_x.shape[0]), self.steps if steps is None else steps,
                         support_x, support_y, "none")
        return Adapted(carry.params, list(self.adapted_mask), carry.buffers, {"mode": "none"})

    @_checks_at_exit
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
            clone.theta = [_adaptable(t) if model.requires_grad else t
                           for t, model in zip(theta, self.model_parameters)]
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


def _check_autocast(autocast: torch.dtype | None, theta: Sequence[Tensor]) -> torch.dtype | None:
    if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16 (the dtype torch.autocast computes "
                         f"in), got {autocast!r}")
    if autocast is not None and theta and all(p.dtype == torch.float64 for p in theta):
        raise ValueError(f"autocast={autocast}: the model's weights are float64, and torch.autocast lowers float32 "
                         "operations only, so nothing would run in mixed precision; convert the model with "
                         "model.float() for mixed precision, or drop autocast")
    return autocast


def _check_proximal(proximal: float | Tensor | None) -> None:
    """iMAML's λ: None, or a finite number or scalar tensor >= 0 (a negative λ rewards moving away from θ)."""
    if proximal is None:
        return
    if isinstance(proximal, Tensor):
        if proximal.numel() != 1:
            raise ValueError(f"proximal must be a number or a scalar tensor, got shape {tuple(proximal.shape)}")
        if proximal.device.type == "meta":
            return
        value = float(proximal.detach())
    elif isinstance(proximal, (int, float)) and not isinstance(proximal, bool):
        value = float(proximal)
    else:
        raise TypeError(f"proximal must be None, a number or a scalar tensor, got {proximal!r}")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"proximal (iMAML's λ in λ/2·||φ − θ||²) must be a finite number >= 0, got {value!r}")
