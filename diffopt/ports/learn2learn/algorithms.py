r"""learn2learn's ``MAML`` and ``MetaSGD``: ``clone()``, ``adapt(loss)``, ``learner(x)``.

MAML (Finn, Abbeel & Levine, 2017) adapts a clone of the model to each task by
gradient steps :math:`\phi \leftarrow \phi - \alpha \nabla_\phi \mathcal{L}_S(\phi)`,
starting from :math:`\phi = \theta`; the query loss of the adapted clone is
differentiated with respect to :math:`\theta` (second order unless ``first_order``).
Meta-SGD (Li et al., 2017) learns an :math:`\alpha` per element:
:math:`\phi \leftarrow \phi - \alpha \odot \nabla_\phi \mathcal{L}_S(\phi)`.

A clone is a shallow copy of the module tree whose parameter slots hold the fast
weights (plain tensors on the graph); buffers are shared with the original, as in
learn2learn. ``adapt`` takes one step of a diffopt optimizer and installs the result
in a fresh copy of the tree, so no tensor that autograd needs is ever overwritten.

The per-task loop these classes serve is the familiar path; for speed, the
task-batched :class:`diffopt.algorithms.MAML` computes the same meta-gradient for a
whole meta-batch in one vectorised unroll (``docs/porting/learn2learn.md``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...optim import SGD, DifferentiableOptimizer
from ...optim._gradients import loss_gradients
from ...optim.learned.lr import LearnedSGD

__all__ = ["MAML", "MetaSGD", "clone_module"]


def clone_module(module: nn.Module, params: dict[int, Tensor] | None = None) -> nn.Module:
    """A shallow copy of ``module``'s tree whose parameter slots hold ``params[id(old)]``
    (default: the same tensors). Tied parameters stay tied; buffers are shared."""
    params = params if params is not None else {}
    copy = module.__new__(type(module))
    copy.__dict__ = module.__dict__.copy()
    copy._parameters = {key: (None if p is None else params.get(id(p), p))
                        for key, p in module._parameters.items()}
    copy._buffers = dict(module._buffers)
    copy._modules = {key: (None if m is None else clone_module(m, params)) for key, m in module._modules.items()}
    if isinstance(copy, nn.RNNBase):
        copy._init_flat_weights()  # its own list of the weights the RNN kernels read, not the original's
    return copy


class _Learner(nn.Module):
    """What learn2learn's learners share: the wrapped ``module``, ``forward`` and the
    attribute fallback to the module (``learner.features`` reaches ``module.features``)."""

    module: nn.Module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError as error:
            modules = self.__dict__.get("_modules", {})
            if "module" in modules:
                return getattr(modules["module"], name)
            raise error

    #: how to let ``adapt`` leave frozen / unused parameters alone (MAML's options; MetaSGD has none,
    #: as in learn2learn, where every parameter has its rate)
    _nograd_fix = "pass allow_nograd=True to leave frozen parameters unadapted (as learn2learn suggests)"
    _unused_fix = "pass allow_unused=True to leave unused parameters unchanged"

    def _adapted_parameters(self, allow_nograd: bool) -> list[Tensor]:
        params = list(self.module.parameters())
        if not allow_nograd:
            frozen = [name for name, p in self.module.named_parameters() if not p.requires_grad]
            if frozen:
                raise ValueError(f"adapt: parameter {frozen[0]!r} does not require grad; {self._nograd_fix}, or "
                                 "call requires_grad_() on it")
        return params

    def _cached(self, key: Any, build: Any) -> DifferentiableOptimizer:
        """The learner's optimizer for ``key`` (first order, rate), built once: building one validates every
        group (about 0.1 ms), as much as the step itself on a small model. Its ``step(params=...)`` takes each
        adaptation's current weights."""
        cache = self.__dict__.setdefault("_optimizers", {})
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def _step(self, optimizer: DifferentiableOptimizer, loss: Tensor, params: Sequence[Tensor],
              allow_unused: bool, first_order: bool) -> None:
        try:
            grads = loss_gradients(loss, params, 0, first_order=first_order, check_finite=True)
        except ValueError as error:
            if "parameters this step updates" not in str(error):
                raise  # (a loss under no_grad, frozen weights: loss_gradients' own message says what to do)
            raise ValueError(
                "adapt(loss): the loss does not depend on this learner's weights, so the step would change "
                "nothing; compute it with the clone, learner(x), not with the wrapped model or maml(x)"
            ) from error
        if not allow_unused:
            names = [name for name, _ in self.module.named_parameters()]
            for name, p, g in zip(names, params, grads):
                if p.requires_grad and g is None:
                    raise ValueError(f"adapt: the loss does not depend on parameter {name!r}; {self._unused_fix}")
        new = optimizer.step(params=params, grads=grads)
        self.module = clone_module(self.module, {id(old): p for old, p in zip(params, new)})


class MAML(_Learner):
    """learn2learn's ``MAML``: wrap ``model``; ``clone()`` per task, ``adapt(loss)``, ``learner(x)``.

    Args:
        model: the module whose parameters are the initialisation θ.
        lr: α, the adaptation learning rate (a number or a tensor; a tensor that
            requires grad receives the meta-gradient).
        first_order: no graph through the inner gradients (FOMAML).
        allow_unused: let ``adapt`` leave parameters the loss does not use unchanged
            (default: ``allow_nograd``); otherwise it is an error naming the parameter.
        allow_nograd: leave parameters with ``requires_grad=False`` unadapted; otherwise
            it is an error naming the parameter.

    Example (learn2learn's, unchanged but for the import)::

        import diffopt.ports.learn2learn as l2l
        maml = l2l.algorithms.MAML(model, lr=0.01)
        learner = maml.clone()
        learner.adapt(loss_fn(learner(x_support), y_support))
        loss_fn(learner(x_query), y_query).backward()   # gradients in model's .grad
    """

    def __init__(self, model: nn.Module, lr: float | Tensor, first_order: bool = False,
                 allow_unused: bool | None = None, allow_nograd: bool = False) -> None:
        super().__init__()
        self.module = model
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused

    def adapt(self, loss: Tensor, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> None:
        """One SGD step ``φ ← φ − lr·∇φ loss`` on the clone's weights (a new graph node, never in place)."""
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        params = self._adapted_parameters(allow_nograd)
        rate = id(self.lr) if isinstance(self.lr, Tensor) else self.lr
        optimizer = self._cached((first_order, rate), lambda: SGD(params, lr=self.lr, first_order=first_order))
        self._step(optimizer, loss, params, allow_unused, first_order)

    def clone(self, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> MAML:
        """A learner for one task: the same weights (on the graph), adapted without touching ``self``."""
        return MAML(
            clone_module(self.module), lr=self.lr,
            first_order=self.first_order if first_order is None else first_order,
            allow_unused=self.allow_unused if allow_unused is None else allow_unused,
            allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd,
        )


class MetaSGD(_Learner):
    """learn2learn's ``MetaSGD``: a learnable learning rate per element, ``lrs``.

    Args:
        model: the module whose parameters are θ.
        lr: the initial value of every rate (learn2learn's default 1.0).
        first_order: no graph through the inner gradients.
        lrs: the rates (one tensor per parameter); default ``lr`` everywhere, as
            ``nn.Parameter``\\ s that ``meta_sgd.parameters()`` includes.
    """

    _nograd_fix = _unused_fix = ("MetaSGD adapts every parameter of the model with its own rate (as learn2learn's "
                                 "does); wrap only the part to adapt, e.g. MetaSGD(model.head), or use MAML with "
                                 "allow_unused=True / allow_nograd=True")

    def __init__(self, model: nn.Module, lr: float = 1.0, first_order: bool = False,
                 lrs: Sequence[Tensor] | None = None) -> None:
        super().__init__()
        self.module = model
        if lrs is None:
            lrs = nn.ParameterList([nn.Parameter(torch.ones_like(p) * lr) for p in model.parameters()])
        self.lrs = lrs
        self.first_order = first_order

    def adapt(self, loss: Tensor, first_order: bool | None = None) -> None:
        """One Meta-SGD step ``φ ← φ − α ⊙ ∇φ loss``."""
        first_order = self.first_order if first_order is None else first_order
        params = self._adapted_parameters(allow_nograd=False)
        optimizer = self._cached((first_order, tuple(id(lr) for lr in self.lrs)),
                                 lambda: LearnedSGD(params, list(self.lrs), "meta_sgd", first_order=first_order))
        self._step(optimizer, loss, params, allow_unused=False, first_order=first_order)

    def clone(self) -> MetaSGD:
        """A learner for one task, with the rates on the graph (their meta-gradient reaches ``self.lrs``)."""
        return MetaSGD(clone_module(self.module), lrs=[lr.clone() for lr in self.lrs], first_order=self.first_order)
