r"""Second-order inner steps of lowered MLPs with their backward written out.

The second-order meta-gradient through an inner SGD step
``φ = θ − α ⊙ (s ∇ℓ(θ) + λθ)`` (``s = −1`` when maximising, ``λ`` the weight decay) is

.. math::

    \frac{\partial L}{\partial\theta} = v - s\,H\,(\alpha\odot v) - \lambda\,\alpha\odot v,
    \qquad \frac{\partial L}{\partial\alpha} = -\,(s\nabla\ell(\theta) + \lambda\theta)\odot v,
    \qquad v = \frac{\partial L}{\partial\phi},

one Hessian-vector product of the inner loss per step (Finn et al., 2017). Autograd gets
it by differentiating the graph of the inner gradient; here, for the MLPs whose inner
gradient :mod:`diffopt.unroll.lowered_backprop` writes out, the product itself is
written out with Pearlmutter's R-operator (Pearlmutter, 1994,
"Fast exact multiplication by the Hessian"): ``R{f} = d/dε f(θ + εu)|₀``, applied to the
forward pass and then to backpropagation. For a layer ``z = a Wᵀ + b`` followed by
``h = σ(z)``, with ``δ`` the error at ``z`` and ``e = δ_next W_next`` the error at ``h``,

.. math::

    R\{z\} &= R\{a\} W^\top + a U_W^\top + U_b, \qquad R\{h\} = \sigma'(z) \odot R\{z\}, \\
    R\{\delta\} &= \sigma'(z) \odot R\{e\} + e \odot \sigma''(z) \odot R\{z\},
    \qquad R\{e\} = R\{\delta_{next}\} W_{next} + \delta_{next} U_{W_{next}}, \\
    (Hu)_W &= R\{\delta\}^\top a + \delta^\top R\{a\}, \qquad (Hu)_b = \textstyle\sum_n R\{\delta\}_n,

and at the output ``R{δ_L} = 2 R{z_L} / n`` (mean squared error over ``n`` elements) or
``share · p ⊙ (R{z_L} − ⟨p, R{z_L}⟩)`` (cross-entropy, ``p`` the softmax, ``share`` one over
the counted targets). ``σ''`` of every activation is the third entry of
:data:`diffopt.unroll.lowered_backprop.DERIVATIVES`.

:class:`SGDStep` is the step as a ``torch.autograd.Function``: the forward computes the
update without recording a graph and keeps the forward and backpropagation's values; the
backward is the formula above. Where a graph of the backward is asked for
(``create_graph=True``: higher derivatives, forward mode's double-VJP), the forward and
backpropagation are recorded again with a graph and the same formula runs on them, so it is a
differentiable function of the step's inputs and every order stays exact. :class:`TaskLosses`
does the same for the query losses: their gradients are computed with them, and the backward
only weighs each task's gradient.

Values equal autograd's up to rounding (``tests/test_unroll_lowered_hessian.py``: Hessian-vector
products ≤ 1e-12 and meta-gradients ≤ 1e-10 in float64, under hypothesis); the speed is in
``benchmarks/RESULTS.md`` section 10.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..optim._hyper import is_plain_number
from ..optim.optimizer import DifferentiableOptimizer
from ..optim.sgd import SGDRule, add_scaled
from ..optim.transforms import GradientTransforms
from .lowered_backprop import ExplicitBackprop, Saved, _accumulate, _is_mse, counted_share, times
from .lowered import per_task_loss

#: The key of the inputs' entry in :meth:`ExplicitHessian.hessian_vector`'s result.
INPUT = -1

__all__ = ["INPUT", "ExplicitHessian", "LossContext", "SGDStep", "StepContext", "StepHyperparameters", "Tape", "TaskLosses",
           "forward_ad_active", "sgd_hyperparameters", "sgd_values", "written_out_task_losses"]


@dataclass
class Tape:
    """What one forward and backpropagation leave for the Hessian-vector product: per step of the
    network what backpropagation reads (:data:`~diffopt.unroll.lowered_backprop.Saved`) and, from
    the first Linear on, the error flowing into the step from above (``δ`` at a Linear's output,
    ``e`` at an activation's output); the network's outputs and the targets."""

    values: list[Saved]
    errors: list[Tensor | None]
    outputs: Tensor
    targets: Tensor

    def tensors(self) -> list[Tensor]:
        """Flattened for ``save_for_backward``; :meth:`from_tensors` undoes it."""
        flat: list[Tensor] = []
        for value in self.values:
            flat += list(value) if isinstance(value, tuple) else [value]
        return flat + [e for e in self.errors if e is not None] + [self.outputs, self.targets]

    @classmethod
    def from_tensors(cls, flat: Sequence[Tensor], kinds: Sequence[str], first_linear: int) -> Tape:
        values: list[Saved] = []
        at = 0
        for kind in kinds:
            values.append((flat[at], flat[at + 1]) if kind == "activation" else flat[at])
            at += 2 if kind == "activation" else 1
        errors: list[Tensor | None] = [None] * first_linear + list(flat[at:at + len(kinds) - first_linear])
        return cls(values, errors, flat[-2], flat[-1])


class ExplicitHessian:
    """Inner losses, gradients and Hessian-vector products of a lowered MLP, all written out
    (module docstring), on an :class:`~diffopt.unroll.lowered_backprop.ExplicitBackprop`."""

    def __init__(self, backprop: ExplicitBackprop) -> None:
        self.backprop = backprop
        self.kinds = [kind for kind, _, _ in backprop.steps]
        self.first_linear = self.kinds.index("linear")
        lowered = backprop.lowered
        self.linear_positions = {j for kind, k, _ in backprop.steps if kind == "linear"
                                 for j in (lowered.weights[k], lowered.biases[k]) if j is not None}

    @classmethod
    def build(cls, backprop: ExplicitBackprop | None) -> ExplicitHessian | None:
        return None if backprop is None else cls(backprop)

    def _weight_and_bias(self, k: int) -> tuple[int, int | None]:
        lowered = self.backprop.lowered
        return lowered.weights[k], lowered.biases[k]

    def record(self, params: Sequence[Tensor], x: Tensor, y: Tensor,
               loss_fn: Callable[..., Tensor]) -> tuple[Tensor, dict[int, Tensor], Tape] | None:
        """Per-task losses, ``{position: per-task gradient}`` of every Linear's weight and bias
        (task-batched even for a weight the tasks share) and the :class:`Tape`; ``None`` for data
        whose shapes are not written out. Records a graph exactly when grad mode is on."""
        backprop = self.backprop
        forward = backprop.forward(params, x)
        if forward is None:
            return None
        outputs, values = forward
        with torch.no_grad():
            losses = per_task_loss(loss_fn, outputs, y)
        if losses is None:
            return None
        errors: list[Tensor | None] = [None] * len(values)
        grads = backprop.backward(params, backprop.output_error(loss_fn, outputs, y), values,
                                  self.linear_positions, errors)
        return losses, grads, Tape(values, errors, outputs, y)

    def hessian_vector(self, params: Sequence[Tensor], tape: Tape, direction: dict[int, Tensor],
                       loss_fn: Callable[..., Tensor], inputs: bool = False) -> dict[int, Tensor]:
        """``{position: (H u)}`` per task, for the direction ``u`` given at some positions
        (task-batched; zero elsewhere): the R-operator on the forward pass, then on
        backpropagation (module docstring). With ``inputs=True`` (a network that starts with a
        Linear) also ``INPUT: ∂⟨∇_θ ℓ, u⟩/∂x = R{∂ℓ/∂x}``, the mixed derivative that reaches
        inputs which require grad (ANIL's features), by one more step of the R-backpropagation."""
        steps = self.backprop.steps
        incoming: list[Tensor | None] = [None] * len(steps)  # R of each step's input (None: zero)
        r: Tensor | None = None
        for i, (kind, k, activation) in enumerate(steps):
            incoming[i] = r
            if kind == "activation":
                if r is not None:
                    z, h = tape.values[i]  # type: ignore[misc]
                    r = activation[1](r, z, h)  # type: ignore[index]
                continue
            weight_at, bias_at = self._weight_and_bias(k)
            u_weight, u_bias = direction.get(weight_at), None if bias_at is None else direction.get(bias_at)
            out = None if u_bias is None else u_bias.unsqueeze(1)
            if u_weight is not None:
                out = _add_product(out, tape.values[i], u_weight.transpose(-1, -2))  # type: ignore[arg-type]
            if r is not None:
                out = _add_product(out, r, params[weight_at].transpose(-1, -2))
            r = out
        product: dict[int, Tensor] = {}
        if r is None:
            return product
        r_delta: Tensor | None = self._output_error_r(loss_fn, tape, r)
        for i in range(len(steps) - 1, self.first_linear - 1, -1):
            kind, k, activation = steps[i]
            error = tape.errors[i]
            if kind == "activation":
                z, h = tape.values[i]  # type: ignore[misc]
                new = None if r_delta is None else activation[1](r_delta, z, h)  # type: ignore[index]
                curvature, r_z = activation[2], incoming[i]  # type: ignore[index]
                if curvature is not None and r_z is not None:
                    term = error * curvature(z, h) * r_z  # type: ignore[operator]
                    new = term if new is None else new + term
                r_delta = new
                continue
            weight_at, bias_at = self._weight_and_bias(k)
            product_w = None if r_delta is None else _add_product(None, r_delta.transpose(1, 2), tape.values[i])  # type: ignore[arg-type]
            if incoming[i] is not None:
                product_w = _add_product(product_w, error.transpose(1, 2), incoming[i])  # type: ignore[union-attr,arg-type]
            if product_w is not None:
                _accumulate(product, weight_at, product_w)
            if bias_at is not None and r_delta is not None:
                _accumulate(product, bias_at, r_delta.sum(1))
            if i > self.first_linear or inputs:
                u_weight = direction.get(weight_at)
                new = None if u_weight is None else times(error, u_weight)  # type: ignore[arg-type]
                r_delta = new if r_delta is None else _add_product(new, r_delta, params[weight_at])
        if inputs and r_delta is not None:
            product[INPUT] = r_delta
        return product

    def input_gradient(self, params: Sequence[Tensor], tape: Tape, x: Tensor) -> Tensor:
        """``∂ℓ_t/∂x`` per task, in ``x``'s shape, for a network that starts with a Linear: the
        error at its output times its weight."""
        weight_at, _ = self._weight_and_bias(self.backprop.steps[0][1])
        return times(tape.errors[0], params[weight_at]).reshape(x.shape)  # type: ignore[arg-type]

    @property
    def differentiates_inputs(self) -> bool:
        """Whether gradients reaching the inputs are written out: the network starts with a Linear."""
        return self.first_linear == 0

    @staticmethod
    def _output_error_r(loss_fn: Callable[..., Tensor], tape: Tape, r: Tensor) -> Tensor:
        """``R{∂(Σ_t ℓ_t)/∂ outputs}`` given ``R{outputs}``: the loss's Hessian times ``r``."""
        if _is_mse(loss_fn):
            return r * (2.0 / tape.outputs[0].numel())
        p = torch.softmax(tape.outputs, -1)
        _, share = counted_share(loss_fn, tape.targets, r.dtype)
        return share * p * (r - (p * r).sum(-1, keepdim=True))


def _add_product(total: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """``total + a b`` per task (``a b`` for ``total=None``): one ``baddbmm`` for task-batched
    operands; ``b`` may be shared by the tasks (2-D)."""
    if b.dim() == 2:
        return a @ b if total is None else total + a @ b
    if total is None:
        return torch.bmm(a, b)
    if total.shape[1] != a.shape[1]:  # a bias row (T, 1, out) broadcast over the examples
        total = total.expand(a.shape[0], a.shape[1], b.shape[2])
    return torch.baddbmm(total, a, b)


@dataclass
class StepHyperparameters:
    """SGD's resolved hyperparameters for one adapted tensor at one step."""

    lr: float | Tensor
    weight_decay: float
    sign: float  # −1 when maximising


def sgd_hyperparameters(optimizer: DifferentiableOptimizer, count: int,
                        step: int) -> list[StepHyperparameters] | None:
    """Per adapted tensor (the optimizer's order), the hyperparameters of a plain SGD step at
    ``step``, or ``None`` where the step is not one :class:`SGDStep` writes out: another rule,
    a subclass that changes how the update or its hyperparameters are computed, momentum or a
    weight decay that is not a plain number, gradient clipping or a ``grad_transform``."""
    kind = type(optimizer)
    if (type(optimizer.rule) is not SGDRule or not (isinstance(optimizer.transforms, GradientTransforms) and optimizer.transforms.is_identity)
            or kind.update is not DifferentiableOptimizer.update
            or kind.tensor_hyperparameters is not DifferentiableOptimizer.tensor_hyperparameters
            or kind._hp is not DifferentiableOptimizer._hp):
        return None
    found: list[StepHyperparameters | None] = [None] * count
    for group in optimizer.param_groups:
        shared = optimizer._shared_hp(group, step)
        for position, i in enumerate(group["params"]):
            hp = shared if shared is not None else optimizer._hp(group, position, step)
            if not (is_plain_number(hp["momentum"]) and hp["momentum"] == 0
                    and is_plain_number(hp["weight_decay"])):
                return None
            found[i] = StepHyperparameters(hp["lr"], float(hp["weight_decay"]), -1.0 if hp["maximize"] else 1.0)
    return None if any(h is None for h in found) else found  # type: ignore[return-value]


def sgd_values(params: Sequence[Tensor], grads: Sequence[Tensor], hyper: Sequence[StepHyperparameters]) -> list[Tensor]:
    """The step's new values, with torch.optim.SGD's arithmetic: ``d = ±g (+ λθ)``, ``θ − α d``."""
    new = []
    for param, grad, h in zip(params, grads, hyper):
        d = grad if h.sign == 1 else -grad
        if h.weight_decay:
            d = torch.add(d, param, alpha=h.weight_decay)
        new.append(add_scaled(param, d, -h.lr))
    return new


def _common_number_lr(hyper: Sequence[StepHyperparameters]) -> float | None:
    """``s α`` when every adapted tensor's lr is the same plain number ``α`` with the same sign
    ``s``; ``None`` when any is a tensor or they differ."""
    first = hyper[0]
    if any(isinstance(h.lr, Tensor) or h.lr != first.lr or h.sign != first.sign for h in hyper):
        return None
    return first.sign * first.lr  # type: ignore[operator]


@dataclass(eq=False)
class StepContext:
    """What :class:`SGDStep` needs besides its tensor inputs: the written-out Hessian, the
    data, the adapted positions (the optimizer's order) with their hyperparameters, and, until
    the forward saves them, the step's values computed without a graph (``pending``)."""

    hessian: ExplicitHessian
    loss_fn: Callable[..., Tensor]
    x: Tensor
    y: Tensor
    positions: list[int]
    hyper: list[StepHyperparameters]
    param_count: int
    lr_inputs: list[Tensor]  # the distinct lr tensors that require grad
    pending: tuple[list[Tensor], Tape, list[Tensor]] | None  # (gradients, tape, new values)
    with_x: bool = False  # x requires grad and is the last input

    def backward(self, inputs: Sequence[Tensor], grads: Sequence[Tensor], tape: Tape,
                 vectors: Sequence[Tensor], needs: Sequence[bool]) -> list[Tensor | None]:
        """The written-out vector-Jacobian product of the step (module docstring). ``vectors`` are
        ``∂L/∂φ`` per adapted tensor (autograd materialises unused ones as zeros)."""
        params = list(inputs[:self.param_count])
        # With u = s α ⊙ v: ∂L/∂θ = v − λ α ⊙ v − H u for an adapted tensor, − H u for a shared one.
        # One plain-number α and sign s for every tensor (the usual case): H u = s α H v, scaled at the end.
        common = _common_number_lr(self.hyper)
        if common is not None:
            direction = dict(zip(self.positions, vectors))
        else:
            direction = {j: v * hyper.lr if hyper.sign == 1 else -(v * hyper.lr)
                         for j, hyper, v in zip(self.positions, self.hyper, vectors)}
        scale = 1.0 if common is None else common
        product = self.hessian.hessian_vector(params, tape, direction, self.loss_fn, inputs=self.with_x)
        adapted = {j: k for k, j in enumerate(self.positions)}
        out: list[Tensor | None] = [None] * len(inputs)
        if self.with_x and needs[-1] and INPUT in product:  # x enters every step through ∇ℓ(θ, x)
            out[-1] = (product[INPUT] * -scale).reshape(inputs[-1].shape)
        for j, param in enumerate(params):
            if not needs[j]:
                continue
            hu = product.get(j)
            if hu is not None and hu.dim() > param.dim():  # shared by the tasks: every task's dependence
                hu = hu.sum(0)
            if j not in adapted:
                out[j] = None if hu is None else hu * -scale
                continue
            hyper, v = self.hyper[adapted[j]], vectors[adapted[j]]
            if hyper.weight_decay:
                v = v - hyper.weight_decay * (v * hyper.lr)
            out[j] = v if hu is None else torch.add(v, hu, alpha=-scale)
        for n, lr in enumerate(self.lr_inputs):
            if needs[self.param_count + n]:
                terms = [(-(hyper.sign * g + hyper.weight_decay * params[j]) * v).sum_to_size(lr.shape)
                         for j, hyper, v, g in zip(self.positions, self.hyper, vectors, grads) if hyper.lr is lr]
                out[self.param_count + n] = torch.stack(terms).sum(0) if len(terms) > 1 else terms[0]
        return out

    def backward_with_graph(self, inputs: Sequence[Tensor], vectors: Sequence[Tensor],
                            needs: Sequence[bool]) -> list[Tensor | None]:
        """:meth:`backward` as a differentiable function of the inputs, for ``create_graph=True``
        (higher derivatives, forward mode's double-VJP): the forward and backpropagation recorded
        again with a graph, so that every tensor the formula reads depends on the inputs."""
        x = inputs[-1] if self.with_x else self.x
        with torch.enable_grad():
            recorded = _recorded(self.hessian.record(inputs[:self.param_count], x, self.y, self.loss_fn))
            _, by_position, tape = recorded
            return self.backward(inputs, [by_position[j] for j in self.positions], tape, vectors, needs)


def _recorded(result: Any) -> Any:
    """A recomputation in a backward, of data whose forward was written out."""
    if result is None:
        raise RuntimeError("diffopt.unroll.lowered_hessian: recomputing a written-out step for create_graph=True "
                           "found data it cannot write out; the step's inputs changed shape after its forward")
    return result


class SGDStep(torch.autograd.Function):
    """``φ = θ − α ⊙ (s ∇ℓ(θ) + λθ)`` for every adapted tensor, with the backward written out
    (module docstring). ``apply(context, *params, *context.lr_inputs[, x])`` (``x`` when
    ``context.with_x``) returns the adapted
    tensors' new values, which the caller computed without a graph (``context.pending``). The
    forward saves the inner gradients and the tape with the inputs (``save_for_backward``, so
    that checkpointing frees and recomputes them like any saved tensor)."""

    @staticmethod
    def forward(ctx: Any, context: StepContext, *inputs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        """Return the precomputed new values; save the inputs, inner gradients and tape."""
        grads, tape, new = context.pending  # type: ignore[misc]
        context.pending = None
        ctx.context = context
        # (the inner gradients only for the learning rates' derivative)
        ctx.save_for_backward(*inputs, *(grads if context.lr_inputs else []), *tape.tensors())
        return tuple(new)

    @staticmethod
    def backward(ctx: Any, *vectors: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """The written-out vector-Jacobian product (:meth:`StepContext.backward`)."""
        context: StepContext = ctx.context
        saved = ctx.saved_tensors
        count = context.param_count + len(context.lr_inputs) + int(context.with_x)
        adapted = len(context.positions) if context.lr_inputs else 0
        inputs, grads, rest = saved[:count], saved[count:count + adapted], saved[count + adapted:]
        needs = ctx.needs_input_grad[1:]
        if torch.is_grad_enabled():  # a graph of the backward is wanted (create_graph=True)
            return (None, *context.backward_with_graph(inputs, vectors, needs))
        hessian = context.hessian
        tape = Tape.from_tensors(rest, hessian.kinds, hessian.first_linear)
        return (None, *context.backward(inputs, grads, tape, vectors, needs))


@dataclass(eq=False)
class LossContext:
    """What :class:`TaskLosses` needs besides its tensor inputs: the written-out Hessian (its
    backpropagation), the data, the positions that require grad, whether ``x`` does, and, until the
    forward saves them, the per-task gradients computed without a graph."""

    hessian: ExplicitHessian
    loss_fn: Callable[..., Tensor]
    x: Tensor
    y: Tensor
    wanted: list[int]  # the positions that require grad
    with_x: bool  # x requires grad and is the last input
    pending: tuple[Tensor, dict[int, Tensor], Tensor | None] | None  # (losses, gradients, input gradient)

    def gradients(self, params: Sequence[Tensor], x: Tensor) -> tuple[Tensor, dict[int, Tensor], Tensor | None] | None:
        """Per-task losses, ``{position: per-task gradient}`` and, when ``with_x``, ``∂ℓ_t/∂x``;
        a graph exactly when grad mode is on; ``None`` for data that is not written out."""
        if not self.with_x:
            result = self.hessian.backprop.loss_and_gradients(params, x, self.y, self.loss_fn, self.wanted)
            return None if result is None else (result[0], result[1], None)
        recorded = self.hessian.record(params, x, self.y, self.loss_fn)
        if recorded is None:
            return None
        losses, grads, tape = recorded
        return losses, grads, self.hessian.input_gradient(params, tape, x)

    def weigh(self, params: Sequence[Tensor], gradients: dict[int, Tensor], input_gradient: Tensor | None,
              weights: Tensor, needs: Sequence[bool]) -> list[Tensor | None]:
        """``∂(Σ_t w_t ℓ_t)/∂θ``: each task's gradient times its weight, summed over the tasks for
        a weight they share; and ``∂/∂x`` the same way when ``with_x``."""
        def weighed(g: Tensor) -> Tensor:
            return g * weights.view(-1, *([1] * (g.dim() - 1)))

        out: list[Tensor | None] = [None] * (len(params) + int(self.with_x))
        for j in self.wanted:
            if needs[j]:
                weighted = weighed(gradients[j])
                out[j] = weighted.sum(0) if weighted.dim() > params[j].dim() else weighted
        if self.with_x and needs[-1]:
            out[-1] = weighed(input_gradient)  # type: ignore[arg-type]
        return out


class TaskLosses(torch.autograd.Function):
    """Per-task losses ``(T,)`` of a lowered MLP whose backward is the written-out inner
    gradient (:mod:`diffopt.unroll.lowered_backprop`), computed with the losses in the forward:
    the backward only weighs each task's gradient by the incoming ``∂L/∂ℓ_t``, so the query
    loss of a meta-step records no graph of its own. Under ``create_graph=True`` the gradients
    are recorded again with a graph (every order stays exact).
    ``apply(context, *params[, x])`` (``x`` when ``context.with_x``); ``context`` is a :class:`LossContext`."""

    @staticmethod
    def forward(ctx: Any, context: LossContext, *inputs: Tensor) -> Tensor:  # type: ignore[override]
        """Return the precomputed per-task losses; save the inputs and the per-task gradients."""
        losses, gradients, input_gradient = context.pending  # type: ignore[misc]
        context.pending = None
        ctx.context = context
        extra = [input_gradient] if context.with_x else []
        ctx.save_for_backward(*inputs, *(gradients[j] for j in context.wanted), *extra)
        return losses

    @staticmethod
    def backward(ctx: Any, weights: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """Each task's gradient weighed by ``∂L/∂ℓ_t`` (:meth:`LossContext.weigh`)."""
        context: LossContext = ctx.context
        saved = ctx.saved_tensors
        count = len(saved) - len(context.wanted) - int(context.with_x)
        inputs = saved[:count]
        params = inputs[:count - int(context.with_x)]
        gradients = dict(zip(context.wanted, saved[count:count + len(context.wanted)]))
        input_gradient = saved[-1] if context.with_x else None
        if torch.is_grad_enabled():  # a graph of the backward is wanted (create_graph=True)
            with torch.enable_grad():
                x = inputs[-1] if context.with_x else context.x
                _, gradients, input_gradient = _recorded(context.gradients(params, x))
        return (None, *context.weigh(params, gradients, input_gradient, weights, ctx.needs_input_grad[1:]))


def forward_ad_active() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open: dual numbers need a ``jvp`` that
    :class:`SGDStep` and :class:`TaskLosses` do not have, so the engine uses autograd there."""
    return torch.autograd.forward_ad._current_level >= 0


def written_out_task_losses(hessian: ExplicitHessian, params: Sequence[Tensor], x: Tensor, y: Tensor,
                            loss_fn: Callable[..., Tensor]) -> Tensor | None:
    """Per-task losses through :class:`TaskLosses`, or ``None`` where the data's shapes are not
    written out, no weight requires grad, the targets require grad, the inputs do and the network
    does not start with a Linear, or forward-mode AD is running."""
    wanted = [j for j, p in enumerate(params) if p.requires_grad]
    with_x = x.requires_grad
    if (not wanted or y.requires_grad or (with_x and not hessian.differentiates_inputs)
            or forward_ad_active()):
        return None
    context = LossContext(hessian, loss_fn, x, y, wanted, with_x, None)
    with torch.no_grad():
        result = context.gradients(params, x)
    if result is None or any(j not in result[1] for j in wanted):
        return None
    context.pending = result
    return TaskLosses.apply(context, *params, *([x] if with_x else []))
