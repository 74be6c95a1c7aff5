"""The one functional-model stack: a module evaluated with explicit weights.

Everything in diffopt that evaluates ``model`` at weights other than its own —
the inner-loop engine (:class:`~diffopt.unroll.InnerLoop`) and the diagnostics
(:mod:`diffopt.diagnostics`) — goes through this module. It owns:

* **the parameter parser**, :class:`ParameterLayout`: the model's parameter names
  in ``model.named_parameters()`` order, their positions, and the map from an
  optimizer's (or any list of the model's) tensors to those positions;
* **weights**: a list in ``named_parameters()`` order, or a dict
  ``name -> tensor`` (a dict may hold a subset: the others keep the module's
  value); every tensor may carry a leading task dimension ``(T, *shape)``.
  :meth:`ParameterLayout.as_dict` / :meth:`~ParameterLayout.as_list` convert;
* **one vocabulary for vectors of weights**: :func:`to_vector` concatenates
  weights into one vector (``named_parameters()`` order), :func:`from_vector`
  splits one back, :func:`vector_slices` says where each tensor lies.
  (``diffopt.unroll.carry.flatten`` is a different operation — an inner loop's
  state split into tensors for ``autograd.Function`` — and keeps that name.)
  :func:`differentiable_copies` gives detached copies that require grad;
* **evaluation**: :func:`call` (``torch.func.functional_call``; works for any
  module, including Hugging Face decoders that slice a ``ModuleList``), and
  :class:`FunctionalModel`, the per-task evaluation the engine runs, under
  higher's monkeypatched copy (``backend="higher"``, the default: the fastest on
  the measured benchmarks) or ``functional_call`` (``backend="functional_call"``:
  for modules higher cannot patch), with or without ``torch.func.vmap`` over tasks;
* **BatchNorm**: one policy vocabulary, :data:`BATCHNORM_POLICIES`, applied by
  :func:`batchnorm_flags` to patched copies and live modules alike.

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

import contextlib
import inspect
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import higher
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from .attention import double_differentiable
from .lowered import hooked_module, lower

__all__ = [
    "BATCHNORM_POLICIES", "FunctionalModel", "ParameterLayout", "Weights", "attention_layers", "batchnorm_flags",
    "call", "choose_backend", "choose_vectorize", "describe_vmap_failure", "differentiable_copies", "from_vector",
    "to_vector", "vector_slices", "vectorization_blockers",
]

BATCHNORM_POLICIES = ("transductive", "per_task", "frozen")
BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")
BACKENDS = ("higher", "functional_call")

# Layers that torch.func.vmap cannot batch in the configuration named (torch 2.13).
UNBATCHABLE = (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell)

Weights = Union[Mapping[str, Tensor], Sequence[Tensor], None]


# ---------------------------------------------------------------------------------------
# the parameter parser
# ---------------------------------------------------------------------------------------
class ParameterLayout:
    """A model's parameters by name and position (``model.named_parameters()`` order).

    The one place that maps names ↔ positions ↔ the tensors an optimizer holds.
    Tied parameters appear once (as in ``named_parameters()``).
    """

    def __init__(self, model: nn.Module) -> None:
        named = list(model.named_parameters())
        self.model_name = type(model).__name__
        self.names: list[str] = [n for n, _ in named]
        self.shapes: list[torch.Size] = [p.shape for _, p in named]
        self.index: dict[str, int] = {n: j for j, n in enumerate(self.names)}
        self._position_of_tensor = {id(p): j for j, (_, p) in enumerate(named)}

    def __len__(self) -> int:
        return len(self.names)

    def positions(self, tensors: Iterable[Tensor], what: str = "optimizer parameter",
                  fix: str = "build the inner optimizer on model.parameters() (or a subset of them)") -> list[int]:
        """The position of each of ``tensors`` (the model's own parameter tensors, e.g. an optimizer's
        ``params``) in ``named_parameters()`` order; a tensor that is not one of them raises, naming it."""
        out = []
        for k, p in enumerate(tensors):
            j = self._position_of_tensor.get(id(p))
            if j is None:
                raise ValueError(f"{what} {k} (shape {tuple(p.shape)}) is not a parameter of the model; {fix}")
            out.append(j)
        return out

    def as_dict(self, weights: Weights, module: nn.Module | None = None) -> dict[str, Tensor]:
        """Weights as a dict in ``named_parameters()`` order.

        ``None`` gives ``module``'s own parameters (detached); a dict is checked for
        unknown names and reordered (a subset is allowed); a list must hold one
        tensor per parameter.
        """
        if weights is None:
            if module is None:
                raise ValueError("as_dict(None) needs the module whose own parameters to use")
            return {n: p.detach() for n, p in module.named_parameters()}
        if isinstance(weights, Mapping):
            unknown = [k for k in weights if k not in self.index]
            if unknown:
                raise KeyError(
                    f"{unknown} are not parameters of {self.model_name}; weights must be keyed by "
                    f"model.named_parameters() names: {self.names}"
                )
            return {n: weights[n] for n in self.names if n in weights}
        if isinstance(weights, (list, tuple)):
            if len(weights) != len(self.names):
                raise ValueError(
                    f"got {len(weights)} weight tensors but {self.model_name} has {len(self.names)} parameters "
                    f"({self.names}); a list of weights must follow model.named_parameters() order"
                )
            return dict(zip(self.names, weights))
        raise TypeError(
            f"weights must be a dict name->tensor, a list in named_parameters() order or None, got {type(weights)}"
        )

    def as_list(self, weights: Mapping[str, Tensor] | Sequence[Tensor]) -> list[Tensor]:
        """Weights as a list in ``named_parameters()`` order (a dict must name every parameter)."""
        if isinstance(weights, Mapping):
            full = self.as_dict(weights)
            missing = [n for n in self.names if n not in full]
            if missing:
                raise KeyError(f"weights for {missing} are missing; a list needs every parameter of {self.model_name}")
            return [full[n] for n in self.names]
        return list(self.as_dict(weights).values())

    def position(self, tensor: Tensor) -> int:
        """The position of one of the model's parameter tensors (a tied tensor has one position)."""
        return self._position_of_tensor[id(tensor)]

    def task_count(self, weights: Mapping[str, Tensor]) -> int | None:
        """``T`` if every tensor of ``weights`` carries a leading task dimension, ``None`` if none does."""
        found = set()
        for n, t in weights.items():
            shape = self.shapes[self.index[n]]
            if t.shape == shape:
                found.add(None)
            elif t.dim() == len(shape) + 1 and t.shape[1:] == shape:
                found.add(int(t.shape[0]))
            else:
                raise ValueError(f"weight {n!r} has shape {tuple(t.shape)}; the model's is {tuple(shape)} "
                                 f"(or (tasks, {', '.join(map(str, shape))}) for a batch of tasks)")
        if len(found) > 1:
            raise ValueError(f"some weights carry a task dimension and some do not: {sorted(found, key=str)}")
        return found.pop() if found else None


# ---------------------------------------------------------------------------------------
# vectors of weights
# ---------------------------------------------------------------------------------------
def to_vector(weights: Mapping[str, Tensor] | Sequence[Tensor], start_dim: int = 0) -> Tensor:
    """Concatenate weights into one vector (or ``(lead, P)`` with ``start_dim=1``), in their order."""
    tensors = weights.values() if isinstance(weights, Mapping) else weights
    return torch.cat([t.reshape(*t.shape[:start_dim], -1) for t in tensors], dim=start_dim)


def from_vector(vector: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split a vector made by :func:`to_vector` back into tensors shaped like ``like``."""
    return {n: vector[s].reshape(like[n].shape) for n, s in vector_slices(like).items()}


def vector_slices(like: Mapping[str, Tensor]) -> dict[str, slice]:
    """Where each tensor of ``like`` lies in the vector :func:`to_vector` makes of it."""
    out, i = {}, 0
    for n, t in like.items():
        out[n] = slice(i, i + t.numel())
        i += t.numel()
    return out


def differentiable_copies(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached copies that require grad: differentiate w.r.t. these, never the caller's tensors."""
    return {n: p.detach().requires_grad_(True) for n, p in weights.items()}


# ---------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------
def call(model: nn.Module, weights: Mapping[str, Tensor], x: Any, buffers: Mapping[str, Tensor] | None = None,
         kwargs: Mapping[str, Any] | None = None) -> Any:
    """``model(x, **kwargs)`` with the given weights (and buffers) in place of its own:
    ``torch.func.functional_call``.

    Names not in ``weights`` keep the module's tensors. Works under ``vmap``,
    ``grad`` and ``jacrev``, and on modules higher cannot patch.
    """
    if buffers:
        return functional_call(model, {**buffers, **weights}, (x,), dict(kwargs or {}))
    return functional_call(model, weights, (x,), dict(kwargs or {}))


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())


def _flags(policy: str, phase: str) -> tuple[bool, bool]:
    """``(training, track_running_stats)`` of a BatchNorm layer under ``policy`` in ``phase``."""
    if policy == "frozen" or (policy == "per_task" and phase == "outer"):
        return False, True
    if policy == "per_task":
        return True, True
    return True, False


@contextlib.contextmanager
def batchnorm_flags(layers: Sequence[_BatchNorm], policy: str, phase: str = "inner") -> Iterator[None]:
    """Set BatchNorm ``layers`` for ``policy`` in ``phase`` ("inner" or "outer"); restored on exit."""
    saved = [(m, m.training, m.track_running_stats) for m in layers]
    training, track = _flags(policy, phase)
    try:
        for m in layers:
            m.training, m.track_running_stats = training, track
        yield
    finally:
        for m, was_training, was_tracking in saved:
            m.training, m.track_running_stats = was_training, was_tracking


class FunctionalModel:
    """Per-task evaluation of a model with explicit weights, under a BatchNorm policy.

    Args:
        model: the module; its parameters and buffers are never modified.
        batchnorm: one of :data:`BATCHNORM_POLICIES`.
        backend: ``"higher"`` (a monkeypatched copy; fastest on the measured
            benchmarks), ``"functional_call"`` (``torch.func.functional_call`` on the
            module itself, with its BatchNorm flags set for the call and restored: for
            modules higher cannot patch, such as Hugging Face decoders that slice a
            ``ModuleList``) or ``"auto"`` (:func:`choose_backend`; the engine's
            default). ``backend_reason`` says which and why.

    A Hugging Face model's forward gets ``use_cache=False`` and its output's ``logits``
    are the prediction (:func:`prediction`).

    Weights are lists in ``named_parameters()`` order (:attr:`layout`). Per-task
    statistics (``per_task`` policy) are lists of tensors, three per BatchNorm
    layer (running mean, running variance, batches tracked).
    """

    def __init__(self, model: nn.Module, batchnorm: str = "transductive", backend: str = "higher",
                 lowering: bool = True) -> None:
        if batchnorm not in BATCHNORM_POLICIES:
            raise ValueError(
                f"batchnorm={batchnorm!r} is not a BatchNorm policy; choose one of {BATCHNORM_POLICIES}"
            )
        if backend == "auto":
            backend, self.backend_reason = choose_backend(model)
        elif backend in BACKENDS:
            self.backend_reason = f"{backend}: requested (backend={backend!r})"
        else:
            raise ValueError(f"backend={backend!r} is not a functional backend; choose 'auto' or one of {BACKENDS}")
        refuse_activation_checkpointing(model, "InnerLoop", CHECKPOINTED_INSTEAD)
        #: modules with a gradient-checkpointing switch (transformers' layer stacks), read at every call:
        #: the switch may be turned on after the loop is built
        self._switches = [weakref.ref(m) for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        hooked = hooked_module(model)
        if backend == "higher" and hooked is not None:
            raise ValueError(f"backend='higher': {hooked} has forward hooks, which higher's monkeypatched copy "
                             "does not run (the inner loop would evaluate another function than the model); use "
                             "backend='auto' or 'functional_call', which run the module itself")
        self.kwargs = model_kwargs(model)
        self.model = model
        self.policy = batchnorm
        self.backend = backend
        self.layout = ParameterLayout(model)
        self.names = self.layout.names
        self.model_batchnorms = batchnorm_layers(model)
        if backend == "higher":
            self.fmodel = higher.monkeypatch(model, copy_initial_weights=True, track_higher_grads=False)
            self.batchnorms = batchnorm_layers(self.fmodel)
        else:
            self.fmodel = None
            self.batchnorms = self.model_batchnorms
            names = {id(m): n for n, m in model.named_modules()}
            self.buffer_names = [f"{names[id(m)]}.{b}" if names[id(m)] else b
                                 for m in self.model_batchnorms for b in BUFFER_NAMES]
        # The vectorised path: task-batched kernels where the layers are known (diffopt.unroll.lowered),
        # torch.func.vmap otherwise or with lowering=False.
        self.lowered, self.lowered_reason = lower(model, self.layout.position, self.model_batchnorms)
        if not lowering:
            self.lowered, self.lowered_reason = None, "vmap: requested (lowering=False)"
        if batchnorm == "per_task":
            missing = [type(m).__name__ for m in self.model_batchnorms if not m.track_running_stats]
            if missing:
                raise ValueError(
                    f"batchnorm='per_task' needs running statistics, but {missing[0]} was built with "
                    "track_running_stats=False; use batchnorm='transductive'"
                )

    # -- per-task BatchNorm statistics -------------------------------------------------
    def refuse_checkpointing_switched_on(self, where: str) -> None:
        """Refuse a gradient-checkpointing switch turned on since construction (one attribute read per
        switch: none for most models, one per layer stack for Hugging Face's)."""
        if any(getattr(ref(), "gradient_checkpointing", None) is True for ref in self._switches):
            refuse_activation_checkpointing(self.model, where, CHECKPOINTED_INSTEAD)

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

    def _configure_patched(self, phase: str, buffers: Sequence[Tensor]) -> None:
        """Set the patched copy's BatchNorm layers for ``phase`` (they are never called outside it)."""
        training, track = _flags(self.policy, phase)
        per_task = self.policy == "per_task"
        for k, (patched, original) in enumerate(zip(self.batchnorms, self.model_batchnorms)):
            patched.training, patched.track_running_stats = training, track
            for j, name in enumerate(BUFFER_NAMES):
                setattr(patched, name, buffers[3 * k + j] if per_task else getattr(original, name))

    # -- evaluation --------------------------------------------------------------------
    def forward_one(self, params: Sequence[Tensor], buffers: Sequence[Tensor], x: Tensor, phase: str) -> Tensor:
        """The model on one task's inputs with that task's weights and statistics."""
        params = list(params)
        if self.fmodel is None:
            stats = dict(zip(self.buffer_names, buffers)) if self.policy == "per_task" else None
            with batchnorm_flags(self.batchnorms, self.policy, phase):
                return prediction(call(self.model, dict(zip(self.names, params)), x, stats, self.kwargs))
        self._configure_patched(phase, buffers)
        # higher writes a submodule's fast weights only when that submodule is called, so a
        # forward that reads a submodule's parameter directly (weight tying such as
        # ``h @ self.embedding.weight.T``) would see stale weights: write them all first.
        self.fmodel.update_params(params)
        try:
            out = self.fmodel(x, params=params, **self.kwargs)
        except TypeError as error:
            if "root" not in str(error):
                raise
            raise TypeError(
                f"backend='higher' cannot run {type(self.model).__name__}: higher's monkeypatched ModuleList "
                f"rebuilds itself without its root when the model slices it (Hugging Face's decoders slice their "
                f"layer list; higher: {error}). Use backend='auto' or 'functional_call', which run the module "
                "itself") from error
        return prediction(out)

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
        if vectorize and self.lowered is not None:
            training, track = _flags(self.policy, phase)
            return self.lowered(params, buffers, x, training, track, self.policy == "per_task"), buffers
        if vectorize:
            in_dims = tuple(0 if a else None for a in adapted)

            def one(task_params: tuple[Tensor, ...], task_buffers: tuple[Tensor, ...], xt: Tensor) -> Tensor:
                return self.forward_one(task_params, task_buffers, xt, phase)

            # The fused attention kernels have no batching rule (vmap would loop over the tasks);
            # the MATH backend's matmuls and softmax batch (diffopt.unroll.attention).
            with double_differentiable():
                out = torch.func.vmap(one, in_dims=(in_dims, 0, 0), randomness="different")(
                    tuple(params), tuple(buffers), x
                )
            return out, buffers
        # One unbind per tensor, not p[t] per task: the backward of T select views builds T
        # task-batched gradients (cost per task growing with T; 20x from 4 to 64 tasks measured),
        # unbind's builds one. Same values: the other slices' contributions are exact zeros.
        per_task = [p.unbind(0) if a else None for p, a in zip(params, adapted)]
        outs = []
        for t in range(x.shape[0]):
            task_params = [p if slices is None else slices[t] for p, slices in zip(params, per_task)]
            outs.append(self.forward_one(task_params, [b[t] for b in buffers], x[t], phase))
        return torch.stack(outs), buffers


# ---------------------------------------------------------------------------------------
# vmap or a task loop
# ---------------------------------------------------------------------------------------
def checkpointing_module(model: nn.Module) -> str | None:
    """The first module that recomputes its activations in the backward (Hugging Face's gradient
    checkpointing, ``model.gradient_checkpointing_enable()``), or None."""
    for name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", None) is True:  # (set on the layer stacks by transformers)
            return name or "the model"
    return None


CHECKPOINTED_INSTEAD = ("to save memory over the inner steps use mode='checkpointed', which recomputes whole inner "
                        "steps with their weights")


def refuse_activation_checkpointing(model: nn.Module, where: str, alternative: str) -> None:
    """A model that recomputes activations in the backward gives silently wrong meta-gradients with fast
    weights: the recomputation runs inside the backward, after each forward has put the model's own
    weights back, so it recomputes with θ instead of the fast weights (first order: wrong values from
    the second step on; second order: torch's "recomputed values have different metadata")."""
    found = checkpointing_module(model)
    if found is not None:
        raise ValueError(
            f"{where}: {found} recomputes its activations in the backward (gradient checkpointing). Under fast "
            "weights the recomputation would run with the model's own weights, after the forward that set the "
            "fast ones has ended, and the gradients would be silently wrong. Call "
            f"model.gradient_checkpointing_disable() first; {alternative}"
        )


def vectorization_blockers(model: nn.Module, batchnorm: str | None = None) -> list[str]:
    """Layers that torch.func.vmap cannot batch, each with the reason.

    With ``batchnorm="per_task"`` (running statistics updated per task) a BatchNorm
    layer with ``momentum=None`` is one too: its cumulative average reads the batch
    count with ``float(num_batches_tracked)``, which vmap cannot batch.
    """
    reasons = []
    for name, module in model.named_modules():
        if isinstance(module, UNBATCHABLE):
            reasons.append(f"{name or 'model'} ({type(module).__name__}): no vmap batching rule for recurrent kernels")
        elif batchnorm == "per_task" and isinstance(module, _BatchNorm) and module.momentum is None:
            reasons.append(f"{name or 'model'} ({type(module).__name__}, momentum=None): its cumulative average "
                           "reads the per-task batch count as a Python number, which vmap cannot batch")
    return reasons


def count_convolutions(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


# Packages whose models higher cannot monkeypatch reliably: Hugging Face decoders slice their
# ``ModuleList`` (``LlamaModel.forward``: ``self.layers[: self.config.num_hidden_layers]``), and
# higher's patched ``ModuleList.__getitem__`` rebuilds the class without its ``root`` argument.
FUNCTIONAL_CALL_PACKAGES = ("transformers", "peft")


def choose_backend(model: nn.Module) -> tuple[str, str]:
    """The ``backend="auto"`` rule of :class:`FunctionalModel`, with its reason: higher's
    monkeypatching (the default, measured as fast as ``functional_call`` on the sinusoid
    meta-step), or ``torch.func.functional_call`` for modules from
    :data:`FUNCTIONAL_CALL_PACKAGES` (Hugging Face ``transformers`` and ``peft``)."""
    hooked = hooked_module(model)
    if hooked is not None:
        return "functional_call", (f"functional_call: {hooked} has forward hooks, which run only when the module "
                                   "itself is called (higher's monkeypatched copy does not run them)")
    for name, module in model.named_modules():
        package = type(module).__module__.split(".")[0]
        if package in FUNCTIONAL_CALL_PACKAGES:
            return "functional_call", (
                f"functional_call: {name or 'the model'} ({type(module).__name__}) is a {package} module; "
                "Hugging Face models run through torch.func.functional_call (decoders such as LLaMA slice their "
                "ModuleList, self.layers[:n], which higher's monkeypatched copy cannot)")
    return "higher", "higher: a plain torch.nn model (higher's monkeypatched copy, the default)"


def model_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments every forward of ``model`` gets: ``use_cache=False`` for Hugging Face
    models (an inner loop has no use for a key/value cache, and building one under ``vmap`` fails)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    if "use_cache" in parameters:
        return {"use_cache": False}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if accepts_any and hasattr(getattr(model, "config", None), "use_cache"):  # a peft wrapper of a decoder
        return {"use_cache": False}
    return {}


def prediction(output: Any) -> Any:
    """The tensor ``loss_fn`` receives: the output itself, or a Hugging Face output's ``logits``."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if callable(getattr(output, "to_tuple", None)) and callable(getattr(output, "keys", None)):
        raise TypeError(
            f"the model returned a {type(output).__name__} without logits (fields {list(output.keys())}): the inner "
            "loop takes one tensor per task, which loss_fn receives. Wrap the model so that it returns the tensor to "
            "train on, e.g. a module whose forward returns model(x).last_hidden_state, or its pooled output through "
            "a head")
    return output


def attention_layers(model: nn.Module) -> list[str]:
    """Names of the attention modules of ``model``: ``nn.MultiheadAttention`` and any module whose
    class name ends in ``Attention`` (Hugging Face's ``GPT2Attention``, ``LlamaAttention``, ...)."""
    return [name or "model" for name, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("Attention")]


def choose_vectorize(model: nn.Module, batchnorm: str | None = None, lowered: bool = False) -> tuple[bool, str]:
    """The ``vectorize="auto"`` rule, with its reason.

    Measured on CPU (see ``benchmarks/``): vectorised MLP inner loops are 3-9x
    faster than a task loop, while convolutions across tasks are slower than the
    task loop at every meta-batch measured (4, 16, 32; second order, Conv-4):
    1.25-1.44x as one grouped convolution (``lowered``, :mod:`diffopt.unroll.lowered`)
    and 1.9-2.1x under vmap, with more memory (``benchmarks/conv_tasks.py``), so
    convolutional models run task by task. So do attention models: a first-order
    meta-step of a 2-layer encoder (d=64, L=128, 4 tasks) took 104 ms in a task loop
    and 530-610 ms under vmap (``benchmarks/attention_backends.md``).
    Layers that vmap cannot batch (under the BatchNorm policy ``batchnorm``, when
    given) force the task loop, unless the model is ``lowered`` (its task-batched
    kernels need no vmap).
    """
    blockers = [] if lowered else vectorization_blockers(model, batchnorm)
    if blockers:
        return False, "task loop: " + "; ".join(blockers)
    if count_convolutions(model):
        return False, ("task loop: convolutions run faster per task than across tasks (grouped or under vmap) on CPU "
                       "at meta-batch 4-32 (measured, benchmarks/conv_tasks.py)")
    attention = attention_layers(model)
    if attention:
        return False, (f"task loop: attention ({attention[0]}) runs 5x faster per task than under vmap on CPU "
                       "(measured, benchmarks/attention_backends.md)")
    return True, "vmap: no convolutional or recurrent layers, vectorised inner steps are faster (measured)"


def describe_vmap_failure(model: nn.Module, error: Exception, batchnorm: str | None = None) -> str:
    blockers = vectorization_blockers(model, batchnorm)
    layer = blockers[0] if blockers else "a layer of the model"
    if type(model).__name__ == "PaddedSequences":
        layer = ("the wrapped model's attention-mask code (Hugging Face builds its mask by reading the mask's "
                 "values, which torch.func.vmap cannot batch: with any mask, all ones too)")
    return (
        f"vectorize=True failed: {layer} cannot run under torch.func.vmap ({error}). "
        "Use vectorize=False (task loop) or vectorize='auto'."
    )


def as_weights(model: nn.Module, weights: Weights) -> dict[str, Tensor]:
    """``weights`` (dict, list or ``None`` for the module's own, detached) as a dict in
    ``named_parameters()`` order: :meth:`ParameterLayout.as_dict` for ``model``."""
    return ParameterLayout(model).as_dict(weights, model)
