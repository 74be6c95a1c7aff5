"""Norm-type reductions with torch's forward values and derivatives finite at zero.

Adafactor and Muon scale their updates by Euclidean norms. ``torch.linalg.vector_norm``
has the derivative ``x / ||x||``, which autograd computes as 0 at ``x = 0`` for the
first order but whose second order is ``0 * inf = NaN``: a parameter whose
gradient is exactly zero (an unused embedding row, a dead unit) would poison a
meta-gradient. The functions here return exactly torch's values (the same kernels,
so trajectories stay bit-identical to torch.optim) and take their derivatives
from closed forms that are finite to every order:

* :func:`safe_norm` — ``||x||_2`` over some dimensions; derivative ``x / ||x||``,
  taken as 0 where ``||x|| = 0`` (the subgradient of least norm);
* :func:`mean_square` — ``||x||^2 / n`` along one dimension, computed as torch's
  Adafactor computes it (``norm(x, dim).square() / n``), with the derivative
  ``2x / n`` of the smooth function it is.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _masked_ratio(numerator: Tensor, norm: Tensor) -> Tensor:
    """``numerator / norm`` with 0 where ``norm == 0`` (both ``where`` calls keep every order finite)."""
    at_zero = norm == 0
    return torch.where(at_zero, 0.0, numerator) / torch.where(at_zero, 1.0, norm)


class _SafeNorm(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, dims: tuple[int, ...] | None) -> Tensor:  # type: ignore[override]
        if dims is None:
            return x.norm(2)  # torch.optim's own call (Adafactor's RMS of the parameter, Muon's scaling)
        if not dims:  # a 0-dim parameter batched over tasks: one norm per element (dim=() would mean all)
            return x.abs()
        return torch.linalg.vector_norm(x, 2, dim=dims, keepdim=True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, _ = inputs
        ctx.save_for_backward(x, output)
        ctx.save_for_forward(x, output)
        ctx.dims = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        x, norm = ctx.saved_tensors
        return _masked_ratio(grad, norm) * x, None

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, _: Any) -> Tensor:  # type: ignore[override]
        x, norm = ctx.saved_tensors
        if ctx.dims is None:
            inner = (x * tangent).sum()
        else:
            inner = (x * tangent).sum(dim=ctx.dims, keepdim=True) if ctx.dims else x * tangent
        return _masked_ratio(inner, norm)


def safe_norm(x: Tensor, dims: tuple[int, ...] | None = None) -> Tensor:
    """``x.norm(2)`` (``dims=None``) or the 2-norm over ``dims`` (kept as size-1 dimensions; ``dims=()``:
    over none, ``|x|`` per element).

    Forward values are torch's; the derivative ``x / ||x||`` is 0 where the norm is 0,
    and every higher derivative is finite.
    """
    if not torch.is_grad_enabled():
        return _SafeNorm.forward(x, dims)
    return _SafeNorm.apply(x, dims)


class _MeanSquare(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, dim: int) -> Tensor:  # type: ignore[override]
        # torch.optim.Adafactor: ``torch.norm(grad, dim=dim, keepdim=True).square_().div_(grad.size(dim))``
        return torch.norm(x, dim=dim, keepdim=True).square() / x.size(dim)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, dim = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.dim = dim

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * x * (2.0 / x.size(ctx.dim)), None

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, _: Any) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return (x * tangent).sum(dim=ctx.dim, keepdim=True) * (2.0 / x.size(ctx.dim))


def mean_square(x: Tensor, dim: int) -> Tensor:
    """``mean(x * x, dim, keepdim=True)`` with torch.optim.Adafactor's rounding, smooth to every order."""
    if not torch.is_grad_enabled():
        return _MeanSquare.forward(x, dim)
    return _MeanSquare.apply(x, dim)
