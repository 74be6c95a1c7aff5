"""L-BFGS as the engine's inner optimizer (#18): one L-BFGS per task, differentiable by unrolling
(second order) or by the implicit function theorem (iMAML).

References: the ridge closed form (implicit mode: exact whatever solver found the solution),
central finite differences (the unroll), and a hand-written loop that runs diffopt's LBFGS on each
task's own functional model (the engine's per-task plumbing: slicing, closures, stacking)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from diffopt.optim import LBFGS
from diffopt.unroll import InnerLoop
from test_unroll import F64, assert_matches_finite_differences, grads_of, hyper, single_threaded  # noqa: F401
from test_unroll_implicit_forward import (
    IMPLICIT_TOL, linear_model, proximal_ridge_closed_form, relative, ridge_data,
)


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
@pytest.mark.parametrize("learn_lambda", [False, True])
def test_implicit_imaml_with_an_lbfgs_inner_solver_matches_the_ridge_closed_form(line_search, learn_lambda):
    data = ridge_data(1)
    model = linear_model(2)
    lam = hyper(1.0) if learn_lambda else 1.0
    solver = LBFGS(model.parameters(), lr=1, max_iter=100, tolerance_grad=1e-15, tolerance_change=0.0,
                   line_search_fn=line_search)
    loop = InnerLoop(model, solver, steps=1, mode="implicit", proximal=lam, solver_iterations=100,
                     solver_tol=1e-13)
    wrt = [model.weight] + ([lam] if learn_lambda else [])
    loss = loop.meta_loss(*data)
    ours = grads_of(loss, wrt)
    theta = model.weight.detach().clone().requires_grad_()
    lam_ref = hyper(1.0) if learn_lambda else 1.0
    reference_loss = proximal_ridge_closed_form(theta, lam_ref, data)
    reference = grads_of(reference_loss, [theta] + ([lam_ref] if learn_lambda else []))
    # L-BFGS converged: measured 0.0 relative without a line search, 2.0e-11 with strong Wolfe (its
    # last bracket stalls there); the hypergradients then agree to 3e-16 and 2.0e-10
    assert abs(float(loss.detach()) - float(reference_loss.detach())) <= 1e-10 * float(reference_loss.detach())
    assert relative(ours, reference) <= IMPLICIT_TOL
    assert loop.vectorize is False and "L-BFGS" in loop.vectorize_reason


def small_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(F64)
    g = torch.Generator().manual_seed(seed + 1)
    data = [torch.randn(2, n, d, generator=g, dtype=F64) for n, d in ((6, 2), (6, 1), (5, 2), (5, 1))]
    return model, data


def hand_written(model: nn.Module, data, lr: torch.Tensor, steps: int, line_search: str | None) -> torch.Tensor:
    """Per task: diffopt's LBFGS on that task's functional model, then the query loss; mean over tasks."""
    sx, sy, qx, qy = data
    names = [n for n, _ in model.named_parameters()]
    theta = list(model.parameters())
    total = 0.0
    for t in range(sx.shape[0]):
        solver = LBFGS(theta, lr=lr, max_iter=3, line_search_fn=line_search)
        params = theta
        for _ in range(steps):
            params = solver.step(lambda ps: ((functional_call(model, dict(zip(names, ps)), (sx[t],)) - sy[t]) ** 2
                                             ).mean())
        total = total + ((functional_call(model, dict(zip(names, params)), (qx[t],)) - qy[t]) ** 2).mean()
    return total / sx.shape[0]


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_second_order_through_lbfgs_equals_a_hand_written_per_task_loop_and_finite_differences(line_search):
    model, data = small_problem()
    lr = hyper(0.5)
    loop = InnerLoop(model, LBFGS(model.parameters(), lr=lr, max_iter=3, line_search_fn=line_search), steps=2)
    wrt = [*model.parameters(), lr]
    ours = grads_of(loop.meta_loss(*data), wrt)
    reference = grads_of(hand_written(model, data, lr, 2, line_search), wrt)
    assert relative(ours, reference) <= 1e-12
    # central differences along one random direction of every input (small steps: the line
    # search's decisions stay put; their branches are constants of the derivative)
    assert_matches_finite_differences(loop, data, wrt, ours, seed=7)


def test_first_order_lbfgs_gives_the_query_gradient_at_the_adapted_weights():
    model, data = small_problem(3)
    loop = InnerLoop(model, LBFGS(model.parameters(), lr=0.5, max_iter=3), steps=2, mode="first_order")
    ours = grads_of(loop.meta_loss(*data), list(model.parameters()))
    adapted = loop.adapt(*data[:2])
    names = [n for n, _ in model.named_parameters()]
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for t in range(data[0].shape[0]):
        leaves = [p.detach().requires_grad_() for p in adapted.task(t)]
        loss = ((functional_call(model, dict(zip(names, leaves)), (data[2][t],)) - data[3][t]) ** 2).mean()
        for e, g in zip(expected, torch.autograd.grad(loss / data[0].shape[0], leaves)):
            e += g
    assert relative(ours, expected) <= 1e-12


def test_what_a_per_task_lbfgs_cannot_do_is_refused():
    model, _ = small_problem()
    with pytest.raises(ValueError, match="runs task by task"):
        InnerLoop(model, LBFGS(model.parameters()), vectorize=True)
    with pytest.raises(ValueError, match="runs in modes second_order, first_order, truncated, implicit, not "
                                         "'checkpointed'"):
        InnerLoop(model, LBFGS(model.parameters()), mode="checkpointed")
