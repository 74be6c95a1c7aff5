"""Sinusoid regression, as defined by MAML (Finn et al. 2017, section 5.1, and the official code).

Each task is ``y = A·sin(x − b)`` with amplitude ``A ~ U[0.1, 5.0]``, phase
``b ~ U[0, π]`` and inputs ``x ~ U[−5, 5]``. The official code draws the
amplitudes and phases of a meta-batch first, then ``2K`` inputs per task of
which the first ``K`` are the support (training) points and the rest the query
(test) points; :meth:`SinusoidTasks.sample` follows the same order.

Evaluation (official code): 600 test tasks, ``K`` query points per task,
mean squared error after each of up to 10 gradient steps, 95% confidence
interval ``t·sd/√600`` (Student's t, sample sd; within 0.3% of the official
``1.96·sd/√600``; :func:`diffopt.tasks.mean_ci95`). Use
:meth:`SinusoidTasks.test_set` for that fixed set and :meth:`SinusoidBatch.grid`
for dense curves to plot.

All randomness comes from a :class:`torch.Generator`; the global RNG is never
touched, so a seed reproduces the exact same tasks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor

from ._checks import check_count

__all__ = [
    "SinusoidBatch",
    "SinusoidTasks",
    "sinusoid",
    "AMPLITUDE_RANGE",
    "PHASE_RANGE",
    "INPUT_RANGE",
    "DEFAULT_TEST_SEED",
]

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)
#: seed of the fixed evaluation set returned by :meth:`SinusoidTasks.test_set` (distinct from training seeds).
DEFAULT_TEST_SEED = 2017_0600


def sinusoid(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
    """``amplitude · sin(x − phase)``, broadcasting a ``(T,)`` amplitude/phase over ``x`` of shape ``(T, ...)``."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return amplitude.reshape(shape) * torch.sin(x - phase.reshape(shape))


def _check_range(name: str, value: tuple[float, float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (low, high) of numbers, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"{name}=({low}, {high}) must be finite with low <= high")
    return low, high


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    return torch.rand(shape, generator=generator, dtype=dtype) * (high - low) + low


@dataclass(frozen=True)
class SinusoidBatch:
    """A meta-batch of sinusoid tasks with a leading task dimension ``T``.

    Attributes:
        support_x, support_y: ``(T, K, 1)`` support (inner-loop training) points.
        query_x, query_y: ``(T, Kq, 1)`` query (meta-test) points.
        amplitude, phase: ``(T,)`` the task parameters ``A`` and ``b``.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    amplitude: Tensor
    phase: Tensor

    @property
    def num_tasks(self) -> int:
        """``T``, the number of tasks."""
        return self.amplitude.shape[0]

    def __len__(self) -> int:
        return self.num_tasks

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SinusoidBatch":
        """A copy with every tensor moved to ``device`` and/or cast to ``dtype``."""
        return SinusoidBatch(**{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)})

    def __getitem__(self, index: int | slice | Tensor) -> "SinusoidBatch":
        """The tasks selected by ``index`` along the task dimension (an int keeps a task dimension of 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return SinusoidBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def grid(self, num_points: int = 1000, x_range: tuple[float, float] = INPUT_RANGE) -> tuple[Tensor, Tensor]:
        """The true curves on a dense grid, for plotting: ``x`` and ``y`` of shape ``(T, num_points, 1)``.

        ``x`` is ``torch.linspace(*x_range, num_points)`` for every task.
        """
        check_count("num_points", num_points, 1)
        low, high = _check_range("x_range", x_range)
        x = torch.linspace(low, high, num_points, dtype=self.amplitude.dtype, device=self.amplitude.device)
        x = x.reshape(1, num_points, 1).expand(self.num_tasks, num_points, 1)
        return x, sinusoid(x, self.amplitude, self.phase)


class SinusoidTasks:
    """Sampler of MAML sinusoid regression tasks, ``y = A·sin(x − b)``.

    Args:
        seed: seed of the sampler's own :class:`torch.Generator`; successive
            :meth:`sample` calls continue its stream, so the same seed gives the
            same sequence of meta-batches. The global RNG is never used.
        dtype: floating dtype of every returned tensor (``torch.float64`` for
            gradient checks). Sampling happens in this dtype, so
            ``y == A·sin(x − b)`` holds exactly.
        device: where returned tensors live (sampling itself runs on the CPU).
        amplitude_range, phase_range, input_range: the uniform ranges; the
            defaults are the paper's ``[0.1, 5.0]``, ``[0, π]``, ``[−5, 5]``.

    Example::

        tasks = SinusoidTasks(seed=0)
        batch = tasks.sample(meta_batch=25, shots=10)      # batch.support_x: (25, 10, 1)
        test = tasks.test_set()                             # 600 fixed tasks, 10 + 10 points each
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        amplitude_range: tuple[float, float] = AMPLITUDE_RANGE,
        phase_range: tuple[float, float] = PHASE_RANGE,
        input_range: tuple[float, float] = INPUT_RANGE,
    ) -> None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(
                f"dtype must be a floating torch.dtype such as torch.float32 or torch.float64, got {dtype!r}"
            )
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.amplitude_range = _check_range("amplitude_range", amplitude_range)
        self.phase_range = _check_range("phase_range", phase_range)
        self.input_range = _check_range("input_range", input_range)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def __repr__(self) -> str:
        return (
            f"SinusoidTasks(seed={self.seed}, dtype={self.dtype}, amplitude_range={self.amplitude_range}, "
            f"phase_range={self.phase_range}, input_range={self.input_range})"
        )

    def reseed(self, seed: int) -> None:
        """Restart the sampler's generator from ``seed``."""
        self.seed = int(seed)
        self.generator.manual_seed(self.seed)

    def sample(
        self,
        meta_batch: int = 25,
        shots: int = 10,
        query: Optional[int] = None,
        *,
        generator: Optional[torch.Generator] = None,
    ) -> SinusoidBatch:
        """Draw ``meta_batch`` tasks with ``shots`` support and ``query`` query points each.

        Args:
            meta_batch: number of tasks ``T`` (25 in MAML).
            shots: support points per task ``K`` (5, 10 or 20 in the papers).
            query: query points per task; defaults to ``shots`` (the official code's ``2K`` draw).
            generator: a CPU :class:`torch.Generator` to use instead of the sampler's own.
        """
        check_count("meta_batch", meta_batch, 1)
        check_count("shots", shots, 0)
        query = shots if query is None else check_count("query", query, 0)
        if shots + query == 0:
            raise ValueError("shots + query must be at least 1")
        gen = self.generator if generator is None else generator
        amplitude = _uniform((meta_batch,), *self.amplitude_range, gen, self.dtype)
        phase = _uniform((meta_batch,), *self.phase_range, gen, self.dtype)
        x = _uniform((meta_batch, shots + query, 1), *self.input_range, gen, self.dtype)
        y = sinusoid(x, amplitude, phase)
        batch = SinusoidBatch(
            support_x=x[:, :shots].contiguous(),
            support_y=y[:, :shots].contiguous(),
            query_x=x[:, shots:].contiguous(),
            query_y=y[:, shots:].contiguous(),
            amplitude=amplitude,
            phase=phase,
        )
        return batch if self.device.type == "cpu" else batch.to(self.device)

    def test_set(
        self,
        num_tasks: int = 600,
        shots: int = 10,
        query: Optional[int] = None,
        *,
        seed: int = DEFAULT_TEST_SEED,
    ) -> SinusoidBatch:
        """The fixed evaluation set: ``num_tasks`` tasks (600 in MAML) drawn from a generator seeded by ``seed``.

        Independent of the sampler's own stream: the same arguments always return the same tasks.
        """
        return self.sample(num_tasks, shots, query, generator=torch.Generator().manual_seed(int(seed)))

    def __iter__(self) -> "SinusoidTasks":
        return self

    def __next__(self) -> SinusoidBatch:
        """``next(tasks)`` is ``tasks.sample()`` with the defaults (25 tasks, 10 + 10 points)."""
        return self.sample()
