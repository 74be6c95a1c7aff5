"""Prove your own differentiable optimizer right with diffopt.testing.

Here a user-written "normalised SGD" is checked twice. The first version
normalises by the norm of the whole gradient tensor, which inside the engine
includes the task dimension, so tasks leak into each other: the kit's
independence check flags it. The fixed version reduces only over the
parameter's own dimensions (``hp["task_dims"]`` leading dimensions are tasks)
and passes: hypergradients against finite differences, and cross-mode parity.

    python examples/check_my_optimizer.py
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from diffopt import optim
from diffopt.optim.sgd import SGDRule
from diffopt.testing import check_modes, check_optimizer


class LeakySGDRule(SGDRule):
    """SGD whose step is divided by (1 + ||g||²)^½ over the whole tensor (wrong under a task batch)."""

    def update_one(self, param: Tensor, grad: Tensor, state, hp):
        scale = torch.sqrt(1 + (grad * grad).sum())
        return super().update_one(param, grad / scale, state, hp)


class ScaledSGDRule(SGDRule):
    """The same normalisation per task: sum over the parameter's own dimensions only."""

    def update_one(self, param: Tensor, grad: Tensor, state, hp):
        own = tuple(range(hp["task_dims"], grad.dim()))
        scale = torch.sqrt(1 + (grad * grad).sum(dim=own, keepdim=True))
        return super().update_one(param, grad / scale, state, hp)


class LeakySGD(optim.SGD):
    rule_class = LeakySGDRule


class ScaledSGD(optim.SGD):
    rule_class = ScaledSGDRule


def check(cls: type) -> bool:
    reports = check_optimizer(cls, None, hyperparameters={"lr": 0.05})
    g = torch.Generator().manual_seed(0)
    data = tuple(torch.randn(3, n, 1, generator=g, dtype=torch.float64) for n in (5, 5, 6, 6))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    reports += check_modes(model, lambda ps: cls(ps, lr=lr), data,
                           modes=("independence", "vectorize", "checkpointed", "forward"))
    print(f"\n{cls.__name__}:")
    for report in reports:
        print(report)
    return all(r.passed for r in reports)


def main() -> bool:
    leaky, fixed = check(LeakySGD), check(ScaledSGD)
    print(f"\nLeakySGD flagged: {not leaky}; ScaledSGD passes: {fixed}")
    return fixed and not leaky


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
