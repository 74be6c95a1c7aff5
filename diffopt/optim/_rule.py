"""The pure update-rule interface and the numerics every rule shares.

An update rule is pure: ``init_state(param, hp) -> state`` and
``update_one(param, grad, state, hp) -> (new_param, new_state)``, with nothing
written in place into a tensor that autograd may need. The maths is elementwise,
so a rule works unchanged on weights that carry a leading task dimension.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Union

import torch
from torch import Tensor

from ._gradients import inside_torch_func
from ._hyper import leaves, maximum_of, minimum_of

State = dict[str, Any]
Hyper = Mapping[str, Any]


def _sqrt_derivative(grad: Tensor, root: Tensor) -> Tensor:
    """``grad / (2 sqrt x)``, taken as 0 where ``sqrt x == 0``.

    Both ``where`` calls keep the masked entries away from the division, so the
    expression has finite derivatives of every order (a bare
    ``where(root == 0, 0, grad / (2 * root))`` would give ``0 * inf = NaN`` one
    order further).
    """
    at_zero = root == 0
    return torch.where(at_zero, 0.0, grad) / (2 * torch.where(at_zero, 1.0, root))


class _SafeSqrt(torch.autograd.Function):
    """Elementwise square roots of any number of tensors, with derivative 0 at 0."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*xs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        if inside_torch_func():  # vmap has no batching rule for the _foreach_* operations
            return tuple(torch.sqrt(x) for x in xs)
        return tuple(torch._foreach_sqrt(list(xs)))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: tuple[Tensor, ...]) -> None:
        ctx.save_for_backward(*output)
        ctx.save_for_forward(*output)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(_sqrt_derivative(g, root) for g, root in zip(grads, ctx.saved_tensors))

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(_sqrt_derivative(t, root) for t, root in zip(tangents, ctx.saved_tensors))


def safe_sqrt_all(xs: Sequence[Tensor]) -> list[Tensor]:
    """``torch.sqrt`` of every tensor in ``xs``, with a finite derivative at zero.

    Forward values are exactly ``torch.sqrt(x)`` (NaN stays NaN for x < 0). Where
    ``x == 0`` the derivative is taken as 0 instead of +inf, so second-order
    gradients through Adam-style denominators stay finite for unused parameters
    and zero gradients (the ``inf * 0 = NaN`` trap in higher's optimizers). One
    autograd node for the whole list; differentiable to every order.

    Under ``torch.no_grad()`` it is the plain ``torch._foreach_sqrt``. (Grad mode,
    not ``requires_grad``, decides: inside ``torch.func`` transforms, forward
    mode included, tensors do not report ``requires_grad``.)
    """
    xs = list(xs)
    if torch.is_grad_enabled():
        return list(_SafeSqrt.apply(*xs))
    return [torch.sqrt(x) for x in xs] if inside_torch_func() else list(torch._foreach_sqrt(xs))


def safe_sqrt(x: Tensor) -> Tensor:
    """:func:`safe_sqrt_all` of one tensor."""
    return _SafeSqrt.apply(x)[0] if torch.is_grad_enabled() else torch.sqrt(x)


def scalar_state_dtype() -> torch.dtype:
    """The dtype torch.optim uses for scalar state (``step``, ``eta``, ``mu_product``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def round_like_torch_state(value: float) -> float:
    """``value`` after a round trip through torch.optim's scalar-state dtype.

    ASGD's ``eta``/``mu`` and NAdam's ``mu_product`` live in float32 tensors
    unless the default dtype is float64; the exact twin rounds the same way.
    """
    if scalar_state_dtype() == torch.float64:
        return float(value)
    return struct.unpack("f", struct.pack("f", value))[0]


Scalar = Union[float, Tensor]  # a number, or a 0-dim tensor (a learnable learning rate)


def _per_tensor(value: Scalar | Sequence[Scalar], count: int) -> Any:
    """A multiplier for ``torch._foreach_mul``: a number as it is, a 0-dim tensor repeated.

    (The ``_foreach_mul(list, Tensor)`` overload's backward fails in torch 2.13; the list
    overload with the tensor repeated is differentiable to every order.)
    """
    if isinstance(value, Tensor):
        return [value] * count
    return value if isinstance(value, (int, float)) else list(value)


def scale_all(tensors: Sequence[Tensor], factor: Scalar | Sequence[Scalar]) -> list[Tensor]:
    """``[t * factor ...]``; ``factor``: a number, a 0-dim tensor or one of those per tensor."""
    return list(torch._foreach_mul(list(tensors), _per_tensor(factor, len(tensors))))


def add_scaled_all(tensors: Sequence[Tensor], others: Sequence[Tensor], factor: Scalar) -> list[Tensor]:
    """``[t + factor * o ...]``: ``torch.add(t, o, alpha=factor)`` for a number (torch's own
    arithmetic), ``torch.addcmul(t, o, factor)`` for a 0-dim tensor (which ``alpha`` cannot take):
    torch.optim's arithmetic for a learnable lr, bit for bit equal to ``add(alpha=float(factor))``
    (``t + o * factor`` rounds the product first: the last bit differs for about 5% of elements).
    The multi-tensor ``_foreach_addcmul`` is as fast as the product and sum it replaces in an
    unrolled loop and 0.6x their time in a single step (20 tensors of an MLP, one thread).

    On CPU under autograd the adds are taken tensor by tensor: the same kernel as
    ``torch._foreach_add`` (whose CPU implementation loops over ``add``), so the same bits.
    ``_foreach_add``'s autograd node there (a generic ``CppFunction``) makes every later
    step of an unrolled loop slower: the first-order sinusoid MAML step with 10 inner steps
    took 1.57x the hand-written floor with it and 1.23x without, interleaved in one process
    (``benchmarks/RESULTS.md`` section 10)."""
    if isinstance(factor, Tensor):
        return list(torch._foreach_addcmul(list(tensors), list(others), _per_tensor(factor, len(tensors))))
    if _taped_on_cpu(tensors, others):
        return [torch.add(t, o, alpha=factor) for t, o in zip(tensors, others)]
    return list(torch._foreach_add(list(tensors), list(others), alpha=factor))


def _taped_on_cpu(*lists: Sequence[Tensor]) -> bool:
    """Whether autograd records an operation on these CPU tensors."""
    first = lists[0][0] if lists and lists[0] else None
    return (first is not None and first.device.type == "cpu" and torch.is_grad_enabled()
            and any(t.requires_grad for ts in lists for t in ts))


def addcdiv_all(tensors: Sequence[Tensor], numerators: Sequence[Tensor], denominators: Sequence[Tensor],
                value: Scalar | Sequence[Scalar] = 1.0) -> list[Tensor]:
    """``[torch.addcdiv(t, n, d, value=value) ...]`` for a whole list, bit for bit in float32/64.

    ``value``: a number, a 0-dim tensor, or one of those per tensor.

    torch's CPU kernel computes ``t + value * n / d`` left to right; this builds
    the same arithmetic from ``_foreach_mul``, ``_foreach_div`` and
    ``_foreach_add`` because ``torch._foreach_addcdiv``'s double backward fails
    on lists of differently shaped tensors in torch 2.13 ("select(): index out
    of range"; tests/test_optim_hypergradients.py keeps a probe of it).
    """
    scaled = list(numerators) if isinstance(value, (int, float)) and value == 1 else scale_all(numerators, value)
    return list(torch._foreach_add(list(tensors), torch._foreach_div(scaled, list(denominators))))


def moving_average_of_squares(averages: Sequence[Tensor], values: Sequence[Tensor], decay: float) -> list[Tensor]:
    """``decay * a + (1 - decay) * v * v`` for every pair, as torch.optim computes it
    (``a.mul_(decay).addcmul_(v, v, value=1 - decay)``), in two multi-tensor operations."""
    return list(torch._foreach_addcmul(torch._foreach_mul(list(averages), decay), values, values, value=1 - decay))


def common_value(states: Sequence[State], key: str) -> Any:
    """``states[k][key]``, the same for every state, or ``None`` when they differ."""
    first = states[0][key]
    return first if all(s[key] is first or bool(s[key] == first) for s in states[1:]) else None


def nonzero(value: Any) -> bool:
    """Whether a hyperparameter term must be applied (tensors always are)."""
    return isinstance(value, Tensor) or value != 0


def _real_view(value: Any) -> Any:
    return torch.view_as_real(value) if isinstance(value, Tensor) and value.is_complex() else value


def _complex_view(value: Any, was_complex: bool) -> Any:
    return torch.view_as_complex(value.contiguous()) if was_complex and isinstance(value, Tensor) else value


def _mixes_dtypes_when_0dim(param: Tensor, hp: Hyper) -> bool:
    """A 0-dim parameter with a 0-dim floating tensor hyperparameter of another dtype: two 0-dim
    operands, so torch's type promotion would make the result that dtype (float32 -> float64)."""
    return param.dim() == 0 and any(
        isinstance(leaf, Tensor) and leaf.dim() == 0 and leaf.is_floating_point() and leaf.dtype != param.dtype
        for value in hp.values() for leaf in leaves(value)
    )


def per_element_in_param_dtype(param: Tensor, hp: Hyper) -> Hyper:
    """``hp`` with every floating hyperparameter tensor of one or more dimensions (per element) in the
    parameter's real dtype (``float32`` for a ``complex64`` one), also inside tuples (``betas``): rounded
    (differentiably) as a number or a 0-dim tensor hyperparameter is by type promotion. Left in its own
    dtype, a float64 lr would make a float32 weight and its state float64 (SGD, Rprop's step sizes) or
    fail inside torch (Adam's lerp)."""
    dtype = param.real.dtype if param.is_complex() else param.dtype

    def cast(value: Any) -> Any:
        if isinstance(value, Tensor) and value.dim() > 0 and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        if isinstance(value, tuple):
            return tuple(cast(v) for v in value)
        return value

    if not any(isinstance(leaf, Tensor) and leaf.dim() > 0 for value in hp.values() for leaf in leaves(value)):
        return hp
    return {k: cast(v) for k, v in hp.items()}


def update_one_like_torch(rule: "UpdateRule", param: Tensor, grad: Tensor, state: State,
                          hp: Hyper) -> tuple[Tensor, State]:
    """``rule.update_one``, with torch.optim's conventions for the two cases its elementwise maths
    does not cover by itself:

    * a complex parameter is updated as ``torch.view_as_real(param)`` (real and imaginary parts
      as independent coordinates), its gradient and complex state likewise, as torch.optim does;
      the results are viewed back as complex;
    * a 0-dim parameter meeting a 0-dim tensor hyperparameter of another dtype (a float64 ``lr``
      for a float32 scalar) is updated as shape ``(1,)``, where the parameter's dtype wins type
      promotion as it does for every other shape, and reshaped back.

    (A per-element hyperparameter of another dtype is rounded to the parameter's before, by
    :func:`per_element_in_param_dtype`, in ``DifferentiableOptimizer.tensor_hyperparameters``.)
    """
    if param.is_complex():
        complex_keys = {k for k, v in state.items() if isinstance(v, Tensor) and v.is_complex()}
        real_hp = {k: (v.unsqueeze(-1) if isinstance(v, Tensor) and v.dim() > 0 else v) for k, v in hp.items()}
        new, new_state = rule.update_one(torch.view_as_real(param), _real_view(grad),
                                         {k: _real_view(v) for k, v in state.items()}, real_hp)
        return torch.view_as_complex(new.contiguous()), {k: _complex_view(v, k in complex_keys)
                                                         for k, v in new_state.items()}
    if not _mixes_dtypes_when_0dim(param, hp):
        return rule.update_one(param, grad, state, hp)
    reshaped = {k for k, v in state.items() if isinstance(v, Tensor) and v.dim() == 0 and v.dtype == param.dtype}
    new, new_state = rule.update_one(param.reshape(1), grad.reshape(1),
                                     {k: v.reshape(1) if k in reshaped else v for k, v in state.items()}, hp)
    return new.reshape(()), {k: v.reshape(()) if k in reshaped or (isinstance(v, Tensor) and v.shape == (1,)
                                                                   and v.dtype == param.dtype) else v
                            for k, v in new_state.items()}


class UpdateRule:
    """Base class of the differentiable update rules.

    Subclasses set ``defaults`` (the torch.optim namesake's defaults, in its
    argument order), ``flags`` (boolean options) and implement
    :meth:`init_state`, :meth:`update_one` and :meth:`validate_group`.
    """

    name: ClassVar[str] = "rule"
    #: whether :meth:`update_group` takes ``hp["lr"]`` as a 0-dim tensor too
    group_lr_may_be_tensor: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {}
    flags: ClassVar[frozenset[str]] = frozenset({"maximize"})

    # -- per tensor ------------------------------------------------------------------
    def init_state(self, param: Tensor, hp: Hyper) -> State:
        return {"step": 0}

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        raise NotImplementedError

    # -- over a whole parameter group at once -----------------------------------------
    @classmethod
    def _nearest_defining(cls, *names: str) -> type:
        """The first class in the MRO whose own body defines one of ``names``."""
        return next(klass for klass in cls.__mro__ if any(name in vars(klass) for name in names))

    @classmethod
    def has_group_update(cls) -> bool:
        """Whether :meth:`update_group` may stand in for :meth:`update_one`.

        False when a subclass overrides ``update_one`` below the class that
        defines ``update_group``: a user rule derived from ``SGDRule`` that changes
        only ``update_one`` must not be bypassed by ``SGDRule.update_group``.
        """
        klass = cls._nearest_defining("update_group", "update_one")
        return klass is not UpdateRule and "update_group" in vars(klass)

    @classmethod
    def group_update_takes_tensor_lr(cls) -> bool:
        """Whether the class defining the :meth:`update_group` in use declared
        ``group_lr_may_be_tensor`` itself: a user rule that overrides ``update_group``
        for number hyperparameters does not inherit a built-in rule's promise."""
        return bool(vars(cls._nearest_defining("update_group")).get("group_lr_may_be_tensor", False))

    def update_group(
        self, params: list[Tensor], grads: list[Tensor], states: list[State], hp: Hyper
    ) -> tuple[list[Tensor], list[State]] | None:
        """Optional multi-tensor step of a group whose hyperparameters are plain numbers.

        ``hp`` is shared by every tensor (no ``task_dims``: only elementwise rules
        implement this), and every state has the same ``"step"`` (the optimizer
        calls this once per step count). Every hyperparameter is a plain number,
        except ``lr``, which may also be a 0-dim tensor (a learnable learning
        rate) when the rule sets ``group_lr_may_be_tensor``. The result must
        equal :meth:`update_one` applied to each tensor; built from
        ``torch._foreach_*`` operations, which autograd
        differentiates to every order, it costs one dispatch per operation
        instead of one per operation and tensor. Return ``None`` where the
        per-tensor path must be taken (the default).
        """
        return None

    def state_from_torch(self, state: Mapping[str, Any], param: Tensor) -> State:
        """Our state from the torch.optim namesake's (tensors cloned, ``step`` as an int)."""
        converted: State = {}
        for key, value in state.items():
            if key == "step":
                converted[key] = int(float(value))
            elif isinstance(value, Tensor):
                converted[key] = value.detach().clone()
            else:
                converted[key] = value
        return converted

    # -- validation ------------------------------------------------------------------
    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        """Raise ``ValueError`` naming the argument for invalid values."""
        for flag in self.flags:
            if flag in group and not isinstance(group[flag], bool):
                raise TypeError(f"{where}: {flag} must be True or False, got {group[flag]!r}")
        if "lr" in group:
            check_range(group["lr"], "lr", where, low=0.0)
        if "eps" in group:
            check_range(group["eps"], "eps", where, low=0.0, low_inclusive=False,
                        why=" (with eps = 0 a gradient coordinate that stays 0 is updated by 0 / 0 = NaN, in torch.optim "
                            "too; use a tiny eps such as 1e-12)")
        if "weight_decay" in group:
            check_range(group["weight_decay"], "weight_decay", where, low=0.0)
        if "betas" in group:
            beta1, beta2 = check_pair(group["betas"], "betas", where)
            check_range(beta1, "betas[0]", where, low=0.0, high=1.0)
            check_range(beta2, "betas[1]", where, low=0.0, high=1.0)

    def describe(self) -> str:
        return self.name


def check_range(
    value: Any,
    name: str,
    where: str,
    *,
    low: float | None = None,
    high: float | None = None,
    high_inclusive: bool = False,
    low_inclusive: bool = True,
    finite: bool = True,
    why: str = "",
) -> None:
    """Check every number inside a (possibly tensor or wrapped) hyperparameter: not NaN, within the
    bounds, and finite unless ``finite=False`` (a bound that may be switched off with ``inf``, such as
    Rprop's largest step). An infinite rate or decay is accepted by torch.optim and turns the weights
    into inf or NaN on the first step; here it is refused where it is set. ``why`` ends a bound's message."""
    for leaf in leaves(value):
        if isinstance(leaf, Tensor):
            if not (leaf.is_floating_point() or leaf.is_complex()):
                raise TypeError(f"{where}: {name} must be a floating-point tensor, got dtype {leaf.dtype}")
            if leaf.numel() == 0:
                continue  # nothing to check (a per-element value of an empty parameter; shapes are checked elsewhere)
            lo, hi = minimum_of(leaf), maximum_of(leaf)
        elif isinstance(leaf, bool) or not isinstance(leaf, (int, float)):
            raise TypeError(f"{where}: {name} must be a number or a tensor, got {leaf!r}")
        else:
            lo = hi = float(leaf)
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError(f"{where}: {name} contains NaN")
        if finite and (math.isinf(lo) or math.isinf(hi)):
            raise ValueError(f"{where}: invalid {name} {lo if math.isinf(lo) else hi!r}; it must be finite "
                             "(an infinite value makes the weights inf or NaN on the first step)")
        if low is not None and (lo < low or (not low_inclusive and lo == low)):
            bound = f">= {low}" if low_inclusive else f"> {low}"
            raise ValueError(f"{where}: invalid {name} {lo!r}; it must be {bound}{why}")
        if high is not None and (hi > high or (not high_inclusive and hi == high)):
            bound = f"<= {high}" if high_inclusive else f"< {high}"
            raise ValueError(f"{where}: invalid {name} {hi!r}; it must be {bound}{why}")


def check_pair(value: Any, name: str, where: str) -> tuple[Any, Any]:
    if not isinstance(value, tuple) or len(value) != 2:
        if isinstance(value, list) and len(value) == 2:
            return value[0], value[1]
        raise TypeError(f"{where}: {name} must be a pair (a, b), got {value!r}")
    return value
