"""Checkpointed reverse mode: segments recomputed in the backward pass (memory about √K)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..attention import double_differentiable
from ..carry import Carry, flatten, unflatten
from ._base import Mode, check_positive_int

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import InnerLoop


def default_segment(steps: int) -> int:
    """⌈√K⌉: K/s stored segment boundaries plus s recomputed steps is smallest at s = √K."""
    return max(1, math.ceil(math.sqrt(steps)))


@dataclass(eq=False)
class Checkpointed(Mode):
    """Segments of ``segment`` steps (default ⌈√K⌉, see :func:`default_segment`) run
    without a graph and are recomputed during the backward pass (Griewank's
    checkpointing): memory grows about as √K, the gradient equals :class:`SecondOrder`'s,
    at the price of one more forward pass."""

    segment: int | None = None
    name: ClassVar[str] = "checkpointed"
    legacy_options: ClassVar[dict[str, str]] = {"segment": "segment"}

    def validate(self, steps: int) -> None:
        check_positive_int(self.segment, "segment", "steps per recomputed segment", allow_none=True)

    def segment_length(self, steps: int) -> int:
        return self.segment or default_segment(steps)

    def adapt(self, loop: InnerLoop, carry: Carry, x: Tensor, y: Tensor, info: dict[str, Any]) -> Carry:
        loop.check_declared_dependencies(carry, x, y)
        segment = self.segment_length(loop.steps)
        info["segment"] = segment
        meta = loop.meta_tensors()
        done = 0
        while done < loop.steps:
            length = min(segment, loop.steps - done)
            tensors, skeleton = flatten(carry)
            holder: list[Any] = [len(tensors)]
            out = _Segment.apply(loop, skeleton, length, holder, x, y, *tensors, *meta)
            carry = unflatten(list(out), holder[1])
            done += length
        return carry


class _Segment(torch.autograd.Function):
    """``length`` inner steps: forward without a graph, backward by recomputation."""

    @staticmethod
    def forward(ctx: Any, loop: Any, skeleton: Any, length: int, holder: list[Any], x: Tensor, y: Tensor,
                *tensors: Tensor) -> Any:
        n_carry = holder[0]
        ctx.loop, ctx.skeleton, ctx.length, ctx.n_carry = loop, skeleton, length, n_carry
        # the generators the segment may draw from (dropout): the CPU's, and the CUDA devices' of its tensors
        ctx.devices = sorted({t.device.index or 0 for t in (x, *tensors) if t.device.type == "cuda"})
        ctx.rng_state = torch.get_rng_state()
        ctx.cuda_rng_states = [torch.cuda.get_rng_state(d) for d in ctx.devices]
        ctx.save_for_backward(x, y, *tensors)
        # Attention as the recomputation will run it (MATH, diffopt.unroll.attention): the same
        # kernel draws the same dropout masks from the restored RNG state.
        with torch.enable_grad(), double_differentiable(attention=loop.attention):
            carry = unflatten(list(tensors[:n_carry]), skeleton)
            out = loop.run(carry, length, x, y, "none")
        out_tensors, out_skeleton = flatten(out)
        holder.append(out_skeleton)
        ctx.mark_non_differentiable(*out_tensors[len(out_tensors) - len(out.buffers):])
        return tuple(out_tensors)

    @staticmethod
    def backward(ctx: Any, *grad_out: Tensor) -> Any:
        x, y, *tensors = ctx.saved_tensors
        carry_in, meta = tensors[: ctx.n_carry], tensors[ctx.n_carry:]
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in carry_in]
        with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():
            torch.set_rng_state(ctx.rng_state)
            for device, state in zip(ctx.devices, ctx.cuda_rng_states):
                torch.cuda.set_rng_state(state, device)
            out = ctx.loop.run(unflatten(leaves, ctx.skeleton), ctx.length, x, y, "full")
            outputs, _ = flatten(out)
            pairs = [(o, g) for o, g in zip(outputs, grad_out) if g is not None and o.requires_grad]
            data = [x, y]  # inputs may depend on meta-parameters (e.g. ANIL's features)
            targets = [t for t in leaves if t.requires_grad] + [m for m in meta + data if m.requires_grad]
            grads = torch.autograd.grad(
                [o for o, _ in pairs], targets, [g for _, g in pairs], allow_unused=True
            ) if pairs and targets else [None] * len(targets)
        it = iter(grads)
        carry_grads = [next(it) if t.requires_grad else None for t in leaves]
        meta_grads = [next(it) if m.requires_grad else None for m in meta]
        x_grad, y_grad = (next(it) if d.requires_grad else None for d in data)
        return (None, None, None, None, x_grad, y_grad, *carry_grads, *meta_grads)
