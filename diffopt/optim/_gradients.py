"""The gradients a differentiable step takes, and the checks that keep a step from being
silently wrong (a non-scalar or non-finite loss, a loss that does not depend on the
parameters being stepped, a non-finite gradient)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

from ..errors import NonFiniteError


def inside_torch_func() -> bool:
    """Whether a ``torch.func`` transform (grad, vjp, jvp, jacrev, jacfwd, vmap) is running: torch has no
    public query for it; its functorch interpreter stack is empty outside every transform."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None

NOT_CONNECTED_FIX = (
    "compute the loss from the optimizer's current parameters: `params = opt.step(loss)` returns "
    "them, and the next loss must be a function of those tensors (e.g. torch.func.functional_call(net, "
    "dict(zip(names, params)), x)), not of net(x), whose weights never change; or let "
    "diffopt.innerloop(net, opt) patch the model for you"
)


#: autograd nodes of PyTorch's fused attention kernels, whose backward has no backward of its own
FUSED_ATTENTION_NODES = ("FlashAttention", "EfficientAttention", "CudnnAttention", "FusedAttention")


_IS_FUSED_ATTENTION: dict[type, bool] = {}  # autograd node type -> is it a fused-attention node


def fused_attention_node(loss: Tensor, limit: int = 200_000) -> str | None:
    """The name of the first fused-attention node in ``loss``'s graph (None if there is none).
    (Runs at every inner loop's first step: node types are classified once, by a dict look-up.)"""
    seen, stack = set(), [loss.grad_fn]
    known = _IS_FUSED_ATTENTION
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kind = type(node)
        fused = known.get(kind)
        if fused is None:
            fused = known[kind] = any(part in kind.__name__ for part in FUSED_ATTENTION_NODES)
        if fused:
            return kind.__name__
        for next_node, _ in node.next_functions:
            stack.append(next_node)
    return None


def check_second_order_graph(loss: Tensor, step: int) -> None:
    """Refuse, before it fails deep inside the meta-backward, a loss computed through fused attention
    when the step records a graph for second-order use (``first_order=False``)."""
    node = fused_attention_node(loss)
    if node is not None:
        raise ValueError(
            f"step(loss) at step {step}: the loss was computed through fused attention ({node}), which has no "
            "double backward, and this step keeps a graph through its gradients for a meta-gradient. Compute "
            "the loss inside `with diffopt.unroll.double_differentiable():` (attention on a twice-differentiable "
            "kernel), or let diffopt.innerloop / diffopt.unroll.InnerLoop do it for you, or pass first_order=True"
        )


def loss_gradients(loss: Tensor | None, params: Sequence[Tensor], step: int, *, first_order: bool,
                   check_finite: bool, check_graph: bool = False) -> list[Tensor | None]:
    """``d loss / d params`` (None where a parameter is unused), with a graph through the
    gradients unless ``first_order`` (then without forward-mode tangents too: constants); ``step``
    is only for the messages. ``check_graph`` walks the loss's graph for ops without a double
    backward (fused attention) first: the optimizer asks for it at its first step only, where the
    model's forward is seen for the first time."""
    if loss is None:
        raise TypeError("step(loss): a loss tensor is required (or pass grads=...)")
    if not isinstance(loss, Tensor):
        raise TypeError(f"step(loss): loss must be a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"step(loss) at step {step}: the loss must be a scalar, got shape "
            f"{tuple(loss.shape)}; reduce it with .sum() or .mean() (for a batch of "
            "independent tasks, .sum() gives each task its own gradient)"
        )
    if check_finite and not math.isfinite(float(loss.detach())):  # (one read; torch.isfinite costs ~10x)
        raise NonFiniteError(
            f"step {step}: the loss is {loss.item()}; lower the learning rate, clip "
            "gradients (clip_grad_norm=...) or check the inputs"
        )
    wanted = [i for i, p in enumerate(params) if p.requires_grad]
    if check_graph and not first_order and torch.is_grad_enabled() and loss.grad_fn is not None:
        check_second_order_graph(loss, step)
    if not wanted or not loss.requires_grad:
        raise ValueError(
            f"step(loss) at step {step}: the loss does not depend on any parameter that "
            "requires grad; create the parameters with requires_grad=True (or call "
            "requires_grad_()), and do not compute the loss under torch.no_grad()"
        )
    computed = torch.autograd.grad(
        loss if loss.dim() == 0 else loss.reshape(()),  # (a view would add a node to every step's graph)
        [params[i] for i in wanted],
        create_graph=not first_order and torch.is_grad_enabled(),
        allow_unused=True,
    )
    if all(g is None for g in computed):
        raise ValueError(f"step(loss) at step {step}: the loss does not depend on any of the {len(params)} "
                         f"parameters this step updates, so the step would change nothing; {NOT_CONNECTED_FIX}")
    if first_order and forward_ad._current_level >= 0:
        # create_graph=False drops the reverse-mode graph but not forward-mode tangents: under dual
        # tensors the gradient still carries d(gradient)/dλ, a second-order term first_order excludes
        computed = tuple(None if g is None else forward_ad.unpack_dual(g).primal for g in computed)
    grads: list[Tensor | None] = [None] * len(params)
    for i, g in zip(wanted, computed):
        grads[i] = g
    return grads


def check_finite_gradients(grads: Sequence[Tensor | None], names: Sequence[str], step: int) -> None:
    """Raise :class:`NonFiniteError` naming the first parameter whose gradient is NaN or infinite."""
    for i, g in enumerate(grads):
        if g is not None and not torch.isfinite(g.detach()).all():
            raise NonFiniteError(
                f"step {step}: the gradient of parameter {i} ({names[i]}) is not finite; lower the "
                "learning rate, clip gradients (clip_grad_norm=...) or check the loss"
            )


def all_finite(tensors: Sequence[Tensor | None]) -> bool:
    """Whether every element is finite (meta tensors, shapes only, count as finite).

    One synchronisation when they are: a NaN or infinity anywhere makes the sum of
    sums non-finite. A sum can also overflow from finite values (float16 weights of
    50 in a 1600-wide layer already do), so a non-finite sum is confirmed element by
    element before it counts.
    """
    present = [t.detach() for t in tensors if t is not None and not t.is_meta]
    if not present or bool(torch.isfinite(torch.stack([t.sum() for t in present]).sum())):
        return True
    return all(bool(torch.isfinite(t).all()) for t in present)


def graph_leaves(outputs: Sequence[Tensor]) -> list[Tensor]:
    """The leaf tensors the autograd graphs of ``outputs`` accumulate gradients into (a walk of the
    graph, no arithmetic): what a loss really depends on, declared or not."""
    leaves: dict[int, Tensor] = {}
    seen: set[int] = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # an AccumulateGrad node
        if isinstance(variable, Tensor):
            leaves.setdefault(id(variable), variable)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return list(leaves.values())
