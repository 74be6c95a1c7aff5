r"""Inner gradients of lowered MLPs written out: backpropagation as task-batched operations.

For a ``Sequential`` of ``Linear`` layers and activations with a known derivative
(:data:`DERIVATIVES`: ReLU, LeakyReLU, Tanh, Sigmoid, SiLU, GELU, ELU, Softplus) under
the mean squared error or cross-entropy, the inner gradient of every task is computed
by backpropagation written as ordinary tensor operations (Rumelhart, Hinton & Williams,
1986) instead of ``torch.autograd.grad``.
With the activations ``a_l`` entering layer ``l`` (``z_l = a_l W_lᵀ + b_l``) and the
error ``δ_L = ∂ℓ/∂z_L`` of the output,

.. math::

    \frac{\partial \ell}{\partial W_l} = \delta_l^\top a_l, \qquad
    \frac{\partial \ell}{\partial b_l} = \textstyle\sum_n \delta_{l,n}, \qquad
    \delta_{l-1} = (\delta_l W_l) \odot \sigma'(z_{l-1}),

one ``bmm`` per product for all tasks at once, ``⊙ σ'`` torch's own derivative kernel
of the activation (the aten ``*_backward`` operation autograd itself calls), and
``∂ℓ/∂z_L = 2 (z_L − y) / n`` for the per-task mean squared error over ``n``
elements and ``(softmax(z_L) − onehot(y)) / m`` for the per-task mean
cross-entropy over ``m`` counted targets.

Why: autograd's ``grad(create_graph=True)`` records the backward as a second graph
that the meta-gradient then differentiates (a double backward); written out, the
same operations are one forward graph, which the meta-gradient differentiates
once. Second order needs nothing more (every operation here has a derivative in
torch, the activations' ``*_backward`` kernels included); first order computes them
without a graph at all. The values equal
autograd's up to rounding (``tests/test_unroll_lowered_backprop.py``: ≤ 1e-12 in
float64 under hypothesis); the speed is in ``benchmarks/RESULTS.md`` section 10.

Anything else (other activations, convolutions, BatchNorm, other losses, inputs
with more than one example dimension) returns ``None`` and the engine uses
autograd on the lowered forward as before.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lowered import LoweredModel, _linear, per_task_loss

__all__ = ["DERIVATIVES", "ExplicitBackprop", "counted_share", "times"]

# Activation: (σ, backward, σ''). ``backward(delta, z, h) = delta ⊙ σ'(z)`` with ``h = σ(z)`` is torch's
# own derivative kernel, the aten ``*_backward`` operation autograd calls for that activation: the same
# numbers as autograd's first-order gradient, and autograd differentiates it again (derivatives.yaml
# gives each its own derivative) for the second order. SiLU's is written out: aten's silu_backward has
# no derivative in torch 2.13. ``σ''(z, h)`` is for the written-out Hessian-vector products of
# :mod:`diffopt.unroll.lowered_hessian`; None for a piecewise-linear activation (σ'' = 0 almost
# everywhere, as autograd has it).
Curvature = Callable[[Tensor, Tensor], Tensor] | None
Activation = tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor, Tensor], Tensor], Curvature]
Saved = Tensor | tuple[Tensor, Tensor]  # per step: a Linear's input, or an activation's (z, h)
_aten = torch.ops.aten
_SQRT_2PI = math.sqrt(2 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def _relu() -> Activation:
    return torch.relu, lambda delta, z, h: _aten.threshold_backward(delta, z, 0), None


def _leaky_relu(layer: nn.LeakyReLU) -> Activation:
    slope = layer.negative_slope
    return ((lambda z: F.leaky_relu(z, slope)), (lambda delta, z, h: _aten.leaky_relu_backward(delta, z, slope, False)),
            None)


def _tanh() -> Activation:  # σ' = 1 − h², σ'' = −2h (1 − h²)
    return torch.tanh, lambda delta, z, h: _aten.tanh_backward(delta, h), lambda z, h: -2 * h * (1 - h * h)


def _sigmoid() -> Activation:  # σ' = h (1 − h), σ'' = h (1 − h)(1 − 2h)
    return (torch.sigmoid, lambda delta, z, h: _aten.sigmoid_backward(delta, h),
            lambda z, h: h * (1 - h) * (1 - 2 * h))


def _silu() -> Activation:  # s = sigmoid(z): σ' = s (1 + z (1 − s)), σ'' = s (1 − s)(2 + z (1 − 2s))
    def backward(delta: Tensor, z: Tensor, h: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        return delta * (s * (1 + z * (1 - s)))

    def curvature(z: Tensor, h: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s))
    return F.silu, backward, curvature


def _gelu(layer: nn.GELU) -> Activation:
    approximate = layer.approximate

    def curvature(z: Tensor, h: Tensor) -> Tensor:
        if approximate == "none":  # σ' = Φ(z) + z φ(z), σ'' = φ(z) (2 − z²)
            return torch.exp(-0.5 * z * z) * (2 - z * z) / _SQRT_2PI
        # ½ z (1 + tanh u), u = k (z + c z³): σ'' = (1 − t²) (u' + ½ z (u'' − 2 t u'²))
        c = 0.044715
        t = torch.tanh(_SQRT_2_OVER_PI * (z + c * z ** 3))
        du = _SQRT_2_OVER_PI * (1 + 3 * c * z * z)
        return (1 - t * t) * (du + 0.5 * z * (_SQRT_2_OVER_PI * 6 * c * z - 2 * t * du * du))
    return ((lambda z: F.gelu(z, approximate=approximate)),
            (lambda delta, z, h: _aten.gelu_backward(delta, z, approximate=approximate)), curvature)


def _elu(layer: nn.ELU) -> Activation:  # σ' = 1 for z > 0, α eᶻ otherwise (also at 0, as torch); σ'' = α eᶻ for z ≤ 0
    alpha = layer.alpha
    return ((lambda z: F.elu(z, alpha)), (lambda delta, z, h: _aten.elu_backward(delta, alpha, 1, 1, False, z)),
            lambda z, h: torch.where(z <= 0, alpha * torch.exp(z), 0.0))


def _softplus(layer: nn.Softplus) -> Activation:  # s = sigmoid(βz): σ' = s, σ'' = β s (1 − s); 1 and 0 where βz > threshold
    beta, threshold = layer.beta, layer.threshold

    def curvature(z: Tensor, h: Tensor) -> Tensor:
        s = torch.sigmoid(beta * z)
        return torch.where(beta * z > threshold, 0.0, beta * s * (1 - s))
    return ((lambda z: F.softplus(z, beta, threshold)),
            (lambda delta, z, h: _aten.softplus_backward(delta, z, beta, threshold)), curvature)


def _identity() -> Activation:
    return (lambda z: z), (lambda delta, z, h: delta), None


DERIVATIVES: dict[type, Callable[[nn.Module], Activation]] = {
    nn.ReLU: lambda layer: _relu(),
    nn.LeakyReLU: _leaky_relu,
    nn.Tanh: lambda layer: _tanh(),
    nn.Sigmoid: lambda layer: _sigmoid(),
    nn.SiLU: lambda layer: _silu(),
    nn.GELU: _gelu,
    nn.ELU: _elu,
    nn.Softplus: _softplus,
    nn.Identity: lambda layer: _identity(),
    nn.Dropout: lambda layer: _identity(),  # lowered only with p = 0
}


def _is_mse(loss_fn: Callable[..., Tensor]) -> bool:
    return loss_fn is F.mse_loss or (type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean")


def _is_cross_entropy(loss_fn: Callable[..., Tensor]) -> bool:
    return loss_fn is F.cross_entropy or (type(loss_fn) is nn.CrossEntropyLoss and loss_fn.reduction == "mean"
                                          and loss_fn.weight is None and loss_fn.label_smoothing == 0.0)


class ExplicitBackprop:
    """The inner loss and gradients of a lowered MLP, backpropagation written out (module docstring).

    Built by :meth:`build` from a :class:`~diffopt.unroll.lowered.LoweredModel`
    whose layers are ``Linear``, the activations of :data:`DERIVATIVES` and a
    leading ``Flatten``; ``None`` otherwise.
    """

    def __init__(self, lowered: LoweredModel, steps: list[tuple[str, int, Activation | None]], flatten: bool) -> None:
        self.lowered = lowered
        self.steps = steps  # (kind, layer index, activation) in forward order
        self.flatten = flatten

    @classmethod
    def build(cls, lowered: LoweredModel | None) -> ExplicitBackprop | None:
        if lowered is None:
            return None
        steps: list[tuple[str, int, Activation | None]] = []
        flatten = False
        for k, (layer, kind) in enumerate(zip(lowered.layers, lowered.kinds)):
            if kind == "flatten" and not steps and not flatten:
                flatten = True
            elif kind == "linear":
                steps.append(("linear", k, None))
            elif kind == "elementwise" and type(layer) in DERIVATIVES:
                steps.append(("activation", k, DERIVATIVES[type(layer)](layer)))
            else:
                return None
        if not any(kind == "linear" for kind, _, _ in steps):
            return None
        return cls(lowered, steps, flatten)

    @staticmethod
    def supports_loss(loss_fn: Callable[..., Tensor]) -> bool:
        return _is_mse(loss_fn) or _is_cross_entropy(loss_fn)

    def forward(self, params: Sequence[Tensor], x: Tensor) -> tuple[Tensor, list[Saved]] | None:
        """The network's outputs and, per step, what backpropagation reads: a Linear's input or an
        activation's ``(z, h)``; ``None`` for inputs whose shapes are not written out here."""
        h = x.flatten(2) if self.flatten else x
        lowered = self.lowered
        if h.dim() != 3 or (self.steps[0][0] == "linear"
                            and h.shape[-1] != params[lowered.weights[self.steps[0][1]]].shape[-1]):
            return None  # (inputs that do not fit: the generic path names the problem)
        saved: list[Saved] = []
        for kind, k, activation in self.steps:
            if kind == "linear":
                weight = params[lowered.weights[k]]
                bias = None if lowered.biases[k] is None else params[lowered.biases[k]]
                saved.append(h)
                h = _linear(h, weight, bias)
            else:
                z = h
                h = activation[0](z)  # type: ignore[index]
                saved.append((z, h))
        return h, saved

    def loss_and_gradients(self, params: Sequence[Tensor], x: Tensor, y: Tensor, loss_fn: Callable[..., Tensor],
                           wanted: Sequence[int]) -> tuple[Tensor, dict[int, Tensor]] | None:
        """Per-task losses ``(T,)`` (values, without a graph) and ``{position: gradient of the
        summed losses}`` for the parameter positions in ``wanted`` (task-batched weights), or
        ``None`` when the data's shapes are not the ones written out here (the caller then uses
        autograd).

        Builds a graph exactly when grad mode is on: under ``torch.no_grad()`` the
        gradients are plain values (first order)."""
        forward = self.forward(params, x)
        if forward is None:
            return None
        outputs, saved = forward
        with torch.no_grad():  # values for the non-finite checks; the gradients below carry the graph
            losses = per_task_loss(loss_fn, outputs, y)
        if losses is None:
            return None
        delta = self.output_error(loss_fn, outputs, y)
        return losses, self.backward(params, delta, saved, set(wanted))

    @staticmethod
    def output_error(loss_fn: Callable[..., Tensor], outputs: Tensor, y: Tensor) -> Tensor:
        """``∂(Σ_t ℓ_t)/∂ outputs`` for the per-task mean losses of :func:`per_task_loss`. A task whose
        cross-entropy targets are all ignored gets 0, as in torch's backward (its loss is NaN)."""
        if _is_mse(loss_fn):
            return (outputs - y) * (2.0 / outputs[0].numel())
        counted, share = counted_share(loss_fn, y, outputs.dtype)
        one_hot = F.one_hot(torch.where(counted, y, 0), outputs.shape[-1]).to(outputs.dtype)
        return (torch.softmax(outputs, -1) - one_hot) * share

    def backward(self, params: Sequence[Tensor], delta: Tensor, saved: list[Saved], wanted: set[int],
                 errors: list[Tensor | None] | None = None) -> dict[int, Tensor]:
        """``{position: per-task gradient}`` for the ``wanted`` positions, by backpropagation of the
        output error ``delta``. ``errors``, if given (one entry per step), receives the error
        flowing into each step from above, from the first Linear with a wanted weight on."""
        lowered = self.lowered
        grads: dict[int, Tensor] = {}
        # The last layer whose input error is still needed: the first Linear with a wanted weight.
        needed = [i for i, (kind, k, _) in enumerate(self.steps) if kind == "linear"
                  and (lowered.weights[k] in wanted or lowered.biases[k] in wanted)]
        if not needed:
            return grads
        for i in range(len(self.steps) - 1, needed[0] - 1, -1):
            kind, k, activation = self.steps[i]
            if errors is not None:
                errors[i] = delta
            if kind == "activation":
                z, h = saved[i]  # type: ignore[misc]
                delta = activation[1](delta, z, h)  # type: ignore[index]
                continue
            weight_at, bias_at = lowered.weights[k], lowered.biases[k]
            if weight_at in wanted:
                _accumulate(grads, weight_at, torch.bmm(delta.transpose(1, 2), saved[i]))  # type: ignore[arg-type]
            if bias_at is not None and bias_at in wanted:
                _accumulate(grads, bias_at, delta.sum(1))
            if i > needed[0]:
                delta = times(delta, params[weight_at])
        return grads


def counted_share(loss_fn: Callable[..., Tensor], y: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Which cross-entropy targets count (not ``ignore_index``) and each one's share ``1/m`` of its
    task's mean, shape ``(T, N, 1)``; 0 for every example of a task with no counted target."""
    counted = y != getattr(loss_fn, "ignore_index", -100)
    share = counted.to(dtype) / counted.sum(1, keepdim=True).clamp(min=1)
    return counted, share.unsqueeze(-1)


def times(error: Tensor, weight: Tensor) -> Tensor:
    """``error W`` per task, for a task-batched or a shared weight."""
    return torch.bmm(error, weight) if weight.dim() == 3 else error @ weight


def _accumulate(grads: dict[int, Tensor], position: int, value: Tensor) -> None:
    """A tied weight (one tensor in several layers) gets the sum of its layers' gradients."""
    grads[position] = value if position not in grads else grads[position] + value
