"""Counting what a diagnostic costs, in forward / backward / Hessian-vector-product units.

Units:

* **forward** — one evaluation of the model on a batch (a ``vmap``'d evaluation of
  single examples counts once: its cost is that of one batched forward);
* **backward** — one vector-Jacobian product through such a batch (a ``vmap``'d
  per-example gradient counts once; a Jacobian with ``D`` rows counts ``D``);
* **hvp** — one Hessian-vector product (a backward pass through a gradient graph);
* **adapt** — one call of a user-supplied adaptation ``adapt(params, x, y)``
  (whose own forwards are counted as forwards).

Forwards are *measured*, with a forward hook on the model; backward and HVP
counts are recorded by the helpers in :mod:`diffopt.diagnostics` that issue
them (a user's ``adapt`` that calls ``torch.autograd.grad`` itself is not seen).
Each public diagnostic documents its cost with :func:`documented_cost`; the
formula is stored on the function (``fn.__cost__``) so tests can check it::

    with count_costs(model) as c:
        adaptation_kl(model, theta, phi, xq)
    assert c.as_dict() == adaptation_kl.__cost__["default"].evaluate(tasks=1)
"""
from __future__ import annotations

import contextlib
import inspect
import textwrap
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Iterator, List

from torch import nn

__all__ = ["CostCount", "Cost", "count_costs", "documented_cost", "record"]


@dataclass
class CostCount:
    """Counts of forward passes, backward passes, HVPs and adapt calls."""

    forward: int = 0
    backward: int = 0
    hvp: int = 0
    adapt: int = 0
    graph_backward: int = 0  # backward passes that built a graph (create_graph=True); not a cost unit

    def as_dict(self) -> Dict[str, int]:
        return {"forward": self.forward, "backward": self.backward, "hvp": self.hvp, "adapt": self.adapt}


_ACTIVE: List[CostCount] = []


def record(*, backward: int = 0, hvp: int = 0, adapt: int = 0, graph_backward: int = 0) -> None:
    """Add to every active :class:`CostCount` (called by the diagnostics' own helpers)."""
    for c in _ACTIVE:
        c.backward += backward
        c.hvp += hvp
        c.adapt += adapt
        c.graph_backward += graph_backward


@contextlib.contextmanager
def count_costs(*models: nn.Module) -> Iterator[CostCount]:
    """Count forwards of ``models`` (forward hook) and recorded backward/HVP/adapt units."""
    count = CostCount()

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        count.forward += 1

    handles = [m.register_forward_hook(hook) for m in models]
    _ACTIVE.append(count)
    try:
        yield count
    finally:
        for h in handles:
            h.remove()
        _ACTIVE.remove(count)


@dataclass(frozen=True)
class Cost:
    """A documented cost: arithmetic formulas (strings) in named variables."""

    forward: str = "0"
    backward: str = "0"
    hvp: str = "0"
    adapt: str = "0"

    def evaluate(self, **variables: Any) -> Dict[str, int]:
        env = {"__builtins__": {}, "max": max, "min": min}
        return {f.name: int(eval(getattr(self, f.name), env, dict(variables))) for f in fields(self)}

    def __str__(self) -> str:
        return ", ".join(f"{f.name} = {getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) != "0") or "free"


def documented_cost(where: str = "", **variants: Cost) -> Callable[[Callable], Callable]:
    """Attach ``variants`` (name -> :class:`Cost`) to a function and append them to its docstring."""

    def deco(fn: Callable) -> Callable:
        fn.__cost__ = dict(variants)  # type: ignore[attr-defined]
        lines = ["Cost (forward / backward / Hessian-vector-product units, see diffopt.diagnostics._cost):"]
        for name, cost in variants.items():
            lines.append(f"    {name}: {cost}" if len(variants) > 1 or name != "default" else f"    {cost}")
        if where:
            lines.append(textwrap.fill("where " + where, width=100, initial_indent="    ", subsequent_indent="    "))
        doc = inspect.cleandoc(fn.__doc__ or "")
        fn.__doc__ = doc + "\n\n" + "\n".join(lines) + "\n"
        return fn

    return deco
