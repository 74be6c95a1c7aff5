"""What ``diffopt bench`` measures and with what budgets: :class:`Settings`, and the names of the
implementations it times (the engine's modes, then each baseline second and first order)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from .. import unroll

MODES = unroll.MODES  # every engine mode is benchmarked
BASELINES = ("plain loop", "higher loop", "torch.func vmap", "torchopt")
STEPS = (1, 2, 5, 10, 20, 50, 100)
QUICK_STEPS = (1, 5)


@dataclasses.dataclass
class Settings:
    """What to measure and with what budgets (``Settings.quick()`` for a ~1 minute run)."""

    steps: tuple[int, ...] = STEPS
    steps_by_problem: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    modes: tuple[str, ...] = MODES
    baselines: tuple[str, ...] = BASELINES
    repeats: int = 5
    warmup: int = 1
    block_budget_s: float = 15.0      # seconds of timed rounds per (problem, K)
    min_sample_s: float = 0.02        # each time sample the mean of back-to-back calls lasting this long (0: one call)
    max_call_s: float = 4.0           # skip an implementation whose meta-step is predicted to take longer
    memory: str = "profiler"          # "profiler", "subprocess" or "off"
    discrepancy: bool = True
    discrepancy_tasks: int = 25
    accuracy: bool = True
    train_steps: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # K of the accuracy runs
    train_time_s: float | dict[str, float] = 6.0
    train_iterations: int | dict[str, int] = 100
    train_cap_factor: float = 2.0     # stop a run at cap_factor × the time budget even if short of iterations
    snapshots: int | dict[str, int] = 4  # evaluations along the time budget (accuracy against wall time)
    accuracy_baselines: tuple[str, ...] = ("plain loop",)
    truncate: int | None = None       # truncated mode's window; None: max(1, K // 2)
    segment: int | None = None        # checkpointed mode's segment; None: ⌈√K⌉
    proximal: float = 1.0
    solver: str = "minres"            # implicit mode's linear solver: the Hessian after K steps is indefinite
    solver_iterations: int = 20
    es_samples: int = 4
    es_sigma: float = 1e-3
    pes_truncation: int = 10
    threads: int = 1
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_settings(cls, **overrides: Any) -> "Settings":
        base: dict[str, Any] = dict(
            steps=QUICK_STEPS, steps_by_problem={"conv4": (1,)}, repeats=2, block_budget_s=2.0, max_call_s=1.0,
            discrepancy_tasks=5, train_steps={"sinusoid": (5,), "conv4": (1,)},
            train_time_s={"default": 1.0, "conv4": 1.5}, train_iterations=10, train_cap_factor=2.0, snapshots=2,
            quick=True)
        base.update(overrides)
        return cls(**base)

    def steps_for(self, problem: str) -> tuple[int, ...]:
        return tuple(self.steps_by_problem.get(problem, self.steps))

    def train_steps_for(self, problem: str) -> tuple[int, ...]:
        steps = self.steps_for(problem)
        default = tuple(k for k in (1, 5) if k in steps) or steps[:1]
        return tuple(self.train_steps.get(problem, default))

    @staticmethod
    def _per(value: Any, problem: str, fallback: float) -> Any:
        if isinstance(value, dict):
            return value.get(problem, value.get("default", fallback))
        return value

    def time_budget(self, problem: str) -> float:
        """Seconds of meta-steps per accuracy run for a problem kind ("sinusoid", "conv4", "custom")."""
        return float(self._per(self.train_time_s, problem, 6.0))

    def iteration_budget(self, problem: str) -> int:
        return int(self._per(self.train_iterations, problem, 100))

    def snapshot_count(self, problem: str) -> int:
        return max(1, int(self._per(self.snapshots, problem, 4)))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))


def implementations(settings: Settings) -> list[str]:
    """Implementation names: the modes, then ``"<baseline> SO"`` / ``"<baseline> FO"``."""
    names = list(settings.modes)
    for baseline in settings.baselines:
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose from {', '.join(BASELINES)}")
        names.append(f"{baseline} SO")
        if baseline != "torchopt":
            names.append(f"{baseline} FO")
    return names


def reference_for(name: str) -> str:
    """The plain loop a figure is divided by: first order against first order, all else second order."""
    return "plain loop FO" if name == "first_order" or name.endswith(" FO") else "plain loop SO"
