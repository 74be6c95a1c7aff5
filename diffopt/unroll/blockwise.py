r"""Attention whose backward is differentiable and recomputes in blocks of query rows.

Second-order meta-gradients need attention's backward to be differentiable. The MATH
backend gives that by keeping every (L × L) probability matrix in the graph, O(L²) memory
per head. Rows of attention are independent,

.. math:: O_b = \mathrm{softmax}(Q_b K^\top s + M_b)\,V ,

so the first backward (``dQ_b``, and ``dK``, ``dV`` as sums over row blocks) and its own
derivative can be recomputed one block of rows at a time. :class:`_Attention` runs the fused
kernel forward and saves only ``Q, K, V``; its backward is :class:`_AttentionBackward`,
whose forward computes ``dQ, dK, dV`` block by block without keeping a graph and saves only
``Q, K, V, dO``; its backward (the double backward a meta-gradient runs) recomputes each
block's first backward and differentiates it (``torch.func.vjp`` of a ``torch.func.vjp``) —
O(block · L) transient memory, O(L · d) stored. Under a further differentiation
(forward-mode JVPs) it stays correct by building that graph on the saved tensors instead of
on detached copies.

Used by :func:`diffopt.unroll.attention.double_differentiable` with ``blockwise=True``
(``InnerLoop(attention="blockwise")``). Dropout, a mask that requires grad and ``vmap``
fall back to the MATH backend.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["BlockwiseAttention", "blockwise_attention"]

BLOCK = 64
_FUSED = torch._C._nn.scaled_dot_product_attention  # the kernel itself, never the routed name


def _math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return _safe_softmax(scores) @ v


def _safe_softmax(scores: Tensor) -> Tensor:
    """Softmax over the last dimension, 0 on a row whose every score is -inf (a query that may attend
    to nothing: Hugging Face's left padding), as the fused and MATH kernels give, instead of 0/0 = NaN;
    differentiable to every order (the masked rows get zero derivatives)."""
    dead = scores.amax(-1, keepdim=True) == float("-inf")
    return torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def _autocast_dtype(device: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes attention in on ``device``, or None outside autocast."""
    if _AUTOCAST_BY_DEVICE:
        enabled = torch.is_autocast_enabled(device)
    else:
        enabled = torch.is_autocast_cpu_enabled() if device == "cpu" else torch.is_autocast_enabled()
    if not enabled:
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device)
    return torch.get_autocast_cpu_dtype() if device == "cpu" else torch.get_autocast_gpu_dtype()


try:  # torch >= 2.4 takes the device type
    torch.is_autocast_enabled("cpu")
    _AUTOCAST_BY_DEVICE = True
except TypeError:
    _AUTOCAST_BY_DEVICE = False


def _rows(mask: Tensor | None, rows: slice) -> Tensor | None:
    if mask is None or mask.dim() < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., rows, :]


def _blocks(length: int, block: int) -> list[slice]:
    return [slice(i, min(i + block, length)) for i in range(0, length, block)]


def _reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a gradient over the dimensions ``like`` was broadcast along."""
    while grad.dim() > like.dim():
        grad = grad.sum(0)
    for d, (g, s) in enumerate(zip(grad.shape, like.shape)):
        if s == 1 and g != 1:
            grad = grad.sum(d, keepdim=True)
    return grad


class _AttentionBackward(torch.autograd.Function):
    """Forward: (dQ, dK, dV) of attention for the cotangent dO, block by block. Backward: its VJP."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, g: Tensor, mask: Tensor | None, scale: float,
                block: int) -> tuple[Tensor, Tensor, Tensor]:
        ctx.save_for_backward(q, k, v, g)
        ctx.mask, ctx.scale, ctx.block = mask, scale, block
        dq, dk, dv = [], torch.zeros_like(k), torch.zeros_like(v)
        kd, vd = k.detach().requires_grad_(), v.detach().requires_grad_()
        for rows in _blocks(q.shape[-2], block):
            with torch.enable_grad():
                qb = q[..., rows, :].detach().requires_grad_()
                out = _math(qb, kd, vd, _rows(mask, rows), scale)
                gq, gk, gv = torch.autograd.grad(out, (qb, kd, vd), g[..., rows, :])
            dq.append(gq)
            dk, dv = dk + _reduce_to(gk, k), dv + _reduce_to(gv, v)
        return torch.cat(dq, dim=-2), dk, dv

    @staticmethod
    def backward(ctx: Any, ddq: Tensor | None, ddk: Tensor | None, ddv: Tensor | None) -> Any:
        q, k, v, g = ctx.saved_tensors
        mask, scale, block = ctx.mask, ctx.scale, ctx.block
        # Differentiated again (forward-mode JVPs): the result must stay a function of the saved
        # tensors, which depend on each other (dO on Q, K, V), so the partial derivatives are taken
        # with torch.func.vjp over independent arguments instead of detached leaves.
        keep = torch.is_grad_enabled()
        ddq = torch.zeros_like(q) if ddq is None else ddq
        ddk = torch.zeros_like(k) if ddk is None else ddk
        ddv = torch.zeros_like(v) if ddv is None else ddv
        gq_all, gg_all = [], []
        gk_all, gv_all = torch.zeros_like(k), torch.zeros_like(v)
        for rows in _blocks(q.shape[-2], block):
            mask_rows = _rows(mask, rows)

            def first(qb: Tensor, kb: Tensor, vb: Tensor, gb: Tensor) -> tuple[Tensor, ...]:
                _, pullback = torch.func.vjp(lambda a, b, c: _math(a, b, c, mask_rows, scale), qb, kb, vb)
                return pullback(gb)

            inputs = (q[..., rows, :], k, v, g[..., rows, :])
            if not keep:
                inputs = tuple(t.detach() for t in inputs)
            _, pullback = torch.func.vjp(first, *inputs)
            second = pullback((ddq[..., rows, :], ddk, ddv))
            gq_all.append(second[0])
            gk_all, gv_all = gk_all + _reduce_to(second[1], k), gv_all + _reduce_to(second[2], v)
            gg_all.append(second[3])
        return torch.cat(gq_all, dim=-2), gk_all, gv_all, torch.cat(gg_all, dim=-2), None, None, None


class _Attention(torch.autograd.Function):
    """Forward: the fused kernel, saving only Q, K, V. Backward: :class:`_AttentionBackward`."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, block: int) -> Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.mask, ctx.scale, ctx.block = mask, scale, block
        return _FUSED(q, k, v, attn_mask=mask, scale=scale)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Any:
        q, k, v = ctx.saved_tensors
        dq, dk, dv = _AttentionBackward.apply(q, k, v, g, ctx.mask, ctx.scale, ctx.block)
        return dq, dk, dv, None, None, None


def blockwise_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                        dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                        enable_gqa: bool = False, block: int = BLOCK) -> Tensor:
    """``F.scaled_dot_product_attention`` with a backward that is differentiable in blocks."""
    batched = torch._C._functorch.is_batchedtensor(query) or torch._C._functorch.is_functorch_wrapped_tensor(query)
    mask_grad = isinstance(attn_mask, Tensor) and attn_mask.requires_grad
    if dropout_p > 0 or batched or mask_grad:  # MATH: differentiable to any order, batched by vmap
        with sdpa_kernel([SDPBackend.MATH]):
                return _FUSED(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    low = _autocast_dtype(query.device.type)
    if low is not None:  # as autocast casts the fused kernel's inputs: the backward (run outside autocast)
        # then recomputes in the forward's precision on one dtype (LLaMA's RoPE leaves Q, K in float32)
        query, key, value = (t.to(low) for t in (query, key, value))
        if isinstance(attn_mask, Tensor) and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(low)
    if is_causal:
        attn_mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    return _Attention.apply(query, key, value, attn_mask, scale, block)


class BlockwiseAttention:
    """Inside the block, ``torch.nn.functional.scaled_dot_product_attention`` is
    :func:`blockwise_attention` — which reaches ``nn.MultiheadAttention``, the Transformer
    layers and Hugging Face's ``sdpa`` attention, all of which look the name up at call time
    (a ``TorchFunctionMode`` would not: it does not see calls nested in
    ``F.multi_head_attention_forward``). Restored on exit; not for concurrent threads."""

    def __init__(self, block: int = BLOCK) -> None:
        self.block = block
        self.saved: Any = None

    def __enter__(self) -> "BlockwiseAttention":
        self.saved = F.scaled_dot_product_attention
        block = self.block

        def routed(*args: Any, **kwargs: Any) -> Tensor:
            return blockwise_attention(*args, **kwargs, block=block)

        F.scaled_dot_product_attention = routed
        return self

    def __exit__(self, *exc: Any) -> None:
        F.scaled_dot_product_attention = self.saved
