r"""Zero-order meta-gradients: antithetic evolution strategies and persistent ES.

ES: :math:`\hat g = \frac{1}{2\sigma^2 N}\sum_i [L(\theta+\varepsilon_i) - L(\theta-\varepsilon_i)]\,\varepsilon_i`
with :math:`\varepsilon_i \sim N(0, \sigma^2 I)`, an unbiased estimate of the gradient of the
Gaussian-smoothed loss. PES (Vicol, Metz & Sohl-Dickstein, 2021): the unroll is cut into
truncations of ``truncation`` steps; each truncation draws fresh :math:`\varepsilon_s` for both
antithetic particles, which persist across truncations, and accumulates
:math:`\xi = \sum_s \varepsilon_s`; the estimate of :math:`\nabla\,\mathrm{mean}_s L_s` is
:math:`\frac{1}{2\sigma^2 N S}\sum_i\sum_s [L_s(+) - L_s(-)]\,\xi_{i,s}`. The meta-loss value is the
unperturbed loss (ES) or the mean of the unperturbed truncation losses (PES).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..carry import Adapted, Carry, unique
from ._base import Mode, check_positive_int

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import InnerLoop, LossFn


@dataclass(eq=False)
class ES(Mode):
    """Antithetic evolution strategies over ``wrt`` (default: the tensor hyperparameters,
    the model's parameters and the extra meta-parameters that require grad):
    ``samples`` antithetic pairs at scale ``sigma``, drawn from ``generator``."""

    samples: int = 16
    sigma: float = 1e-2
    wrt: Sequence[Tensor] | None = None
    generator: torch.Generator | None = None
    name: ClassVar[str] = "es"
    legacy_options: ClassVar[dict[str, str]] = {
        "es_samples": "samples", "es_sigma": "sigma", "es_wrt": "wrt", "generator": "generator",
    }
    differentiates_adapted_weights: ClassVar[bool] = False

    def validate(self, steps: int) -> None:
        counts = isinstance(self.samples, int) and not isinstance(self.samples, bool)
        if not counts or self.samples < 1 or not (isinstance(self.sigma, (int, float)) and self.sigma > 0
                                                   and math.isfinite(self.sigma)):
            raise ValueError(f"es_samples must be >= 1 and es_sigma > 0 (antithetic pairs, perturbation scale), "
                             f"got es_samples={self.samples!r}, es_sigma={self.sigma!r}")

    def truncation_length(self, steps: int) -> int:
        return steps

    def adapt(self, loop: InnerLoop, carry: Carry, x: Tensor, y: Tensor, info: dict[str, Any]) -> Carry:
        return loop.run(carry, loop.steps, x, y, "none")  # the adapted weights themselves carry no gradient

    def meta_loss(self, loop: InnerLoop, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                  loss_fn: LossFn | None, info: dict[str, Any]) -> Tensor:
        wrt = list(self.wrt) if self.wrt is not None else (
            loop.optimizer.hyperparameter_tensors() + [t for t in loop.theta if t.requires_grad]
            + loop.meta_parameters)
        wrt = unique([w for w in wrt if w.requires_grad])
        truncation = max(self.truncation_length(loop.steps), 1)
        bounds = list(range(0, loop.steps, truncation)) or [0]

        def particle(noise: list[list[Tensor]] | None) -> list[Tensor]:
            """Mean query loss at the end of each truncation for one particle (θ + noise)."""
            carry, losses = None, []
            for s, start in enumerate(bounds):
                shifted = [w.detach() + (0 if noise is None else noise[s][k]) for k, w in enumerate(wrt)]
                mapping = {id(w): v for w, v in zip(wrt, shifted)}
                optimizer = loop.with_hyperparameters(mapping)
                theta = [mapping.get(id(t), t.detach()) for t in loop.theta]
                if carry is None:
                    carry = loop.initial_carry(support_x.shape[0], theta)
                length = min(truncation, loop.steps - start) if loop.steps else 0
                with perturbed(loop.meta_parameters, mapping):
                    carry = loop.run(carry, length, support_x, support_y, "none", optimizer=optimizer, theta=theta)
                    adapted = Adapted(carry.params, loop.adapted_mask, carry.buffers, {})
                    with torch.no_grad():
                        losses.append(loop.query_losses(adapted, query_x, query_y, loss_fn).mean())
            return losses

        per_sample = []
        for _ in range(self.samples):
            noises = [[torch.randn(w.shape, generator=self.generator, dtype=w.dtype, device=w.device) * self.sigma
                       for w in wrt] for _ in bounds]
            plus = particle(noises)
            minus = particle([[-n for n in segment] for segment in noises])
            estimate = [torch.zeros_like(w) for w in wrt]
            accumulated = [torch.zeros_like(w) for w in wrt]
            for s in range(len(bounds)):
                accumulated = [a + n for a, n in zip(accumulated, noises[s])]
                difference = (plus[s] - minus[s]) / (2 * self.sigma**2 * len(bounds))
                estimate = [e + difference * a for e, a in zip(estimate, accumulated)]
            per_sample.append(estimate)
        stacked = [torch.stack([sample[k] for sample in per_sample]) for k in range(len(wrt))]
        variance = sum(float(s.var(0, unbiased=True).sum()) for s in stacked) if self.samples > 1 else float("nan")
        value = torch.stack(particle(None)).mean()
        info.update(es_samples=self.samples, es_sigma=self.sigma, truncations=len(bounds),
                    estimate_variance=variance,
                    estimate_standard_error=math.sqrt(variance / self.samples) if self.samples > 1 else float("nan"))
        return _EstimatedLoss.apply(value, [s.mean(0) for s in stacked], *wrt)


@dataclass(eq=False)
class PES(ES):
    """Persistent evolution strategies over truncations of ``truncation`` steps (default K:
    then PES is ES)."""

    truncation: int | None = None
    name: ClassVar[str] = "pes"
    legacy_options: ClassVar[dict[str, str]] = {**ES.legacy_options, "pes_truncation": "truncation"}

    def validate(self, steps: int) -> None:
        super().validate(steps)
        check_positive_int(self.truncation, "pes_truncation", "steps per truncation", allow_none=True)

    def truncation_length(self, steps: int) -> int:
        return self.truncation or steps


class _EstimatedLoss(torch.autograd.Function):
    """The meta-loss value, with a backward that returns the zero-order estimate."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, estimates: list[Tensor], *wrt: Tensor) -> Tensor:
        ctx.estimates = estimates
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        return (None, None, *[grad * e for e in ctx.estimates])


@contextlib.contextmanager
def perturbed(tensors: list[Tensor], mapping: dict[int, Tensor]) -> Iterator[None]:
    """Temporarily give extra meta-parameters (leaves a ``loss_fn`` closes over) the shifted values, and
    give them back their own storage after. Swapping ``.data`` leaves the tensors' version counters
    alone: an in-place copy would make every earlier graph that saved them unusable ("modified by an
    inplace operation"), e.g. a regulariser of the same meta-parameter summed with the meta-loss."""
    targets = [(t, mapping[id(t)]) for t in tensors if id(t) in mapping]
    originals = [t.data for t, _ in targets]
    for t, value in targets:
        t.data = value.detach()
    try:
        yield
    finally:
        for (t, _), original in zip(targets, originals):
            t.data = original
