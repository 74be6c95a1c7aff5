"""Reverse-mode unrolls: the whole graph, the first-order approximation, or the last k steps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from ..carry import Carry
from ._base import Mode

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import InnerLoop


@dataclass(eq=False)
class SecondOrder(Mode):
    """Full reverse-mode unroll (MAML, Finn et al. 2017): the meta-gradient through every
    inner step, second derivatives included. Memory grows linearly with K."""

    name: ClassVar[str] = "second_order"

    def adapt(self, loop: InnerLoop, carry: Carry, x: Tensor, y: Tensor, info: dict[str, Any]) -> Carry:
        return loop.run(carry, loop.steps, x, y, "full")


@dataclass(eq=False)
class FirstOrder(Mode):
    r"""First-order MAML: inner gradients are constants, so
    :math:`\partial\phi_K/\partial\theta = I` for plain SGD. The updates stay differentiable, so tensor
    hyperparameters (Meta-SGD's rates, a learnable lr) still receive their gradient, and so does
    anything else in the update that is not the loss's gradient: with the inner optimizer's coupled
    weight decay :math:`\omega` (added to the gradient), :math:`\partial\phi_K/\partial\theta =
    (1 - \alpha\omega)^K I`, as in higher's first-order mode."""

    name: ClassVar[str] = "first_order"

    def adapt(self, loop: InnerLoop, carry: Carry, x: Tensor, y: Tensor, info: dict[str, Any]) -> Carry:
        return loop.run(carry, loop.steps, x, y, "first_order")


@dataclass(eq=False)
class Truncated(Mode):
    r"""Reverse mode through the last ``truncate`` steps only.

    The first K − k steps run without a graph and reconnect as
    :math:`\theta + \mathrm{stopgrad}(\phi_{K-k} - \theta)`, contributing the identity to
    the initial weights; ``Truncated(K)`` equals :class:`SecondOrder`, ``Truncated(0)``
    is first order in θ with no hyperparameter gradient (Shaban et al., 2019).
    """

    truncate: int | None = None
    name: ClassVar[str] = "truncated"
    legacy_options: ClassVar[dict[str, str]] = {"truncate": "truncate"}

    def validate(self, steps: int) -> None:
        if isinstance(self.truncate, bool) or not isinstance(self.truncate, int) or not 0 <= self.truncate <= steps:
            raise ValueError(
                f"mode='truncated' needs truncate=k with 0 <= k <= steps ({steps}); got {self.truncate!r}"
            )

    def adapt(self, loop: InnerLoop, carry: Carry, x: Tensor, y: Tensor, info: dict[str, Any]) -> Carry:
        window = int(self.truncate)  # type: ignore[arg-type]  # validated
        info["truncate"] = window
        start = carry
        early = loop.run(carry, loop.steps - window, x, y, "none")
        params = [
            s + (e - s).detach() if adapted else s
            for s, e, adapted in zip(start.params, early.params, loop.adapted_mask)
        ]
        return loop.run(Carry(params, early.states, early.buffers, early.step), window, x, y, "full")
