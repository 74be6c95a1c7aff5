r"""Task-batched kernels for the layers whose batched form is known: the vectorised path without vmap.

A meta-batch of ``T`` tasks evaluates one model at ``T`` sets of weights. Under
``torch.func.vmap`` every operation pays the batching machinery's dispatch on
every forward and on both backward passes of a second-order meta-gradient. For
the layers below the batched form is one ordinary kernel, so a ``Sequential``
built from them is *lowered*: interpreted layer by layer on task-batched
tensors, with no vmap:

* ``Linear``: ``torch.baddbmm(b, h, Wᵀ)`` with ``W`` of shape ``(T, out, in)``;
* ``Conv1d/2d/3d`` (zero padding): one grouped convolution, the tasks folded into the
  channels, ``(N, T·C, ...)``, with ``groups = T · groups``;
* ``BatchNorm1d/2d/3d``: ``F.batch_norm`` over the ``T · C`` channels, so each task's channels
  are normalised with that task's statistics;
* pooling, ``Flatten`` and activations: the same module, channel by channel or element by element.

A convolution's per-task output is exactly ``conv(x_t, W_t)``: group ``t`` of the
grouped convolution sees only task ``t``'s input channels and weights. Every
BatchNorm policy of :mod:`diffopt.unroll.functional` is kept (``transductive``,
``per_task`` with per-task running statistics, ``frozen``). Weights that are not
adapted (no task dimension) are shared by all tasks.

Any other module (a custom ``forward``, attention, recurrent layers, dropout with
``p > 0``, whose random masks would be drawn differently from vmap's) makes
:func:`lower` return ``None`` with the reason, and the engine runs the generic
vmap path. Measured gains are in ``benchmarks/RESULTS.md`` (sinusoid MLP and Conv-4).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = ["LoweredModel", "lower", "per_task_loss"]

# Parameter-free layers that act element by element (any layout).
ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink, nn.Softsign,
)
# Parameter-free layers that act channel by channel on (N, C, *spatial).
CHANNELWISE = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
CONVOLUTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}

# Layouts of the hidden tensor: "tasks" is (T, N, *features); "channels" is (N, T·C, *spatial).
TASKS, CHANNELS = "tasks", "channels"


@dataclass
class _Hidden:
    value: Tensor
    layout: str
    tasks: int

    def as_tasks(self) -> Tensor:
        """(T, N, *features) — from (N, T·C, *spatial) a view."""
        if self.layout == TASKS:
            return self.value
        n, tc, *spatial = self.value.shape
        return self.value.reshape(n, self.tasks, tc // self.tasks, *spatial).transpose(0, 1)

    def as_channels(self) -> Tensor:
        """(N, T·C, *spatial) — from (T, N, C, *spatial) a copy."""
        if self.layout == CHANNELS:
            return self.value
        t, n, c, *spatial = self.value.shape
        return self.value.transpose(0, 1).reshape(n, t * c, *spatial)


def _shared_or_tasks(weight: Tensor, tasks: int, base_dim: int) -> Tensor:
    """A weight with a leading task dimension, (T, *shape): shared weights are expanded (a view)."""
    if weight.dim() == base_dim:
        return weight.unsqueeze(0).expand(tasks, *weight.shape)
    return weight


def _fold(weight: Tensor | None, tasks: int, base_dim: int) -> Tensor | None:
    """(T, C, ...) or a shared (C, ...) as (T·C, ...): the grouped kernel's per-channel tensor."""
    if weight is None:
        return None
    return _shared_or_tasks(weight, tasks, base_dim).reshape(-1, *weight.shape[weight.dim() - base_dim + 1:])


class LoweredModel:
    """A ``Sequential`` of known layers as task-batched kernels (see the module docstring).

    ``model(params, buffers, x, training, track)`` takes the weights in
    ``named_parameters()`` order (adapted ones with a leading task dimension), the
    per-task BatchNorm statistics (three per layer, as
    :meth:`~diffopt.unroll.functional.FunctionalModel.initial_buffers` makes them;
    updated in place, so pass clones), inputs ``(T, N, ...)`` and the BatchNorm
    flags; it returns the outputs ``(T, N, ...)``.
    """

    def __init__(self, layers: list[nn.Module], position: Callable[[Tensor], int],
                 batchnorms: Sequence[_BatchNorm]) -> None:
        self.layers = layers
        self.kinds = [_kind(m) for m in layers]
        # Position of each layer's weight and bias in named_parameters() order (tied weights share one).
        self.weights = [position(m.weight) if getattr(m, "weight", None) is not None else None for m in layers]
        self.biases = [position(m.bias) if getattr(m, "bias", None) is not None else None for m in layers]
        index = {id(m): k for k, m in enumerate(batchnorms)}
        self.statistics = [index.get(id(m)) for m in layers]
        self.description = " → ".join(type(m).__name__ for m in layers)

    def __call__(self, params: Sequence[Tensor], buffers: Sequence[Tensor], x: Tensor, training: bool,
                 track: bool, per_task_statistics: bool) -> Tensor:
        h = _Hidden(x, TASKS, x.shape[0])
        for k, (layer, kind) in enumerate(zip(self.layers, self.kinds)):
            weight = None if self.weights[k] is None else params[self.weights[k]]
            bias = None if self.biases[k] is None else params[self.biases[k]]
            if kind == "linear":
                h = _Hidden(_linear(h.as_tasks(), weight, bias), TASKS, h.tasks)
            elif kind == "conv":
                h = _Hidden(_convolution(layer, h.as_channels(), weight, bias, h.tasks), CHANNELS, h.tasks)
            elif kind == "batchnorm":
                h = self._batchnorm(k, h, weight, bias, buffers, training, track, per_task_statistics)
            elif kind == "channelwise":
                h = _Hidden(layer(h.as_channels()), CHANNELS, h.tasks)
            elif kind == "flatten":
                h = _Hidden(h.as_tasks().flatten(2), TASKS, h.tasks)
            else:  # elementwise
                h = _Hidden(layer(h.value), h.layout, h.tasks)
        return h.as_tasks()

    def _batchnorm(self, k: int, h: _Hidden, weight: Tensor | None, bias: Tensor | None, buffers: Sequence[Tensor],
                   training: bool, track: bool, per_task_statistics: bool) -> _Hidden:
        """``nn.BatchNorm*.forward`` with the tasks folded into the channels."""
        layer, tasks = self.layers[k], h.tasks
        if per_task_statistics:
            s = self.statistics[k]
            mean, var, count = buffers[3 * s], buffers[3 * s + 1], buffers[3 * s + 2]
            running_mean, running_var = mean.view(-1), var.view(-1)  # in place: these are the caller's clones
        elif track and layer.running_mean is not None:
            mean, var, count = layer.running_mean, layer.running_var, None
            running_mean, running_var = mean.repeat(tasks), var.repeat(tasks)
        else:
            running_mean = running_var = count = None
        factor = 0.0 if layer.momentum is None else layer.momentum
        if training and track and count is not None:
            buffers[3 * self.statistics[k] + 2].add_(1)  # type: ignore[union-attr]
            if layer.momentum is None:  # cumulative moving average (every task has taken the same steps)
                factor = 1.0 / float(count.reshape(-1)[0])
        use_batch = training or running_mean is None
        value = F.batch_norm(h.as_channels(), running_mean, running_var, _fold(weight, tasks, 1),
                             _fold(bias, tasks, 1), use_batch, factor, layer.eps)
        return _Hidden(value, CHANNELS, tasks)


def _linear(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` per task: ``h`` (T, N, ..., in), ``weight`` (T, out, in) or shared (out, in)."""
    tasks = h.shape[0]
    if h.dim() == 3 and weight.dim() == 3 and bias is not None and bias.dim() == 2:  # the common case
        return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
    if weight.dim() == 2:  # shared by every task
        out = F.linear(h, weight)
    else:
        flat = h.reshape(tasks, -1, h.shape[-1])
        if bias is not None and bias.dim() == 2:
            out = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
            return out.reshape(*h.shape[:-1], out.shape[-1])
        out = torch.bmm(flat, weight.transpose(1, 2)).reshape(*h.shape[:-1], weight.shape[1])
    if bias is None:
        return out
    if bias.dim() == 1:
        return out + bias
    return out + bias.reshape(tasks, *([1] * (out.dim() - 2)), bias.shape[-1])


def _convolution(layer: _ConvNd, h: Tensor, weight: Tensor, bias: Tensor | None, tasks: int) -> Tensor:
    """One grouped convolution over the tasks folded into the channels of ``h`` (N, T·C, *spatial)."""
    spatial = len(layer.kernel_size)
    folded = _fold(weight, tasks, spatial + 2)
    return CONVOLUTIONS[type(layer)](h, folded, _fold(bias, tasks, 1), layer.stride, layer.padding,
                                     layer.dilation, layer.groups * tasks)


def _kind(layer: nn.Module) -> str:
    if type(layer) is nn.Linear:
        return "linear"
    if type(layer) in CONVOLUTIONS:
        return "conv"
    if isinstance(layer, _BatchNorm) and type(layer) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return "batchnorm"
    if type(layer) in CHANNELWISE:
        return "channelwise"
    if type(layer) is nn.Flatten:
        return "flatten"
    if type(layer) in ELEMENTWISE or (type(layer) in (nn.Dropout, nn.Dropout1d, nn.Dropout2d) and layer.p == 0):
        return "elementwise"
    return "unknown"


def _why_not(layer: nn.Module, name: str) -> str | None:
    """Why ``layer`` cannot be lowered, or None."""
    kind = _kind(layer)
    label = f"{name or 'model'} ({type(layer).__name__})"
    if kind == "unknown":
        return f"{label} has no task-batched kernel here"
    if kind == "conv" and layer.padding_mode != "zeros":
        return f"{label} pads with {layer.padding_mode!r}"
    if kind == "channelwise" and getattr(layer, "return_indices", False):
        return f"{label} returns indices"
    if kind == "flatten" and (layer.start_dim != 1 or layer.end_dim != -1):
        return f"{label} flattens dimensions {layer.start_dim}..{layer.end_dim} (only 1..-1 is lowered)"
    return None


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    if type(module) is nn.Sequential:
        out = []
        # _modules, not named_children(): a module placed twice runs twice (named_children yields it once)
        for name, child in module._modules.items():
            out += _leaves(child, f"{prefix}.{name}" if prefix else name)
        return out
    return [(prefix, module)]


def hooked_module(model: nn.Module) -> str | None:
    """The first submodule with a forward (pre-)hook, as ``"name (Type)"``, or ``None``."""
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"{name or 'the model'} ({type(module).__name__})"
    return None


def lower(model: nn.Module, position: Callable[[Tensor], int],
          batchnorms: Sequence[_BatchNorm]) -> tuple[LoweredModel | None, str]:
    """``model`` as task-batched kernels, or ``None``, with the reason either way.

    ``position`` maps a parameter tensor to its place in ``named_parameters()``
    order; ``batchnorms`` lists the BatchNorm layers in the order their per-task
    statistics are kept.
    """
    hooked = hooked_module(model)
    if hooked is not None:  # kernels do not call the modules: their hooks would not run
        return None, f"{hooked} has forward hooks"
    leaves = _leaves(model)
    for name, layer in leaves:
        reason = _why_not(layer, name)
        if reason is not None:
            return None, reason
    layers = [m for _, m in leaves]
    lowered = LoweredModel(layers, position, batchnorms)
    return lowered, f"task-batched kernels ({lowered.description})"


# ---------------------------------------------------------------------------------------
# per-task losses without vmap
# ---------------------------------------------------------------------------------------
def per_task_loss(loss_fn: Callable[[Tensor, Tensor], Tensor], outputs: Tensor, y: Tensor) -> Tensor | None:
    """Per-task losses ``(T,)`` of the mean-reduced losses whose batched form is known
    (``F.mse_loss``, ``F.cross_entropy`` and their modules with default options), else ``None``.

    ``mean`` reduction over each task's elements: ``mse`` as ``mean(dim)`` of the
    unreduced squares; ``cross_entropy`` as the sum over the task's examples divided by
    its number of counted targets (``ignore_index`` excluded), as torch's mean does.
    """
    if loss_fn is F.mse_loss or (type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean"):
        if outputs.shape != y.shape:
            return None  # broadcasting (and its warning) stays with the per-task path
        return torch.square(outputs - y).flatten(1).mean(1)  # F.mse_loss(reduction="none")'s arithmetic
    if loss_fn is F.cross_entropy or (type(loss_fn) is nn.CrossEntropyLoss and loss_fn.reduction == "mean"
                                      and loss_fn.weight is None and loss_fn.label_smoothing == 0.0):
        if outputs.dim() != 3 or y.dim() != 2 or y.dtype != torch.long:
            return None
        ignore = getattr(loss_fn, "ignore_index", -100)
        tasks, n, classes = outputs.shape
        each = F.cross_entropy(outputs.reshape(tasks * n, classes), y.reshape(-1), reduction="none",
                               ignore_index=ignore).view(tasks, n)
        return each.sum(1) / (y != ignore).sum(1)
    return None

