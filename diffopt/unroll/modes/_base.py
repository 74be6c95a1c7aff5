"""What a meta-gradient mode is: one object that owns its options, their validation
and the way the inner loop is made differentiable.

A mode sees the engine (:class:`~diffopt.unroll.InnerLoop`) through four calls —
``loop.run(carry, n, x, y, graph)`` (``graph`` is ``"full"``, ``"first_order"`` or
``"none"``), ``loop.step``, ``loop.initial_carry`` and ``loop.query_losses`` — and
writes what it did (segment length, solver residual, ...) into the ``info``
dictionary the engine hands it, which becomes ``loop.last_info``.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from ..carry import Adapted, Carry

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import InnerLoop, LossFn


class Mode:
    """Base class of the meta-gradient modes.

    Subclasses are dataclasses whose fields are the mode's options. They set
    ``name`` (the string accepted by ``InnerLoop(mode=...)``) and, for the
    keyword arguments ``InnerLoop`` accepted before modes were objects,
    ``legacy_options`` (``InnerLoop`` keyword -> field name).
    """

    name: ClassVar[str] = ""
    legacy_options: ClassVar[dict[str, str]] = {}
    differentiates_adapted_weights: ClassVar[bool] = True
    """False for the zero-order modes: the adapted weights carry no gradient; the estimate
    is attached to the meta-loss instead."""

    def validate(self, steps: int) -> None:
        """Raise ``ValueError`` naming the option when the options do not fit ``steps`` inner steps."""

    def adapt(self, loop: InnerLoop, carry: Carry, x: Tensor, y: Tensor, info: dict[str, Any]) -> Carry:
        """Run ``loop.steps`` inner steps from ``carry``, differentiable as the mode prescribes."""
        raise NotImplementedError

    def meta_loss(self, loop: InnerLoop, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                  loss_fn: LossFn | None, info: dict[str, Any]) -> Tensor:
        """Mean query loss after adaptation, with the mode's meta-gradient attached."""
        carry = self.adapt(loop, loop.initial_carry(support_x.shape[0]), support_x, support_y, info)
        adapted = Adapted(carry.params, list(loop.adapted_mask), carry.buffers, info)
        return loop.query_losses(adapted, query_x, query_y, loss_fn).mean()

    def options(self) -> dict[str, Any]:
        """The mode's options as a dictionary (for configs and reports)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    # A mode compares equal to its name, so ``loop.mode == "first_order"`` keeps working.
    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return other == self.name
        return self is other

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name


def check_positive_int(value: Any, name: str, meaning: str, *, allow_none: bool = False) -> None:
    """Refuse anything but a positive ``int`` (``bool`` is not a count)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer ({meaning}), got {value!r}")


def suggest(word: str, choices: Any) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
