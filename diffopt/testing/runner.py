"""What ``diffopt check`` runs: the gradient-correctness kit over every built-in optimizer and mode,
or over a user's optimizer given as ``module:Class`` (:func:`run_checks`; the command line,
:mod:`diffopt.cli.check`, prints its :class:`CheckRun`)."""
from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import optim
from .checks import Report, check_hypergradient, check_modes, check_optimizer
from .faulty import FAULTY

# Option sets per optimizer: the fast run uses the first, --thorough all of them.
OPTION_SETS: dict[str, list[dict[str, Any]]] = {
    "SGD": [{"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, {"momentum": 0.5, "dampening": 0.2},
            {"maximize": True}],
    "Adam": [{"amsgrad": True, "weight_decay": 0.01}, {"decoupled_weight_decay": True, "weight_decay": 0.1},
             {"maximize": True, "betas": (0.8, 0.99)}],
    "AdamW": [{}, {"amsgrad": True}],
    "Adagrad": [{"lr_decay": 0.01, "initial_accumulator_value": 0.1}, {"weight_decay": 0.01}],
    "Adadelta": [{"rho": 0.8}, {"weight_decay": 0.01, "maximize": True}],
    "Adamax": [{}, {"weight_decay": 0.01}],
    "NAdam": [{"momentum_decay": 0.01}, {"decoupled_weight_decay": True, "weight_decay": 0.01}],
    "RAdam": [{}, {"decoupled_weight_decay": True, "weight_decay": 0.01, "betas": (0.9, 0.9)}],
    "RMSprop": [{"centered": True, "momentum": 0.5}, {"weight_decay": 0.01}],
    "Rprop": [{"etas": (0.4, 1.3)}, {"step_sizes": (1e-4, 1.0)}],
    "ASGD": [{"t0": 5.0, "lambd": 0.01}, {"weight_decay": 0.01}],
    "Adafactor": [{"weight_decay": 0.1, "d": 1.5}, {"eps": (1e-30, 1e-2), "beta2_decay": -0.5, "maximize": True},
                  {"foreach": True}],
    # torch runs Muon's Newton–Schulz iteration in bfloat16: trajectory parity is checked with torch's
    # setting (a trajectory-only row, see optimizer_reports); finite differences need the float64 iteration (ns_dtype=None).
    "Muon": [{"ns_dtype": None}, {"ns_dtype": None, "nesterov": False, "adjust_lr_fn": "match_rms_adamw"}],
}
LEARNING_RATES = {"Adadelta": 0.5, "Rprop": 0.01}
#: Options only the twin has: an option set that uses one is checked without a torch.optim reference.
TWIN_ONLY_OPTIONS = frozenset({"ns_dtype"})
#: Optimizers of weight matrices only, checked on a network without biases.
MATRICES_ONLY = frozenset({"Muon"})


def load_object(spec: str) -> Any:
    """``module:attribute`` -> the object (for user optimizers and references); ValueError if it cannot be loaded."""
    if ":" not in spec:
        raise ValueError(f"{spec!r}: give the optimizer as module:Class, e.g. mypackage.optim:MyAdam")
    module, attribute = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load {spec!r}: {error}") from error


def _problem(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    data = tuple(torch.randn(3, n, 1, generator=generator, dtype=torch.float64) for n in (5, 5, 6, 6))
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).double(), data


def optimizer_reports(name: str, cls: Callable[..., Any], reference: Any, option_sets: list[dict[str, Any]],
                      steps: int, lr: float) -> list[tuple[str, Report]]:
    rows = []
    matrices_only = name in MATRICES_ONLY
    if any(TWIN_ONLY_OPTIONS & set(options) for options in option_sets) and reference is not None:
        # the sets below have no torch reference: parity with torch's own setting, trajectory only
        reports = check_optimizer(cls, lambda ps: reference(ps, lr=lr), steps=steps, hyperparameters={"lr": lr},
                                  directions=1, matrices_only=matrices_only)
        rows += [(f"{name}()", report) for report in reports if "trajectory" in report.name]
    for options in option_sets:
        label = f"{name}({', '.join(f'{k}={v}' for k, v in options.items())})"
        torch_reference = ((lambda ps, o=options: reference(ps, lr=lr, **o))
                           if reference is not None and not TWIN_ONLY_OPTIONS & set(options) else None)
        # Sign-based (Rprop) and max-based (amsgrad) rules are piecewise smooth: over long horizons
        # finite differences cross their kinks, so their hypergradients are checked over 20 steps.
        # Muon's orthogonalised steps have a fixed length: on the small test network it circles the
        # minimum, and its 60-step loss is ill-conditioned in lr (central differences move by 3x between
        # h = 1e-7 and 1e-5); it too is checked over 20 steps. So is Adafactor, for the same reason: its
        # relative steps make the 60-step loss so curved in lr that central differences at h = 1e-5 are
        # 1.9e-4 off the analytic value (1.3e-7 at h = 1e-7), which --thorough had reported as a failure.
        kinked = name in ("Rprop", "Muon", "Adafactor") or options.get("amsgrad", False)
        for report in check_optimizer(lambda ps, o=options, **h: cls(ps, **o, **h), torch_reference,
                                      steps=min(steps, 20) if kinked else steps, hyperparameters={"lr": lr},
                                      maximize=options.get("maximize", False), matrices_only=matrices_only):
            rows.append((label, report))
    return rows


def mode_reports(optimizer_factory: Callable[..., Any], label: str, thorough: bool,
                 options: dict[str, Any] | None = None) -> list[tuple[str, Report]]:
    rows = []
    model, data = _problem()
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    factory = lambda ps: optimizer_factory(ps, lr=lr, **(options or {}))  # noqa: E731
    for report in check_modes(model, factory, data, steps=4 if thorough else 3,
                              implicit_steps=400 if thorough else 250):
        rows.append((label, report))
    for mode, extra in (("second_order", {}), ("checkpointed", {"segment": 2}), ("truncated", {"truncate": 3})):
        report = check_hypergradient(model, factory, data, steps=3, mode=mode, directions=4 if thorough else 2,
                                     gradcheck=thorough, vectorize=False, **extra)
        rows.append((label, report))
    # Implicit: the solution of the proximal problem does not depend on the learning rate, so only θ
    # is checked, against finite differences of the unrolled loop (equal up to inner convergence).
    # The implicit hypergradient depends on the inner solution only, not on the optimizer that
    # found it; SGD converges to it reliably, so the finite-difference reference is exact.
    report = check_hypergradient(model, lambda ps: optim.SGD(ps, lr=0.1), data,
                                 steps=300, mode="implicit",
                                 proximal=1.0, directions=2, gradcheck=False, vectorize=False, tolerance=1e-5)
    report.notes.append("implicit: compared with finite differences of the unrolled loop (tolerance 1e-5: the "
                        "unrolled solution is exact only up to the inner convergence)")
    rows.append((label, report))
    return rows


def self_test(steps: int) -> list[tuple[str, Report, bool]]:
    """Every deliberately wrong optimizer must be flagged by at least one check."""
    out = []
    model, data = _problem(1)
    for name, (cls, reference, options) in FAULTY.items():
        rest = {k: v for k, v in options.items() if k != "lr"}
        reports = check_optimizer(lambda ps, **h: cls(ps, **rest, **h), lambda ps: reference(ps, **options),
                                  steps=steps, hyperparameters={"lr": options["lr"]})
        reports += check_modes(model, lambda ps: cls(ps, **options), data, modes=("independence",))
        flagged = any(r.failed for r in reports)  # an INCONCLUSIVE check flags nothing
        worst = max(reports, key=lambda r: (r.failed, not r.inconclusive, r.worst_error / r.tolerance))
        out.append((name, worst, flagged))
    return out


@dataclasses.dataclass
class CheckRun:
    """The outcome of :func:`run_checks`: ``(subject, report)`` rows, the self-test's
    ``(wrong implementation, worst report, flagged)`` rows, and the seconds it took."""

    rows: list[tuple[str, Report]]
    self_test: list[tuple[str, Report, bool]]
    seconds: float

    @property
    def failures(self) -> list[tuple[str, Report]]:
        return [(subject, report) for subject, report in self.rows if report.failed]

    @property
    def inconclusive(self) -> list[tuple[str, Report]]:
        """Checks that could not be made (the report says why and what to change); not failures."""
        return [(subject, report) for subject, report in self.rows if report.inconclusive]

    @property
    def missed(self) -> list[str]:
        """Deliberately wrong optimizers no check flagged."""
        return [name for name, _, flagged in self.self_test if not flagged]

    @property
    def passed(self) -> bool:
        return not self.failures and not self.missed


def run_checks(optimizer: Callable[..., Any] | None = None, reference: Callable[..., Any] | None = None,
               lr: float = 0.05, thorough: bool = False, self_test_run: bool = True,
               skip_modes: bool = False, options: dict[str, Any] | None = None) -> CheckRun:
    """Check the optimizer class ``optimizer`` (against the torch.optim class ``reference`` if given) or,
    without one, every built-in optimizer and the engine's modes, then (built-ins only) that every deliberately
    wrong optimizer of :mod:`.faulty` is flagged. ``thorough``: more option sets, steps, directions and gradcheck.
    ``options``: constructor arguments given to ``optimizer`` and ``reference`` alike (their defaults may
    differ, and a branch such as a dampening is exercised only when set).
    (:func:`load_object` turns ``module:Class`` into the class.)"""
    started = time.perf_counter()
    steps = 60 if thorough else 20
    rows: list[tuple[str, Report]] = []
    if optimizer is not None:
        rows += optimizer_reports(optimizer.__name__, optimizer, reference, [dict(options or {})], steps, lr)
        if not skip_modes:
            rows += mode_reports(optimizer, optimizer.__name__, thorough, options)
    else:
        for name, cls in optim.OPTIMIZERS.items():
            sets = OPTION_SETS[name] if thorough else OPTION_SETS[name][:1]
            rows += optimizer_reports(name, cls, getattr(torch.optim, name), sets, steps, LEARNING_RATES.get(name, 0.05))
        for name in ("SGD", "Adam") if thorough else ("SGD",):
            rows += mode_reports(optim.OPTIMIZERS[name], f"modes with {name}", thorough)
    wrong = self_test(steps) if optimizer is None and self_test_run else []
    return CheckRun(rows, wrong, time.perf_counter() - started)
