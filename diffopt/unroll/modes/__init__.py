"""Meta-gradient modes: one object per mode, owning its options, their validation and
how the inner loop is made differentiable.

=================  ==============================  ==============================================
name               object                          what the meta-gradient is
=================  ==============================  ==============================================
``second_order``   ``SecondOrder()``               full reverse-mode unroll (MAML)
``first_order``    ``FirstOrder()``                inner gradients as constants (FOMAML)
``truncated``      ``Truncated(k)``                reverse mode through the last k steps
``checkpointed``   ``Checkpointed(segment)``       second order, segments recomputed (≈√K memory)
``implicit``       ``Implicit(CG(...), damping)``  implicit function theorem at the solution
``forward``        ``Forward(wrt)``                forward-mode tangents (memory independent of K)
``es``             ``ES(samples, sigma)``          antithetic evolution strategies
``pes``            ``PES(truncation, ...)``        persistent ES over truncations
=================  ==============================  ==============================================

``InnerLoop(mode=...)`` takes an object or a name; a name with the keyword options
``InnerLoop`` has always accepted (``truncate=``, ``segment=``, ``solver=``, ``es_samples=``,
...) builds the object with :func:`as_mode`.
"""
from __future__ import annotations

from typing import Any

from ._base import Mode, suggest
from .checkpointed import Checkpointed, default_segment
from .evolution import ES, PES
from .forward import Forward
from .implicit import Implicit
from .reverse import FirstOrder, SecondOrder, Truncated

MODE_CLASSES: dict[str, type[Mode]] = {
    cls.name: cls for cls in (SecondOrder, FirstOrder, Truncated, Checkpointed, Implicit, Forward, ES, PES)
}
MODES: tuple[str, ...] = tuple(MODE_CLASSES)
"""The mode names, in the order the documentation lists them."""

LEGACY_OPTIONS: dict[str, tuple[str, ...]] = {}
for _cls in MODE_CLASSES.values():
    for _keyword in _cls.legacy_options:
        LEGACY_OPTIONS[_keyword] = LEGACY_OPTIONS.get(_keyword, ()) + (_cls.name,)


def as_mode(mode: Mode | str, **options: Any) -> Mode:
    """The mode object for ``mode`` (an object, returned as is, or a name) and its keyword
    options as ``InnerLoop`` accepts them (``truncate=3``, ``solver_iterations=20``, ...).

    Options of the other modes are ignored, so that one set of keywords can sweep the
    modes (``for mode in MODES: InnerLoop(..., mode=mode, forward_wrt=w, solver="cg")``);
    an unknown keyword is an error with the closest option named.
    """
    unknown = [k for k in options if k not in LEGACY_OPTIONS]
    if unknown:
        raise TypeError(f"unknown mode option {unknown[0]!r}{suggest(unknown[0], LEGACY_OPTIONS)}; mode options: "
                        f"{', '.join(sorted(LEGACY_OPTIONS))}")
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(mode, Mode):
        if given:
            raise TypeError(f"mode={mode!r} is an object: give {', '.join(given)} to it, not to InnerLoop")
        return mode
    if not isinstance(mode, str) or mode not in MODE_CLASSES:
        hint = suggest(mode, MODE_CLASSES) if isinstance(mode, str) else ""
        raise ValueError(f"mode={mode!r} is not a mode; valid modes: {', '.join(MODES)} "
                         f"(or a diffopt.unroll.modes object such as Truncated(3)){hint}")
    cls = MODE_CLASSES[mode]
    given = {k: v for k, v in given.items() if k in cls.legacy_options}
    if cls is Implicit:
        return Implicit.from_legacy(given)
    return cls(**{cls.legacy_options[k]: v for k, v in given.items()})  # type: ignore[call-arg]


__all__ = [
    "ES", "LEGACY_OPTIONS", "MODES", "MODE_CLASSES", "PES", "Checkpointed", "FirstOrder", "Forward", "Implicit",
    "Mode", "SecondOrder", "Truncated", "as_mode", "default_segment",
]
