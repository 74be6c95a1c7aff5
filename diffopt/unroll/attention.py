"""Attention in graphs that are differentiated twice, and ops that cannot be.

PyTorch's fused attention kernels (``F.scaled_dot_product_attention`` and
everything built on it: ``nn.MultiheadAttention``, ``nn.Transformer*Layer``,
Hugging Face decoders with ``attn_implementation="sdpa"``) have a backward
without a derivative of its own — on CPU the flash kernel's backward raises
``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
implemented`` the moment a meta-gradient differentiates an inner gradient. The
MATH backend computes the same attention,

.. math:: \\mathrm{softmax}(QK^\\top/\\sqrt d + M)\\,V,

from matmuls and a softmax, all of which are differentiable to any order, and
every op of it has a ``vmap`` batching rule (the CPU flash kernel has none, so
under ``vmap`` torch loops over tasks with a performance warning).

The engine therefore runs exactly the forwards whose graph will be differentiated
twice under :func:`double_differentiable` (``sdpa_kernel(SDPBackend.MATH)``): an
inner step with ``graph="full"`` (second order, truncated windows, checkpointed
recomputation and the segment forward it replays, forward-mode JVPs), the inner
objective of an implicit hypergradient's Hessian-vector products, ``diffopt.innerloop``'s
forwards when it tracks higher-order gradients; and every forward under ``vmap``. All
other forwards — first-order steps in a task loop, query losses — keep the fused
kernel. The measurements behind the choice are in ``benchmarks/attention_backends.md``.
``InnerLoop(attention="blockwise")`` uses :mod:`diffopt.unroll.blockwise` instead of
MATH in those forwards (O(L·d) memory kept instead of O(L²), more recomputation).

:func:`check_double_backward` differentiates the first freshly built inner
gradients of a loop once more (one Hessian-vector product per ``InnerLoop``) and,
if an op has no double backward, raises :class:`SecondOrderUnavailable`
naming the module and the op, before the meta-gradient would fail in
``.backward()`` with PyTorch's bare message.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import SecondOrderUnavailable
from .blockwise import BlockwiseAttention

__all__ = ["SecondOrderUnavailable", "check_double_backward", "double_differentiable", "probe_double_backward"]

# Nodes PyTorch puts in a gradient graph where the op's derivative is missing
# (``not_implemented`` in derivatives.yaml) or was declared once-differentiable.
_MISSING = ("torch::autograd::NotImplemented", "torch::autograd::DelayedError")


ATTENTION = ("math", "blockwise")


@contextlib.contextmanager
def double_differentiable(enabled: bool = True, attention: str = "math") -> Iterator[None]:
    """Attention with a double backward inside the block (when ``enabled``): the MATH backend
    (``attention="math"``: differentiable to any order, batched by ``vmap``, O(L²) memory
    kept for the backward) or :mod:`diffopt.unroll.blockwise` (``"blockwise"``: the fused
    forward, a backward recomputed in blocks of rows, O(L·d) kept). Other ops are unaffected."""
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention!r}: choose 'math' or 'blockwise'")
    if not enabled:
        yield
        return
    if attention == "blockwise":
        with BlockwiseAttention():
            yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def probe_double_backward(grads: Sequence[Tensor | None], inputs: Sequence[Tensor]) -> str | None:
    """Differentiate ``grads`` (built with ``create_graph=True``) once more, as a meta-gradient
    will; ``None`` if that works, else the forward node PyTorch names for the op that fails
    (``CdistBackward0``, ``ScaledDotProductFlashAttentionForCpuBackward0``, a once-differentiable
    ``autograd.Function``'s node, ...) or the error's text when no node can be named."""
    pairs = [(g, torch.ones_like(g)) for g in grads if g is not None and g.requires_grad]
    wanted = [t for t in inputs if t.requires_grad]
    if not pairs or not wanted:
        return None
    try:
        torch.autograd.grad([g for g, _ in pairs], wanted, [o for _, o in pairs], retain_graph=True,
                            allow_unused=True)
    except (RuntimeError, NotImplementedError) as error:
        text = str(error)
        match = re.search(r"derivative for '?(?:aten::)?_?([A-Za-z0-9_]+?)_backward'? is not implemented", text)
        if match:
            return "".join(part.capitalize() for part in match.group(1).split("_")) + "Backward0"
        delayed = _delayed_nodes([g for g, _ in pairs])
        return delayed[0] if delayed else text.splitlines()[0]
    return None


def _delayed_nodes(tensors: Sequence[Tensor], limit: int = 200_000) -> list[str]:
    """Forward nodes under the ``DelayedError`` / ``NotImplemented`` nodes of a gradient graph."""
    found: list[str] = []
    seen: set[int] = set()
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.name() in _MISSING:
            found += [f.name() for f, _ in node.next_functions if f is not None][:1]
        stack.extend(f for f, _ in node.next_functions)
    return found


def _op_name(node_name: str) -> str:
    """``ScaledDotProductFlashAttentionForCpuBackward0`` -> ``scaled_dot_product_flash_attention_for_cpu``."""
    base = re.sub(r"Backward\d*$", "", node_name)
    return re.sub(r"(?<!^)([A-Z])", r"_\1", base).lower()


def modules_creating(model: nn.Module, forward: Callable[[], Any], node_names: Sequence[str],
                     original: nn.Module | None = None) -> list[str]:
    """Names of the innermost modules of ``model`` whose forward creates a node named in
    ``node_names``: ``forward()`` is run once more with hooks that compare the graph
    nodes of each module's output with those of its inputs. ``original``: the module
    ``model`` is a functional copy of (higher's), whose class names the error shows."""
    hits: dict[str, int] = {}
    inputs: dict[int, list[Any]] = {}
    labels = (original or model).named_modules()
    names = {id(m): f"{n or 'the model'} ({type(o).__name__})" for (n, m), (_, o) in zip(model.named_modules(), labels)}

    def grad_fns(value: Any) -> list[Any]:
        leaves = [value] if isinstance(value, Tensor) else (
            list(value.values()) if isinstance(value, dict) else list(value) if isinstance(value, (list, tuple))
            else [getattr(value, k) for k in ("logits", "last_hidden_state") if hasattr(value, k)])
        return [t.grad_fn for t in leaves if isinstance(t, Tensor) and t.grad_fn is not None]

    def pre(module: nn.Module, args: Any) -> None:
        inputs[id(module)] = grad_fns(args)

    def post(module: nn.Module, args: Any, output: Any) -> None:
        stop = {id(n) for n in inputs.pop(id(module), [])}
        stack, seen = grad_fns(output), set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen or id(node) in stop:
                continue
            seen.add(id(node))
            if node.name() in node_names and id(module) in names:
                hits[names[id(module)]] = len(seen)
            stack.extend(f for f, _ in node.next_functions)

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    try:
        with torch.enable_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    if not hits:
        return []
    smallest = min(hits.values())  # the innermost module reaches the fewest nodes
    return sorted(n for n, size in hits.items() if size == smallest)


def check_double_backward(grads: Sequence[Tensor | None], inputs: Sequence[Tensor], model: nn.Module,
                          forward: Callable[[], Any], mode: str, original: nn.Module | None = None) -> None:
    """Raise :class:`SecondOrderUnavailable` if ``grads`` (inner gradients built with
    ``create_graph=True`` from ``inputs``) cannot be differentiated again: the error names the
    module (found by re-running ``forward`` with hooks) and the op."""
    node = probe_double_backward(grads, inputs)
    if node is None:
        return
    named_node = node.endswith(("Backward0", "Backward1", "Backward"))
    where = modules_creating(model, forward, [node], original) if named_node else []
    op = f"aten::{_op_name(node)} (autograd node {node})" if node.endswith("Backward0") else node
    raise SecondOrderUnavailable(
        f"mode={mode!r} differentiates the inner gradients, but {', '.join(where) or 'a module of the model'} "
        f"uses {op}, whose backward has no derivative in PyTorch. Use mode='first_order' (or a zero-order "
        "mode, 'es' / 'pes', which needs no backward at all), or replace the op by one with a double backward"
    )
