"""``diffopt.innerloop``: higher's ``innerloop_ctx`` with diffopt's optimizers.

::

    with diffopt.innerloop(model, torch.optim.Adam(model.parameters(), lr=0.1)) as (fmodel, dopt):
        for _ in range(5):
            dopt.step(loss_fn(fmodel(x_support), y_support))
        loss_fn(fmodel(x_query), y_query).backward()   # meta-gradients reach model.parameters()

``fmodel`` is a :class:`PatchedModule`: the model itself, run with the fast weights put in
place of its parameters for the duration of each call (the swap ``torch.func.functional_call``
makes, without its per-call set-up), with higher's interface (``fmodel(x, params=...)``,
``fast_params``, ``parameters(time=...)``, ``update_params``). Nothing is rebuilt per block
(only buffers are cloned, as higher does): where each parameter and buffer sits is worked out
once per model and reused while the model's parameters stay the same tensors, and a torch.optim
optimizer is converted once while its settings stay the same and it holds no state. A block
costs what the hand-written ``functional_call`` loop costs (benchmarks/RESULTS.md, "The drop-in
``diffopt.innerloop`` at the plain loop's cost").
"""
from __future__ import annotations

import contextlib
import math
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import NonFiniteError
from .optim import DifferentiableOptimizer, from_torch
from .optim._gradients import loss_gradients

__all__ = ["innerloop", "PatchedModule", "PatchedOptimizer"]


# -- the model with fast weights ------------------------------------------------------------

class _Layout:
    """Where every parameter of a model sits, worked out once per model: one slot
    ``(module._parameters, name, position)`` per occurrence (a tied weight has several slots and
    one position), the modules whose flat weights must follow (RNNs), and the buffers.

    Valid while ``model.named_parameters()`` gives the same names and tensors and the model has as
    many buffers (:meth:`matches`);
    it holds no reference to a module, so it never keeps the model alive."""

    def __init__(self, model: nn.Module) -> None:
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self._tensors = [weakref.ref(p) for _, p in named]
        self.position_of = {id(p): j for j, (_, p) in enumerate(named)}
        self.index = {n: j for j, n in enumerate(self.names)}
        self.slots: list[tuple[dict[str, Any], str, int]] = []
        self.flat: list[weakref.ref[nn.Module]] = []
        for prefix, module in model.named_modules(remove_duplicate=False):
            for name, p in module._parameters.items():
                if p is not None:
                    self.slots.append((module._parameters, name, self.position_of[id(p)]))
                    self.index.setdefault(f"{prefix}.{name}" if prefix else name, self.position_of[id(p)])
            if getattr(module, "_flat_weights_names", None) is not None and module._parameters:
                self.flat.append(weakref.ref(module))
        self.buffer_slots = [(module._buffers, name) for module in model.modules()
                             for name, b in module._buffers.items() if b is not None]
        #: where each buffer sits in a block's copy (``fmodel.bn.running_mean`` reads the block's)
        self.buffer_index = {(id(d), name): k for k, (d, name) in enumerate(self.buffer_slots)}
        #: each module's name prefix (``"0.1."``), for the views of submodules a method returns
        self.prefixes = {id(m): f"{name}." if name else "" for name, m in model.named_modules(remove_duplicate=False)}
        #: modules with a gradient-checkpointing switch (transformers' layer stacks), read at every block
        self.checkpointing = [weakref.ref(m) for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        self.buffer_keys = buffer_keys(model)

    def matches(self, named: Sequence[tuple[str, Tensor]], buffers: list[tuple[int, str]]) -> bool:
        """Whether the model still has these parameters and these buffer slots (a replaced module with
        buffers and no parameters, such as BatchNorm1d(affine=False), has new ones)."""
        return (len(named) == len(self._tensors) and buffers == self.buffer_keys
                and all(n == m and p is r() for (n, p), m, r in zip(named, self.names, self._tensors)))


def buffer_keys(model: nn.Module) -> list[tuple[int, str]]:
    """Each buffer slot of ``model``: its module's buffer dictionary (by identity; a layout keeps the
    dictionaries alive, so an identity is not reused) and its name."""
    return [(id(module._buffers), name) for module in model.modules() for name, b in module._buffers.items()
            if b is not None]


_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, _Layout] = weakref.WeakKeyDictionary()


def _layout(model: nn.Module) -> tuple[_Layout, list[Tensor]]:
    """The model's kept layout (rebuilt if it no longer matches) and its parameters."""
    named = list(model.named_parameters())
    layout = _LAYOUTS.get(model)
    if layout is None or not layout.matches(named, buffer_keys(model)):
        layout = _LAYOUTS[model] = _Layout(model)
    return layout, [p for _, p in named]


class _MathAttention:
    """Attention on the MATH kernel (twice differentiable) for the duration of a call, as
    :func:`diffopt.unroll.double_differentiable`, setting only the flags that differ."""

    NAMES = ("flash", "mem_efficient", "cudnn", "overrideable", "math")

    def __init__(self) -> None:
        self.getters = [getattr(torch._C, f"_get_{n}_sdp_enabled") for n in self.NAMES]
        self.setters = [getattr(torch._C, f"_set_sdp_use_{n}") for n in self.NAMES]
        self.wanted = (False, False, False, False, True)

    def enter(self) -> tuple[bool, ...] | None:
        before = tuple(get() for get in self.getters)
        if before == self.wanted:
            return None
        for set_flag, flag in zip(self.setters, self.wanted):
            set_flag(flag)
        return before

    def exit(self, before: tuple[bool, ...] | None) -> None:
        if before is not None:
            for set_flag, flag in zip(self.setters, before):
                set_flag(flag)


_MATH_ATTENTION: _MathAttention | None = None


def _math_attention() -> _MathAttention:
    global _MATH_ATTENTION
    if _MATH_ATTENTION is None:
        _MATH_ATTENTION = _MathAttention()
    return _MATH_ATTENTION


class _View:
    """A module of the patched model: calling it (or one of its methods) runs it with the fast
    weights; ``view.weight`` is the current fast weight, ``view.child`` / ``view[i]`` a submodule."""

    def __init__(self, root: PatchedModule, module: nn.Module, prefix: str) -> None:
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_prefix", prefix)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._root._run(self._module, args, kwargs)

    def _wrap(self, value: Any, name: str) -> Any:
        if isinstance(value, nn.Module):
            return _View(self._root, value, f"{self._prefix}{name}.")
        if callable(value) and getattr(value, "__self__", None) is self._module:
            root, method = self._root, value

            def with_fast_weights(*args: Any, **kwargs: Any) -> Any:
                return root._run(lambda *a, **k: root._eager(method(*a, **k)), args, kwargs)
            return with_fast_weights
        return value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_root", "_module", "_prefix"):
            raise AttributeError(name)  # (copy and pickle probe before __init__ has run)
        root = self._root
        position = root._layout.index.get(self._prefix + name)
        if position is not None and name in self._module._parameters:
            return root.fast_params[position]
        buffer = root._layout.buffer_index.get((id(self._module._buffers), name))
        if buffer is not None:
            return root._buffers[buffer]  # this block's statistics, not the model's
        return self._wrap(getattr(self._module, name), name)

    def __getitem__(self, key: Any) -> Any:
        return self._wrap(self._module[key], str(key))

    def __len__(self) -> int:
        return len(self._module)  # type: ignore[arg-type]

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)  # (fmodel.fast_params = ...)
            return
        raise AttributeError(f"fmodel.{self._prefix}{name}: a patched module is read-only; change the fast weights "
                             "with fmodel.update_params(params) (or dopt.step(loss))")

    def __repr__(self) -> str:
        return f"Patched({self._module!r})"


class PatchedModule(_View):
    """``model`` run with fast weights, with higher's ``fmodel`` interface.

    ``fmodel(*args, params=None, **kwargs)`` runs ``model(*args, **kwargs)`` with ``params``
    (default: the latest fast weights; given, they become the latest, as in higher) in place of
    ``model.parameters()``, and this block's own copy of the buffers (BatchNorm statistics
    change there, not in ``model``). Submodules and methods (``fmodel.encoder(x)``,
    ``fmodel.features(x)``) run with the fast weights too. The model's parameters are put back
    after every call, also when it raises.

    Attributes: ``fast_params`` (the latest fast weights, ``model.parameters()`` order),
    ``parameters(time=t)`` (those after ``t`` updates, kept when ``track_higher_grads``),
    ``init_fast_params``, ``update_params(params)``, ``track_higher_grads``.
    """

    def __init__(self, model: nn.Module, layout: _Layout, params: list[Tensor], *, track_higher_grads: bool,
                 twice_differentiable: bool) -> None:
        setattr_ = object.__setattr__  # (no _root attribute: a reference to itself would leave it to the cyclic GC)
        setattr_(self, "_module", model)
        setattr_(self, "_prefix", "")
        setattr_(self, "_layout", layout)
        setattr_(self, "_fast", [list(params)])
        setattr_(self, "_track", bool(track_higher_grads))
        setattr_(self, "_buffers", [d[name].clone().detach() for d, name in layout.buffer_slots])
        setattr_(self, "_modes", None)  # {module: training} after fmodel.train()/eval(), else the model's own
        setattr_(self, "_attention", _math_attention() if twice_differentiable else None)

    @property
    def _root(self) -> PatchedModule:  # type: ignore[override]
        return self

    # -- the call ----------------------------------------------------------------------
    def __call__(self, *args: Any, params: Sequence[Tensor] | None = None, **kwargs: Any) -> Any:
        if params is not None:
            self.fast_params = params
        return self._run(self._module, args, kwargs)

    forward = __call__

    def _run(self, function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        layout, fast = self._layout, self._fast[-1]
        slots = layout.slots
        saved = [d[name] for d, name, _ in slots]
        for d, name, j in slots:
            d[name] = fast[j]
        if layout.buffer_slots:
            saved_buffers = [d[name] for d, name in layout.buffer_slots]
            for (d, name), b in zip(layout.buffer_slots, self._buffers):
                d[name] = b
        modes = self._set_modes() if self._modes is not None else None
        flat = self._refresh_flat_weights() if layout.flat else None
        attention = self._attention.enter() if self._attention is not None else None
        try:
            return function(*args, **kwargs)
        finally:
            if self._attention is not None:
                self._attention.exit(attention)
            for (d, name, _), p in zip(slots, saved):
                d[name] = p
            if layout.buffer_slots:
                for k, (d, name) in enumerate(layout.buffer_slots):
                    self._buffers[k] = d[name]  # (a forward may assign a new tensor to a buffer)
                    d[name] = saved_buffers[k]
            if modes is not None:
                for module, mode in modes:
                    module.training = mode
            if flat is not None:
                for module, weights in flat:
                    module._flat_weights = weights

    def _refresh_flat_weights(self) -> list[tuple[nn.Module, Any]]:
        """RNNs read their weights from ``_flat_weights``, refreshed by ``setattr`` only."""
        out = []
        for ref in self._layout.flat:
            module = ref()
            if module is not None:
                out.append((module, module._flat_weights))
                module._flat_weights = [module._parameters.get(n) for n in module._flat_weights_names]
        return out

    def _set_modes(self) -> list[tuple[nn.Module, bool]]:
        saved = []
        for module, mode in self._modes.items():
            saved.append((module, module.training))
            module.training = mode
        return saved

    def _eager(self, value: Any) -> Any:
        """A method's generator (``parameters()``, ``buffers()``, ``children()``, ``named_modules()``) read
        while the fast weights are in place, its modules as views: run lazily, after the call, it would
        give the model's own tensors, and its modules would run with the slow weights."""
        if not isinstance(value, types.GeneratorType):
            return value

        def view(item: Any) -> Any:
            if isinstance(item, nn.Module):
                return _View(self, item, self._layout.prefixes.get(id(item), ""))
            if isinstance(item, tuple):
                return tuple(view(x) for x in item)
            return item
        return iter([view(item) for item in value])

    # -- higher's interface ---------------------------------------------------------------
    @property
    def fast_params(self) -> list[Tensor]:
        return self._fast[-1]

    @fast_params.setter
    def fast_params(self, value: Sequence[Tensor]) -> None:
        value = list(value)
        if len(value) != len(self._layout.names):
            raise ValueError(f"fmodel: got {len(value)} fast weights, the model has {len(self._layout.names)} "
                             f"parameters ({', '.join(self._layout.names)}); pass one per model.parameters()")
        if self._track:
            self._fast.append(value)
        else:
            self._fast[0] = value

    def update_params(self, params: Sequence[Tensor]) -> None:
        """Make ``params`` the latest fast weights (one per ``model.parameters()``, in order)."""
        self.fast_params = params

    @property
    def init_fast_params(self) -> list[Tensor]:
        if not self._track:
            raise ValueError("fmodel.init_fast_params: only the latest fast weights are kept when "
                             "track_higher_grads=False")
        return self._fast[0]

    def parameters(self, recurse: bool = True, time: int | None = None) -> Iterator[Tensor]:
        """The fast weights after ``time`` updates (default: the latest), as higher's."""
        time = -1 if time is None else time
        if not self._track and time not in (-1, 0):
            raise ValueError(f"fmodel.parameters(time={time}): only the latest fast weights are kept when "
                             "track_higher_grads=False")
        return iter(self._fast[time])

    def named_parameters(self, time: int | None = None) -> Iterator[tuple[str, Tensor]]:
        return zip(self._layout.names, self.parameters(time=time))

    @property
    def track_higher_grads(self) -> bool:
        return self._track

    @property
    def training(self) -> bool:
        return self._module.training if self._modes is None else self._modes[self._module]

    def train(self, mode: bool = True) -> PatchedModule:
        """Run this block's calls in training (or evaluation) mode, leaving the model's own mode."""
        object.__setattr__(self, "_modes", {module: bool(mode) for module in self._module.modules()})
        return self

    def eval(self) -> PatchedModule:
        return self.train(False)

    def __repr__(self) -> str:
        return f"PatchedModule({self._module!r})"


# -- the optimizer ---------------------------------------------------------------------------

class PatchedOptimizer:
    """A differentiable optimizer bound to a patched model.

    ``step(loss)`` computes the update from ``fmodel``'s current fast weights
    and installs the result with ``fmodel.update_params``; it returns the new
    fast weights.
    """

    def __init__(self, fmodel: PatchedModule, optimizer: DifferentiableOptimizer, positions: list[int],
                 record_losses: bool = False) -> None:
        self.fmodel = fmodel
        self.optimizer = optimizer
        self._position = positions  # where each optimizer parameter sits in fmodel.fast_params
        #: the inner losses, kept (detached, no synchronisation) for one finiteness check when the block ends
        self._losses: list[Tensor] | None = [] if record_losses else None

    def step(self, loss: Tensor, params: Sequence[Tensor] | None = None, override: dict[str, list[Any]] | None = None,
             grad_callback: Callable[[list[Tensor | None]], Sequence[Tensor | None]] | None = None,
             **kwargs: Any) -> list[Tensor]:
        """One step from ``loss``, with higher's ``diffopt.step`` arguments:

        * ``params``: the fast weights to step from (one per ``model.parameters()``), instead of
          ``fmodel``'s latest;
        * ``override``: hyperparameters from this step on, ``{'lr': [lr]}`` (one value, or one per group);
        * ``grad_callback``: ``f(grads) -> grads`` on the gradients of every fast weight (``None`` for
          one the optimizer does not update or the loss does not use), e.g. clipping; for a whole
          block, ``grad_transform=`` / ``clip_grad_norm=`` of :func:`innerloop` do the same.

        Returns the new fast weights (all of them); ``fmodel`` runs with them from now on. With
        ``track_higher_grads=False`` they are new leaves, as in higher: nothing is differentiated
        through the step."""
        fast = list(self.fmodel.fast_params if params is None else params)
        if len(fast) != len(self.fmodel.fast_params):
            raise ValueError(f"step(params=...): got {len(fast)} tensors, the model has "
                             f"{len(self.fmodel.fast_params)} parameters; pass one per model.parameters(), in order")
        current = [fast[j] for j in self._position]
        if override is not None:
            self.optimizer.apply_override(override, "step(override=...)")
        if grad_callback is not None:
            kwargs["grads"] = self._called_back(grad_callback, loss, fast, current)
        if self._losses is not None and isinstance(loss, Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().reshape(()))
        new = self.optimizer.step(loss, params=current, **kwargs)
        if not self.fmodel.track_higher_grads:  # higher's evaluation mode: each step starts a new graph
            new = [t.detach().requires_grad_(old.requires_grad) for t, old in zip(new, current)]
        for j, tensor in zip(self._position, new):
            fast[j] = tensor
        self.fmodel.update_params(fast)
        return fast

    def check_recorded_losses(self) -> None:
        """Raise :class:`~diffopt.errors.NonFiniteError` naming the first inner step whose loss was NaN or
        infinite (one check for the whole block: one synchronisation, not one per step)."""
        losses = self._losses
        if not losses:
            return
        total = float(losses[0] if len(losses) == 1 else torch.stack(losses).sum())  # NaN and inf carry through
        if math.isfinite(total):
            return
        finite = torch.isfinite(torch.stack(losses))
        if bool(finite.all()):
            return  # (finite losses whose sum overflowed)
        step = int((~finite).nonzero()[0])
        raise NonFiniteError(
            f"innerloop: the inner loss of step {step} (0-based) was {float(losses[step])}, so the fast "
            "weights and the meta-gradient are not finite; lower the inner learning rate, clip gradients "
            "(clip_grad_norm=...) or check the data (checked once when the block ends; check_finite=True checks "
            "every step as it is taken, check_finite=False not at all)")

    def _called_back(self, grad_callback: Callable[[list[Tensor | None]], Sequence[Tensor | None]], loss: Tensor,
                     fast: list[Tensor], current: list[Tensor]) -> list[Tensor | None]:
        """higher's ``grad_callback`` applied to the gradients of all the fast weights; the optimizer's."""
        optimizer = self.optimizer
        grads = loss_gradients(loss, current, optimizer.step_count, first_order=optimizer.first_order,
                               check_finite=optimizer.check_finite, check_graph=optimizer.step_count == 0)
        every: list[Tensor | None] = [None] * len(fast)
        for j, g in zip(self._position, grads):
            every[j] = g
        called = list(grad_callback(every))
        if len(called) != len(fast):
            raise ValueError(f"step(grad_callback=...): the callback returned {len(called)} gradients for "
                             f"{len(fast)} fast weights; return one per fast weight (None where there is none)")
        return [called[j] for j in self._position]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


def _on(actual: torch.device, wanted: torch.device) -> bool:
    """Whether a tensor on ``actual`` is on ``wanted``: ``'cuda'`` (no index) means the current CUDA device,
    as ``tensor.to('cuda')`` does; ``'cpu:0'`` is the CPU."""
    if actual.type != wanted.type:
        return False
    if wanted.index is None:
        return actual.type != "cuda" or actual.index == torch.cuda.current_device()
    return actual.type == "cpu" or actual.index == wanted.index


def _same(a: Any, b: Any) -> bool:
    """``a`` and ``b`` are the same setting: the same object, or equal plain values. A tensor that does not
    require grad is compared by value (``b`` is a copy kept by :meth:`_Conversion.snapshot`): torch's
    schedulers change a tensor lr in place, keeping the object."""
    if isinstance(a, Tensor) and not a.requires_grad:
        return (isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                and bool(torch.equal(a, b)))
    if a is b:
        return True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    plain = (bool, int, float, str, type(None))
    return type(a) is type(b) and isinstance(a, plain) and a == b


class _Conversion:
    """``from_torch(optimizer)`` kept for the next block while the optimizer's groups keep their
    settings and parameters and it has no state (state is converted afresh every block)."""

    def __init__(self, optimizer: torch.optim.Optimizer, options: dict[str, Any]) -> None:
        self.groups = self.snapshot(optimizer)
        self.options = dict(options)
        self.twin = from_torch(optimizer, **options)

    @staticmethod
    def snapshot(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
        def kept(value: Any, key: str) -> Any:
            if key == "params":
                return tuple(value)
            if isinstance(value, (list, tuple)):
                return tuple(kept(v, key) for v in value)
            return value.clone() if isinstance(value, Tensor) and not value.requires_grad else value

        return [{k: kept(v, k) for k, v in g.items()} for g in optimizer.param_groups]

    def still_valid(self, optimizer: torch.optim.Optimizer, options: dict[str, Any]) -> bool:
        if optimizer.state or len(optimizer.param_groups) != len(self.groups):
            return False
        if options.keys() != self.options.keys() or not all(_same(v, self.options[k]) for k, v in options.items()):
            return False
        for group, kept in zip(optimizer.param_groups, self.groups):
            if group.keys() != kept.keys():
                return False
            for key, value in group.items():
                if key == "params":
                    if len(value) != len(kept["params"]) or any(p is not q for p, q in zip(value, kept["params"])):
                        return False
                elif not _same(value, kept[key]):
                    return False
        return True


_CONVERSIONS: weakref.WeakKeyDictionary[torch.optim.Optimizer, _Conversion] = weakref.WeakKeyDictionary()


def _converted(optimizer: torch.optim.Optimizer, starts: list[Tensor], options: dict[str, Any]) -> DifferentiableOptimizer:
    """``from_torch(optimizer, params=starts, **options)``, from a conversion kept across blocks."""
    if optimizer.state:
        return from_torch(optimizer, params=starts, **options)
    conversion = _CONVERSIONS.get(optimizer)
    if conversion is None or not conversion.still_valid(optimizer, options):
        conversion = _CONVERSIONS[optimizer] = _Conversion(optimizer, options)
    dopt = conversion.twin.bound_to(starts)
    dopt.param_groups = [dict(g) for g in dopt.param_groups]  # (a scheduler may edit a group in place)
    dopt.defaults = dict(dopt.defaults)
    return dopt


def _positions(layout: _Layout, originals: Sequence[Tensor]) -> list[int]:
    out = []
    for k, p in enumerate(originals):
        j = layout.position_of.get(id(p))
        if j is None:
            raise ValueError(f"innerloop: the optimizer's parameter {k} (shape {tuple(p.shape)}) is not a parameter "
                             "of the model; build the optimizer on model.parameters()")
        out.append(j)
    return out


@contextlib.contextmanager
def innerloop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | DifferentiableOptimizer,
    *,
    first_order: bool = False,
    copy_initial_weights: bool = False,
    track_higher_grads: bool = True,
    override: dict[str, list[Any]] | None = None,
    device: torch.device | str | None = None,
    check_finite: bool | None = None,
    **options: Any,
) -> Iterator[tuple[PatchedModule, PatchedOptimizer]]:
    """Yield ``(fmodel, dopt)``: ``model`` with fast weights and its differentiable optimizer.

    Args:
        model: the module to unroll.
        optimizer: a torch.optim optimizer over (some of) ``model``'s parameters,
            converted with :func:`diffopt.optim.from_torch` (state included), or a
            diffopt optimizer constructed on ``model``'s parameters.
        first_order: no graph through the inner gradients (first-order MAML);
            tensor hyperparameters still receive gradients through the updates.
        copy_initial_weights: if True the fast weights start from detached copies,
            so no meta-gradient reaches ``model``'s parameters (higher's default);
            diffopt's default is False, as MAML needs: the fast weights start as
            ``model``'s parameters themselves.
        track_higher_grads: False is higher's evaluation mode: the steps keep no graph (each new fast
            weight is a leaf), so no meta-gradient reaches the model and only the latest fast weights
            are kept.
        override: hyperparameters for the whole loop, as higher's ``innerloop_ctx(override=...)``:
            ``{"lr": [value]}`` for every parameter group or ``{"lr": [v0, v1, ...]}`` one per
            group; values may be tensors that require grad. ``dopt.step(loss, override=...)``
            overrides from that step on.
        device: higher's ``innerloop_ctx(device=...)``, which copies the model there: here ``fmodel`` is the
            model itself, so the model must already be on that device (``model.to(device)``).
        check_finite: ``None`` (default): when the block ends without an error, one check that every
            inner loss was finite (:class:`~diffopt.errors.NonFiniteError` naming the step; one
            synchronisation per block); ``True``: every step checks its loss and gradients as it is
            taken (a torch.optim optimizer's conversion gets ``check_finite=True``); ``False``: no check.
        **options: passed to ``from_torch`` (clipping, ...).

    Forwards of ``fmodel`` run attention on a twice-differentiable kernel when the steps keep a
    graph for second-order meta-gradients (see :mod:`diffopt.unroll.attention`).
    """
    if isinstance(optimizer, DifferentiableOptimizer):
        originals = optimizer.params
    elif isinstance(optimizer, torch.optim.Optimizer):
        originals = [p for g in optimizer.param_groups for p in g["params"]]
    else:
        raise TypeError(
            f"innerloop(optimizer=...): expected a torch.optim or diffopt optimizer, got "
            f"{type(optimizer).__name__}"
        )
    layout, params = _layout(model)
    if any(getattr(ref(), "gradient_checkpointing", None) is True for ref in layout.checkpointing):
        from .unroll.functional import refuse_activation_checkpointing  # (here: `import diffopt` stays light)

        refuse_activation_checkpointing(model, "innerloop", "to save memory over the inner steps, "
                                        "diffopt.unroll.InnerLoop(mode='checkpointed') recomputes whole steps "
                                        "correctly")
    if device is not None and not all(_on(p.device, torch.device(device)) for p in params):
        where = sorted({str(p.device) for p in params})
        raise ValueError(f"innerloop(device={str(device)!r}): the model's parameters are on {', '.join(where)}; "
                         "fmodel runs the model itself (higher runs a copy moved there), so move the model first: "
                         "model.to(device), then build its optimizer")
    positions = _positions(layout, originals)
    if copy_initial_weights:
        params = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    starts = [params[j] for j in positions]
    if isinstance(optimizer, DifferentiableOptimizer):
        if options:
            raise TypeError(f"innerloop: {', '.join(options)} are options of from_torch; give them to the "
                            f"diffopt optimizer's constructor instead")
        # A working copy: the caller's optimizer keeps its parameters, state and settings.
        dopt = optimizer.bound_to(starts, first_order=True if first_order or not track_higher_grads else None)
    else:
        options = {**options, "check_finite": True} if check_finite else options
        dopt = _converted(optimizer, starts, {"first_order": first_order or not track_higher_grads, **options})
    if override is not None:
        dopt.apply_override(override, "innerloop(override=...)")
    fmodel = PatchedModule(model, layout, params, track_higher_grads=track_higher_grads,
                           twice_differentiable=track_higher_grads and not first_order)
    inner = PatchedOptimizer(fmodel, dopt, positions, record_losses=check_finite is not False)
    yield fmodel, inner
    inner.check_recorded_losses()

