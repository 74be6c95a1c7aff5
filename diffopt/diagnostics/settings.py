"""One settings object for every diagnostic: :class:`DiagnosticSettings`.

How predictions are scored (``likelihood``, ``sigma``, ``num_classes``), how the
model is evaluated (``bn_mode``, ``per_example``, ``batched``), the random seed
and the estimator settings of the full report are one frozen dataclass::

    s = DiagnosticSettings(likelihood="gaussian", sigma=0.3, bn_mode="batch")
    adaptation_kl(model, theta, phi, x, settings=s)
    diagnose_adaptation(model, theta, adapt, tasks, settings=s.replace(orderings=4))

Every diagnostic also takes these fields as keyword arguments (they override
``settings``): ``adaptation_kl(model, theta, phi, x, sigma=0.3)`` works as before.
A diagnostic declares the fields it reads with :func:`diagnostic` (which also
makes it stateless: model weights, buffers, training flags and the global RNG
stream are restored); a field it does not read is refused as an unexpected
keyword argument, and its signature (``inspect.signature``, ``help``) lists the
fields it reads with their defaults.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from torch import nn

from ._functional import evaluation
from ._likelihood import Likelihood, resolve_likelihood

__all__ = ["DiagnosticSettings", "diagnostic", "with_settings", "EVALUATION", "LEARNER", "REPORT"]


@dataclass(frozen=True)
class DiagnosticSettings:
    """How diagnostics score predictions, evaluate the model and estimate.

    Attributes:
        likelihood: ``"categorical"`` (softmax over the outputs) or ``"gaussian"``
            (𝒩(f(x), σ²)), or a :class:`~diffopt.diagnostics.Likelihood`.
        sigma: σ of the Gaussian likelihood (required for regression; no default).
        num_classes: check the head size against it (classification).
        bn_mode: ``"eval"`` (running statistics) or ``"batch"`` (statistics of the
            evaluated batch, computed on copies of the buffers).
        per_example: per-example gradients by ``"auto"``, ``"vmap"``, ``"jacrev"`` or ``"loop"``.
        batched: whether the data carry a leading task dimension (default: inferred).
        seed: seeds the explicit generator a diagnostic creates when none is given.
        prior_precision: λ of the prior 𝒩(θ, λ⁻¹I) in the weight information (3b).
        fisher_kind, fisher_samples: Fisher estimator of the report (``"true"``,
            ``"empirical"`` or ``"mc"``; MC samples).
        layers: modules whose outputs the representation change compares (default: every child).
        orderings, blocks: prequential code length of the report (random orderings; block ends).
        bald_members: bootstrap resamples adapted on for BALD.
        power_iters, power_tol, hutchinson_samples: curvature estimators of the report (at most ``power_iters``
            Lanczos iterations for λ_max, stopping at the relative residual ``power_tol``, as
            :func:`~diffopt.diagnostics.curvature`'s ``iters``, ``tol``; Hutchinson probes for tr H).
    """

    likelihood: Any = "categorical"
    sigma: Optional[float] = None
    num_classes: Optional[int] = None
    bn_mode: str = "eval"
    per_example: str = "auto"
    batched: Optional[bool] = None
    seed: int = 0
    prior_precision: float = 1.0
    fisher_kind: str = "true"
    fisher_samples: int = 1
    layers: Optional[Sequence[str]] = None
    orderings: int = 2
    blocks: Any = None
    bald_members: int = 4
    power_iters: int = 20
    power_tol: float = 1e-6
    hutchinson_samples: int = 8

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any) -> "DiagnosticSettings":
        """A copy with ``changes``; an unknown name raises ``TypeError`` with the closest field."""
        check_fields(changes, self.field_names(), "DiagnosticSettings")
        return dataclasses.replace(self, **changes)

    def resolve_likelihood(self, what: str) -> Likelihood:
        """The validated likelihood (regression without ``sigma`` raises, naming the fix)."""
        return resolve_likelihood(self.likelihood, self.sigma, self.num_classes, what=what)

    @classmethod
    def of(cls, settings: Optional["DiagnosticSettings"], options: Mapping[str, Any],
           what: str = "this diagnostic") -> "DiagnosticSettings":
        """``settings`` (default: the defaults) with ``options`` (keyword arguments) applied."""
        if settings is None:
            settings = cls()
        elif not isinstance(settings, cls):
            raise TypeError(f"{what}: settings must be a DiagnosticSettings, got {type(settings).__name__}")
        check_fields(options, cls.field_names(), what)
        return dataclasses.replace(settings, **options) if options else settings


def check_fields(options: Mapping[str, Any], allowed: Sequence[str], what: str) -> None:
    for name in options:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; it accepts {', '.join(allowed)}"
            raise TypeError(f"{what}() got an unexpected keyword argument {name!r}{hint}")


# The settings of scoring and evaluation most single diagnostics read.
EVALUATION = ("likelihood", "sigma", "num_classes", "bn_mode", "per_example", "batched", "seed")
# What diagnose_adaptation reads (tasks come as a list: no ``batched``), and diagnose (which takes the
# likelihood from the labels and bn_mode from the learner's BatchNorm policy).
REPORT = tuple(f.name for f in dataclasses.fields(DiagnosticSettings) if f.name != "batched")
LEARNER = tuple(f for f in REPORT if f not in ("likelihood", "bn_mode"))


def with_settings(*fields: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn(..., settings: DiagnosticSettings)`` also accepts ``fields`` as keyword arguments.

    The wrapper merges ``settings=`` (optional) with those keyword arguments into one
    :class:`DiagnosticSettings` passed to ``fn`` as ``settings``; its signature lists
    ``fields`` (keyword-only, with their defaults) after ``fn``'s own parameters.
    """
    unknown = [f for f in fields if f not in DiagnosticSettings.field_names()]
    if unknown:
        raise ValueError(f"{unknown} are not DiagnosticSettings fields")

    def deco(fn: Callable) -> Callable:
        own = [n for n, p in inspect.signature(fn).parameters.items()
               if n != "settings" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        accepted = own + list(fields) + ["settings"]

        @functools.wraps(fn)
        def wrapper(*args: Any, settings: Optional[DiagnosticSettings] = None, **kwargs: Any) -> Any:
            check_fields(kwargs, accepted, fn.__name__)
            options = {k: kwargs.pop(k) for k in fields if k in kwargs}
            merged = DiagnosticSettings.of(settings, options, fn.__name__)
            return fn(*args, settings=merged, **kwargs)

        wrapper.__signature__ = _signature(fn, fields)  # type: ignore[attr-defined]
        wrapper.settings_fields = tuple(fields)  # type: ignore[attr-defined]
        return wrapper

    return deco


def diagnostic(*fields: str) -> Callable[[Callable], Callable]:
    """Decorator for public diagnostics ``fn(model, ...)``: :func:`with_settings` (``fields``) and stateless
    evaluation (model state and the RNG stream are restored; BatchNorm as ``settings.bn_mode`` says)."""
    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def evaluated(model: nn.Module, *args: Any, settings: DiagnosticSettings, **kwargs: Any) -> Any:
            with evaluation(model, settings.bn_mode):
                return fn(model, *args, settings=settings, **kwargs)

        return with_settings(*fields)(evaluated)

    return deco


def _signature(fn: Callable, fields: Sequence[str]) -> inspect.Signature:
    sig = inspect.signature(fn)
    params = [p for name, p in sig.parameters.items() if name != "settings"]
    defaults: Dict[str, Any] = {f.name: f.default for f in dataclasses.fields(DiagnosticSettings)}
    hints = {f.name: f.type for f in dataclasses.fields(DiagnosticSettings)}
    extra = [inspect.Parameter(f, inspect.Parameter.KEYWORD_ONLY, default=defaults[f], annotation=hints[f])
             for f in fields if f not in sig.parameters]
    extra.append(inspect.Parameter("settings", inspect.Parameter.KEYWORD_ONLY, default=None,
                                   annotation="Optional[DiagnosticSettings]"))
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return sig.replace(parameters=params + extra + var_kw)
