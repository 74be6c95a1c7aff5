"""diffopt.optim.LBFGS and lbfgs_solve.

* trajectories equal torch.optim.LBFGS's (float64, <= 1e-10; bit-identical in practice) with and
  without the strong-Wolfe line search, over hypothesis-drawn options and several ``step`` calls;
* unrolled meta-gradients (through the two-loop recursion and the step sizes; line-search decisions
  constant) against central finite differences (<= 1e-6 relative);
* the implicit gradient of ``lbfgs_solve`` against the closed form of ridge regression and against
  finite differences; errors.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffopt.optim import LBFGS, lbfgs_solve
from strategies import F64, central_differences, examples, record

pytestmark = pytest.mark.usefixtures("single_thread")


def logistic_problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(30, 6, generator=g, dtype=F64), torch.randn(30, generator=g, dtype=F64).sign()
    x0 = [torch.randn(6, generator=g, dtype=F64), torch.randn(2, 3, generator=g, dtype=F64)]

    def objective(ps, lam=0.1):
        w = torch.cat([ps[0], ps[1].reshape(-1)])
        margin = (a @ w[:6] + 0.3 * torch.tanh(ps[1]).sum()) * b
        return torch.nn.functional.softplus(-margin).mean() + lam * (w**2).sum()

    return x0, objective


@settings(max_examples=examples(8))
@given(seed=st.integers(0, 2**16), line_search=st.sampled_from([None, "strong_wolfe"]),
       history=st.integers(1, 12), max_iter=st.integers(1, 25), lr=st.sampled_from([1.0, 0.5, 0.05]),
       tolerance_grad=st.sampled_from([1e-7, 1e-5]), calls=st.integers(1, 4))
def test_trajectory_equals_torch(seed, line_search, history, max_iter, lr, tolerance_grad, calls):
    x0, objective = logistic_problem(seed)
    options = dict(lr=lr, history_size=history, max_iter=max_iter, line_search_fn=line_search,
                   tolerance_grad=tolerance_grad)
    reference = [x.clone().requires_grad_() for x in x0]
    torch_opt = torch.optim.LBFGS(reference, **options)

    def closure():
        torch_opt.zero_grad()
        loss = objective(reference)
        loss.backward()
        return loss

    ours = LBFGS([x.clone().requires_grad_() for x in x0], **options)
    worst = 0.0
    for _ in range(calls):
        torch_opt.step(closure)
        current = ours.step(objective)
        worst = max(worst, max(float((a.detach() - r.detach()).abs().max()) for a, r in zip(current, reference)))
    assert ours.state["func_evals"] == torch_opt.state[reference[0]]["func_evals"]
    assert ours.state["n_iter"] == torch_opt.state[reference[0]]["n_iter"]
    assert record("parity", "LBFGS", worst) <= 1e-10


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
@pytest.mark.parametrize("seed", [0, 1])
def test_unrolled_meta_gradient_matches_finite_differences(line_search, seed):
    """d(outer loss)/d(lam, lr, x0) through 2 calls x 4 iterations, the line search included."""
    x0, objective = logistic_problem(seed)
    g = torch.Generator().manual_seed(seed + 10)
    target = [torch.randn_like(x) for x in x0]

    def outer(x_init, lam, lr):
        opt = LBFGS(x_init, lr=lr, max_iter=4, history_size=3, line_search_fn=line_search)
        for _ in range(2):
            current = opt.step(lambda ps: objective(ps, lam))
        return sum(((c - t) ** 2).sum() for c, t in zip(current, target))

    leaves = [x.clone().requires_grad_() for x in x0]
    lam, lr = torch.tensor(0.1, dtype=F64, requires_grad=True), torch.tensor(0.7, dtype=F64, requires_grad=True)
    grads = torch.autograd.grad(outer(leaves, lam, lr), leaves + [lam, lr])
    direction = [torch.randn(t.shape, generator=g, dtype=F64) for t in leaves + [lam, lr]]
    norm = sum(float((d * d).sum()) for d in direction) ** 0.5
    direction = [d / norm for d in direction]
    analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, direction))

    def along(h):
        xs = [(x + h * d).requires_grad_() for x, d in zip(x0, direction)]
        return float(outer(xs, torch.tensor(0.1 + h * float(direction[-2]), dtype=F64),
                           torch.tensor(0.7 + h * float(direction[-1]), dtype=F64)).detach())

    error = min(abs(n - analytic) for n in central_differences(along, 1.0, steps=(1e-7, 1e-6, 1e-5))) / abs(analytic)
    assert record("finite differences", "LBFGS unrolled", error) <= 1e-6


def ridge(seed: int = 0, n: int = 20, dim: int = 5):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, dim, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    c = torch.randn(dim, generator=g, dtype=F64)

    def objective(xs, thetas):
        (x,), (log_lam,) = xs, thetas
        return 0.5 * ((a @ x - b) ** 2).sum() + 0.5 * log_lam.exp() * (x**2).sum()

    return a, b, c, objective


def test_implicit_gradient_equals_the_closed_form_of_ridge():
    a, b, c, objective = ridge()
    log_lam = torch.tensor(0.3, dtype=F64, requires_grad=True)
    (x,) = lbfgs_solve(objective, [torch.zeros(5, dtype=F64)], [log_lam], steps=5)
    lam = log_lam.detach().exp()
    hessian = a.T @ a + lam * torch.eye(5, dtype=F64)
    exact = torch.linalg.solve(hessian, a.T @ b)
    assert (x.detach() - exact).abs().max() <= 1e-10
    loss = (c * x).sum() ** 2
    (grad,) = torch.autograd.grad(loss, log_lam)
    # dx*/dlog_lam = -lam H^{-1} x*,  dL/dx = 2 (c.x) c
    closed = float(2 * (c @ exact) * (c @ torch.linalg.solve(hessian, -lam * exact)))
    assert record("closed form", "lbfgs_solve", abs(float(grad) - closed) / abs(closed)) <= 1e-9


def test_implicit_gradient_matches_finite_differences_on_a_nonquadratic_problem():
    x0, logistic = logistic_problem(3)

    def objective(xs, thetas):
        return logistic(xs, thetas[0].exp())

    log_lam = torch.tensor(-1.5, dtype=F64, requires_grad=True)
    targets = [torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=F64) for x in x0]

    def outer(value):
        xs = lbfgs_solve(objective, x0, [value], steps=10)
        return sum(((x - t) ** 2).sum() for x, t in zip(xs, targets))

    (grad,) = torch.autograd.grad(outer(log_lam), log_lam)
    # (the solves stop at a gradient norm of ~1e-10, so each value is exact to ~1e-10: steps of 1e-4 to
    # 1e-2 with Richardson extrapolation keep that noise and the truncation error both below 1e-7)
    numeric = list(central_differences(lambda h: float(outer(torch.tensor(-1.5 + h, dtype=F64))), 1.0,
                                       steps=(1e-4, 1e-3, 1e-2)))
    error = min(abs(n - float(grad)) for n in numeric) / abs(float(grad))
    assert record("finite differences", "lbfgs_solve", error) <= 1e-6


def test_errors():
    w = torch.zeros(3, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="line_search_fn"):
        LBFGS([w], line_search_fn="armijo")
    with pytest.raises(ValueError, match="one parameter group"):
        LBFGS([{"params": [w]}, {"params": [torch.zeros(1, requires_grad=True)]}])
    with pytest.raises(TypeError, match="scalar loss"):
        LBFGS([w]).step(lambda ps: ps[0] * 2)


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_a_parameter_built_frozen_stays_put_as_in_torch(tensor_lr):
    """A parameter with requires_grad=False gets a zero gradient and never moves (torch.optim.LBFGS);
    before, the first move gave it a graph, from then on it was differentiated and moved (review)."""
    def f(w, c):
        return ((w - 1) ** 2).sum() * (1 + c.sum() ** 2) + (w * c).sum() + c.sum() ** 2

    w0, frozen = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True), torch.tensor([3.0], dtype=F64)
    w = w0.detach().clone().requires_grad_()
    c = frozen.clone()
    reference = torch.optim.LBFGS([w, c], lr=0.5, max_iter=3)

    def closure():
        reference.zero_grad()
        loss = f(w, c)
        loss.backward()
        return loss

    reference.step(closure)
    lr = torch.tensor(0.5, dtype=F64, requires_grad=True) if tensor_lr else 0.5
    new_w, new_c = LBFGS([w0, frozen], lr=lr, max_iter=3).step(lambda ps: f(*ps))
    assert torch.equal(new_c, frozen) and not new_c.requires_grad
    assert torch.allclose(new_w, w, rtol=0, atol=1e-12)


def test_a_nan_learning_rate_is_refused():
    with pytest.raises(ValueError, match="LBFGS: invalid lr nan"):
        LBFGS([torch.zeros(2, dtype=F64, requires_grad=True)], lr=float("nan"))
