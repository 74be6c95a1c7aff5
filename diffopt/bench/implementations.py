"""One implementation of the meta-step per name: an engine mode (``diffopt.algorithms.MAML``
in that mode) or a baseline (:mod:`.baselines`), each on its own copy of the model."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..algorithms import MAML
from .baselines import BASELINE_BUILDERS, Batch, baseline_available
from .problems import Problem
from .settings import MODES, Settings


def truncate_window(steps: int, settings: Settings) -> int:
    return min(steps, settings.truncate) if settings.truncate else max(1, steps // 2)


def make_learner(problem: Problem, model: nn.Module, steps: int, mode: str, settings: Settings) -> Any:
    """``diffopt.algorithms.MAML`` in ``mode`` with the benchmark's per-mode settings."""
    options: dict[str, Any] = {"vectorize": problem.vectorize, "batchnorm": problem.batchnorm}
    lr: float | Tensor = problem.inner_lr
    if mode == "truncated":
        options["truncate"] = truncate_window(steps, settings)
    elif mode == "checkpointed":
        options["segment"] = settings.segment
    elif mode == "implicit":
        options.update(proximal=settings.proximal, solver=settings.solver, solver_iterations=settings.solver_iterations)
    elif mode == "forward":
        lr = torch.tensor(problem.inner_lr, requires_grad=True)  # forward_wrt defaults to the tensor lr
    elif mode in ("es", "pes"):
        options.update(es_samples=settings.es_samples, es_sigma=settings.es_sigma,
                       generator=torch.Generator().manual_seed(settings.seed))
        if mode == "pes":
            options["pes_truncation"] = min(settings.pes_truncation, max(steps, 1))
    return MAML(model, problem.loss_fn, lr, steps, mode=mode, **options)


class Implementation:
    """One implementation of the meta-step on its own copy of the model: ``step(batch)`` sets the
    meta-gradients; ``gradients()`` reads those of the model's parameters."""

    def __init__(self, name: str, problem: Problem, model: nn.Module, steps: int, settings: Settings) -> None:
        self.name, self.model = name, model
        self.learner = None
        if name in MODES:
            self.learner = make_learner(problem, model, steps, name, settings)
            learner = self.learner

            def step(batch: Batch) -> Tensor:
                loss = learner.meta_loss(*batch)
                loss.backward()
                return loss.detach()

            self.parameters = list(self.learner.parameters())
        else:
            baseline, order = name.rsplit(" ", 1)
            why = baseline_available(baseline)
            if why is not None:
                raise ModuleNotFoundError(why)
            step = BASELINE_BUILDERS[baseline](model, problem.loss_fn, problem.inner_lr, steps, order == "FO")
            self.parameters = list(model.parameters())
        self.theta = list(model.parameters())
        self.step = step

    def zero_grad(self) -> None:
        for p in self.parameters:
            p.grad = None

    def call(self, batch: Batch) -> Callable[[], None]:
        def meta_step() -> None:
            self.zero_grad()
            self.step(batch)

        return meta_step

    def gradients(self) -> list[Tensor] | None:
        grads = [p.grad for p in self.theta]
        if all(g is None for g in grads):
            return None
        return [torch.zeros_like(p) if g is None else g.detach().clone() for p, g in zip(self.theta, grads)]


def _compare(grads: list[Tensor] | None, reference: list[Tensor] | None) -> dict[str, float | None]:
    if grads is None or reference is None:
        return {"cosine": None, "relative_error": None}
    a = torch.cat([g.reshape(-1) for g in grads]).double()
    b = torch.cat([g.reshape(-1) for g in reference]).double()
    na, nb = float(a.norm()), float(b.norm())
    cosine = float(a @ b) / (na * nb) if na > 0 and nb > 0 else None
    return {"cosine": cosine, "relative_error": float((a - b).norm()) / nb if nb > 0 else None}


def _error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
