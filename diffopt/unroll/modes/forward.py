"""Forward-mode differentiation of the unroll: memory independent of K."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..carry import Carry, detached, flatten, unflatten, unique
from ._base import Mode

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import InnerLoop


@dataclass(eq=False)
class Forward(Mode):
    """Propagate tangents d(carry)/dh for every scalar entry h of ``wrt`` (default: the
    inner optimizer's tensor hyperparameters that require grad).

    Each step's Jacobian-vector product is taken with the double-VJP identity
    ``Jv = ∂/∂u ⟨Jᵀu, v⟩`` on that step's graph alone, so memory does not grow
    with K (it grows with the number of directions). The model's parameters
    receive gradients only if listed in ``wrt``.
    """

    wrt: Sequence[Tensor] | None = None
    name: ClassVar[str] = "forward"
    legacy_options: ClassVar[dict[str, str]] = {"forward_wrt": "wrt"}

    def __post_init__(self) -> None:
        if self.wrt is not None:
            if isinstance(self.wrt, Tensor):
                raise TypeError("Forward(wrt=...): a sequence of tensors, e.g. wrt=[lr]; got one tensor")
            for k, w in enumerate(self.wrt):
                if not isinstance(w, Tensor):
                    raise TypeError(f"Forward(wrt=...): entry {k} is {type(w).__name__} {w!r}, not a tensor; list the "
                                    "tensors (hyperparameters, weights) whose forward-mode derivatives you want")

    def differentiated(self, loop: InnerLoop) -> list[Tensor]:
        """The tensors whose forward-mode derivatives the meta-loss carries: ``wrt``, by default the inner
        optimizer's hyperparameter tensors, that require grad."""
        wrt = list(self.wrt) if self.wrt is not None else loop.optimizer.hyperparameter_tensors()
        return unique([w for w in wrt if w.requires_grad])

    def meta_loss(self, loop: InnerLoop, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                  loss_fn: Any, info: dict[str, Any]) -> Tensor:
        if torch.is_grad_enabled() and not self.differentiated(loop):
            raise ValueError(
                "mode='forward': nothing to differentiate: forward mode carries one tangent per scalar of "
                "Forward(wrt=[...]), by default the inner optimizer's hyperparameter tensors that require grad, and "
                "there are none (the initialisation is not differentiated in this mode), so the meta-loss would "
                "carry no meta-gradient. Give the optimizer a learnable hyperparameter (lr=torch.tensor(0.1, "
                "requires_grad=True)) or Forward(wrt=[...]); for the initialisation's meta-gradient use a reverse "
                "mode (second_order, checkpointed)")
        return super().meta_loss(loop, support_x, support_y, query_x, query_y, loss_fn, info)

    def adapt(self, loop: InnerLoop, carry: Carry, x: Tensor, y: Tensor, info: dict[str, Any]) -> Carry:
        wrt = self.differentiated(loop)
        info["forward_directions"] = sum(w.numel() for w in wrt)
        theta_index = {id(t): j for j, t in enumerate(loop.theta)}
        hyper = [w for w in wrt if id(w) not in theta_index]
        theta_inputs = [t.detach().requires_grad_() for t in loop.theta]  # θ as it enters the proximal term
        constants = hyper + theta_inputs  # sources whose tangent is fixed per direction

        current = detached(carry)
        n_carry = len(flatten(current)[0])
        directions: list[list[Tensor | None]] = []   # tangent of every carry tensor
        fixed: list[list[Tensor | None]] = []        # tangent of every constant source
        for w in wrt:
            for e in range(w.numel()):
                one_hot = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
                one_hot[e] = 1
                one_hot = one_hot.reshape(w.shape)
                carry_tangent: list[Tensor | None] = [None] * n_carry
                constant_tangent: list[Tensor | None] = [one_hot if c is w else None for c in hyper]
                constant_tangent += [None] * len(theta_inputs)
                if id(w) in theta_index:
                    j = theta_index[id(w)]
                    carry_tangent[j] = one_hot.expand_as(current.params[j]).clone() if loop.adapted_mask[j] else one_hot
                    constant_tangent[len(hyper) + j] = one_hot
                directions.append(carry_tangent)
                fixed.append(constant_tangent)

        for _ in range(loop.steps):
            inputs = detached(current, requires_grad=True)
            in_tensors, _ = flatten(inputs)
            with torch.enable_grad():
                out = loop.step(inputs, x, y, "full", theta=theta_inputs)
                out_tensors, out_skeleton = flatten(out)
                live = [k for k, o in enumerate(out_tensors) if o.requires_grad]
                differentiable = [k for k, t in enumerate(in_tensors) if t.requires_grad]
                sources = [in_tensors[k] for k in differentiable] + constants
                dummies = [torch.zeros_like(out_tensors[k], requires_grad=True) for k in live]
                vjp = torch.autograd.grad([out_tensors[k] for k in live], sources, dummies, create_graph=True,
                                          allow_unused=True)
                new_directions = []
                for carry_tangent, constant_tangent in zip(directions, fixed):
                    source_tangents = [carry_tangent[k] for k in differentiable] + constant_tangent
                    pairs = [(g, t) for g, t in zip(vjp, source_tangents) if g is not None and t is not None]
                    new: list[Tensor | None] = [None] * len(out_tensors)
                    if pairs:
                        jvp = torch.autograd.grad([g for g, _ in pairs], dummies, [t for _, t in pairs],
                                                  retain_graph=True, allow_unused=True)
                        for k, value in zip(live, jvp):
                            new[k] = None if value is None else value.detach()
                    new_directions.append(new)
            directions = new_directions
            current = detached(unflatten(out_tensors, out_skeleton))
        finals = list(current.params)
        param_tangents = [d[: len(finals)] for d in directions]
        outputs = _ForwardSolution.apply(param_tangents, finals, [w.shape for w in wrt], *wrt)
        return Carry(list(outputs), current.states, current.buffers, current.step)


class _ForwardSolution(torch.autograd.Function):
    """Forward: the final weights. Backward: contract v with the stored tangents."""

    @staticmethod
    def forward(ctx: Any, tangents: list[list[Tensor]], finals: list[Tensor], shapes: list[torch.Size], *wrt: Tensor) -> Any:
        ctx.tangents, ctx.shapes, ctx.wrt_meta = tangents, shapes, [(w.dtype, w.device) for w in wrt]
        return tuple(f.detach() for f in finals)

    @staticmethod
    def backward(ctx: Any, *v: Tensor) -> Any:
        values = []
        for direction in ctx.tangents:
            total = 0.0
            for g, tangent in zip(v, direction):
                if g is not None and tangent is not None:
                    total = total + (g * tangent).sum()
            values.append(total)
        grads, k = [], 0
        for shape, (dtype, device) in zip(ctx.shapes, ctx.wrt_meta):
            n = math.prod(shape)
            flat = torch.stack([torch.as_tensor(t, dtype=dtype, device=device) for t in values[k:k + n]])
            grads.append(flat.reshape(shape))
            k += n
        return (None, None, None, *grads)
