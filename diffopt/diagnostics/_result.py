"""Result objects: one :class:`Diagnostic` per quantity, grouped in a :class:`DiagnosticGroup`.

Every diagnostic carries its units and the settings of its estimator next to the
value; when it was computed over a batch of tasks it also carries the per-task
values, their standard error and the 95% confidence interval
``mean ± 1.96·sd/√tasks`` (sample sd, ``ddof=1``).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["Diagnostic", "DiagnosticGroup", "nats_to_bits", "bits_to_nats", "LN2"]

LN2 = math.log(2.0)
Z95 = 1.96


def loss_units(loss_fn: Any) -> str:
    """The unit of a loss in :class:`Diagnostic` labels: ``"nats"`` for the likelihood's mean NLL
    (``loss_fn=None``; convertible with ``to_bits()``), ``"loss"`` for a user's ``loss_fn`` (units unknown).
    Gradients' squares are then ``f"{u}^2/param^2"``, Hessians ``f"{u}/param^2"``."""
    return "nats" if loss_fn is None else "loss"


def nats_to_bits(x: Any) -> Any:
    """Convert an information quantity from nats to bits (divide by ln 2)."""
    return x / LN2


def bits_to_nats(x: Any) -> Any:
    """Convert an information quantity from bits to nats (multiply by ln 2)."""
    return x * LN2


_NATS = re.compile(r"nats(?:\^(-?\d+))?")


def _nats_power(units: str) -> int:
    powers = [int(m.group(1)) if m.group(1) else 1 for m in _NATS.finditer(units)]
    if not powers:
        raise ValueError(f"units {units!r} contain no 'nats'; nothing to convert to bits")
    return sum(powers)


def _scale(x: Any, factor: float) -> Any:
    if x is None:
        return None
    if isinstance(x, dict):
        return {k: _scale(v, factor) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_scale(v, factor) for v in x)
    return x * factor


def _scale_details(x: Any, factor: float) -> Any:
    """``details`` in the new units: they hold values in the diagnostic's units (the Fisher's diagonal
    and matrix, a naive estimate beside an unbiased one), so every float and tensor is scaled; counts,
    flags and text stay as they are."""
    if isinstance(x, dict):
        return {k: _scale_details(v, factor) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_scale_details(v, factor) for v in x)
    if isinstance(x, (float, Tensor)) and not isinstance(x, bool):
        return x * factor
    return x


def _jsonable(x: Any) -> Any:
    if x is None or isinstance(x, (bool, str, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        if x.dim() == 0:
            return _jsonable(x.item())
        return [_jsonable(v) for v in x.tolist()] if x.dim() == 1 else [_jsonable(r) for r in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item"):
        return _jsonable(x.item())
    return str(x)


@dataclass
class Diagnostic:
    """One diagnostic value with its units, estimator settings and uncertainty.

    Attributes:
        name: short identifier, e.g. ``"kl/forward"``.
        value: a float for scalar diagnostics (the mean over tasks when computed
            per task), or a tensor (e.g. a cosine matrix).
        units: ``"nats"``, ``"bits"``, ``"nats^2/param^2"``, ``"1"`` (dimensionless) ...
        estimator: the settings that produced the value (labels from data or
            sampled from the model, reduction, BatchNorm mode, sample counts ...).
        per_task: the per-task values (float64 tensor) when computed over tasks.
        ci95: ``(lo, hi)`` = ``value ± 1.96·stderr`` when ``stderr`` is known.
        stderr: standard error of ``value`` (``sd/√tasks`` unless the estimator
            says otherwise, e.g. jackknife for U-statistics).
        by_layer: per-layer (per-parameter-tensor) values, when meaningful.
        details: anything else (diagonals, per-ordering values, matrices ...).
    """

    name: str
    value: Any
    units: str
    estimator: Dict[str, Any] = field(default_factory=dict)
    per_task: Optional[Tensor] = None
    ci95: Optional[Tuple[float, float]] = None
    stderr: Optional[float] = None
    by_layer: Optional[Dict[str, float]] = None
    details: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_tasks(
        cls,
        name: str,
        per_task: Sequence[float] | Tensor,
        units: str,
        estimator: Dict[str, Any],
        *,
        by_layer: Optional[Sequence[Dict[str, float]]] = None,
        details: Optional[Dict[str, Any]] = None,
    ) -> "Diagnostic":
        """Mean over tasks, with ``stderr = sd/√T`` and ``ci95 = mean ± 1.96·stderr``."""
        v = torch.as_tensor(per_task, dtype=torch.float64).detach().cpu().reshape(-1)
        T = v.numel()
        mean = v.mean().item() if T else float("nan")
        stderr = ci = None
        if T >= 2:
            stderr = (v.std(unbiased=True) / math.sqrt(T)).item()
            ci = (mean - Z95 * stderr, mean + Z95 * stderr)
        layers = None
        if by_layer:
            layers = {k: float(sum(d[k] for d in by_layer) / len(by_layer)) for k in by_layer[0]}
        est = dict(estimator)
        est.setdefault("tasks", T)
        return cls(name, mean, units, est, v, ci, stderr, layers, dict(details or {}))

    def __float__(self) -> float:
        if isinstance(self.value, Tensor):
            return float(self.value.item())
        return float(self.value)

    def to_bits(self) -> "Diagnostic":
        """The same diagnostic in bits (every ``nats^k`` factor divided by ``(ln 2)^k``)."""
        k = _nats_power(self.units)
        f = 1.0 / LN2**k
        units = _NATS.sub(lambda m: "bits" + (f"^{m.group(1)}" if m.group(1) else ""), self.units)
        return replace(
            self,
            value=_scale(self.value, f),
            units=units,
            per_task=_scale(self.per_task, f),
            ci95=_scale(self.ci95, f),
            stderr=None if self.stderr is None else self.stderr * abs(f),
            by_layer=_scale(self.by_layer, f),
            details=_scale_details(self.details, f),
        )

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict (tensors become lists; NaN and inf become None)."""
        return {
            "name": self.name,
            "value": _jsonable(self.value),
            "units": self.units,
            "estimator": _jsonable(self.estimator),
            "per_task": _jsonable(self.per_task),
            "ci95": _jsonable(self.ci95),
            "stderr": _jsonable(self.stderr),
            "by_layer": _jsonable(self.by_layer),
            "details": _jsonable(self.details),
        }

    def value_str(self) -> str:
        v = self.value
        if isinstance(v, Tensor) and v.numel() != 1:
            return "tensor" + "x".join(map(str, v.shape)).join("()")
        return f"{float(v):.6g}"

    def __repr__(self) -> str:
        ci = "" if self.ci95 is None else f", ci95=({self.ci95[0]:.4g}, {self.ci95[1]:.4g})"
        return f"Diagnostic({self.name}={self.value_str()} {self.units}{ci})"


class DiagnosticGroup(dict):
    """An ordered mapping ``name -> Diagnostic`` with table and JSON output."""

    def rows(self) -> List[List[str]]:
        rows = []
        for key, d in self.items():
            ci = "" if d.ci95 is None else f"[{d.ci95[0]:.4g}, {d.ci95[1]:.4g}]"
            tasks = "" if d.per_task is None else str(d.per_task.numel())
            est = ", ".join(f"{k}={v}" for k, v in d.estimator.items() if k != "tasks")
            rows.append([key, d.value_str(), ci, d.units, tasks, est])
        return rows

    def to_table(self, max_estimator_width: int = 60) -> str:
        """A plain-text table: name, value, 95% CI across tasks, units, tasks, estimator."""
        header = ["diagnostic", "value", "95% CI", "units", "tasks", "estimator"]
        rows = [[c if i < 5 else c[:max_estimator_width] for i, c in enumerate(r)] for r in self.rows()]
        widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
        line = "  ".join("-" * w for w in widths)
        fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        return "\n".join([fmt(header), line] + [fmt(r) for r in rows])

    def to_dict(self) -> Dict[str, Any]:
        return {k: d.to_dict() for k, d in self.items()}

    def to_json(self, path: Optional[str] = None, indent: int = 2) -> str:
        """JSON text (written to ``path`` as well when given)."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def __str__(self) -> str:
        return self.to_table()
