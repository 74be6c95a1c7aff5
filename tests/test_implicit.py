"""diffopt.implicit: custom_root / custom_fixed_point and the linear solvers, in float64.

* closed forms (<= 1e-8): ridge regression's ``dx*/dλ`` for a shared and a per-feature λ, with every
  linear solver; a quadratic's ``dx*/dθ = −Q⁻¹B``; second derivatives;
* logistic regression solved by scipy's L-BFGS-B: the hypergradient against a dense
  implicit-function-theorem reference (<= 1e-8) and central finite differences (<= 1e-6 relative);
* each linear solver against ``torch.linalg.solve`` on hypothesis-drawn systems;
* ``custom_fixed_point`` (a gradient-descent map, and a non-symmetric contraction);
* the ``torch.func`` compositions: ``vmap``, ``grad``, ``jacrev``, ``jacfwd``, ``jvp``, ``hessian``,
  forward-mode AD; scalar and 0-dim inputs (torchopt #222) and vmap/jacrev (torchopt #223) as
  regression tests; several outputs; dicts;
* bad input: a residual far from zero, a linear solve that does not converge, arguments that do not
  require grad (no-op), an optimality condition that ignores an argument.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffopt.errors import LinearSolveError, LinearSolveWarning, OptimalityResidualError, OptimalityResidualWarning
from diffopt.implicit import (CG, GMRES, MINRES, Dense, Neumann, NormalCG, conjugate_gradient, custom_fixed_point,
                              custom_root, dense, gmres, minres)
from strategies import F64, central_differences, examples, record

pytestmark = pytest.mark.usefixtures("single_thread")


def ridge_data(seed: int, n: int = 12, d: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)


def ridge_condition(x, lam, a, b):
    """∇ₓ ½‖Ax − b‖² + ½ Σ λᵢxᵢ² (λ a scalar or one per feature)."""
    return a.T @ (a @ x - b) + lam * x


def ridge_closed(lam, a, b):
    lam = lam * torch.ones(a.shape[1], dtype=a.dtype) if lam.dim() == 0 else lam
    return torch.linalg.solve(a.T @ a + torch.diag(lam), a.T @ b)


def ridge_solver(solve="cg", **options):
    @custom_root(ridge_condition, solve=solve, **options)
    def ridge(init, lam, a, b):
        return ridge_closed(lam, a, b)
    return ridge


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


SOLVES = {
    "cg": CG(), "minres": MINRES(), "gmres": GMRES(), "normal_cg": NormalCG(iterations=200),
    "dense": Dense(), "dense_lstsq": Dense(lstsq=True), "neumann": None,  # built per example
}


# -- closed forms --------------------------------------------------------------------------------

@pytest.mark.parametrize("solve", list(SOLVES))
@settings(max_examples=examples(4), deadline=None)
@given(seed=st.integers(0, 2**16), lam=st.floats(0.05, 20.0), per_feature=st.booleans(), d=st.integers(1, 6))
def test_ridge_hypergradient_equals_the_closed_form(solve, seed, lam, per_feature, d):
    a, b = ridge_data(seed, n=12, d=d)
    if solve == "neumann":  # ‖AᵀA‖ = 1 and λ >= 1: the spectrum of AᵀA + λI lies in [0.5, 1 + max λ]
        a, lam = a / torch.linalg.matrix_norm(a, 2), 1.0 + lam
    lam_t = (torch.full((d,), lam, dtype=F64) * torch.linspace(0.5, 1.5, d, dtype=F64) if per_feature
             else torch.tensor(lam, dtype=F64))
    c = torch.randn(d, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    solver = SOLVES[solve]
    if solve == "neumann":  # α = 1/λ_max; the series contracts by 1 − λ_min/λ_max <= 1 − 1/64 per term
        solver = Neumann(iterations=3000, alpha=1.0 / (1.0 + float(lam_t.max())), tol=1e-10)
    ridge = ridge_solver(solver)
    lam_v = lam_t.clone().requires_grad_()
    (grad,) = torch.autograd.grad((c * ridge(None, lam_v, a, b)).sum() ** 2, lam_v)
    lam_r = lam_t.clone().requires_grad_()
    (exact,) = torch.autograd.grad((c * ridge_closed(lam_r, a, b)).sum() ** 2, lam_r)
    error = record("closed form", f"custom_root ridge ({solve})", relative(grad, exact))
    assert error <= 1e-8, error
    assert ridge.last_solve.solver == solver.name


def test_ridge_gradient_wrt_the_data_too():
    """Every floating-point argument is differentiated: the design matrix and targets as well."""
    a, b = ridge_data(0)
    lam = torch.tensor(0.7, dtype=F64)
    ridge = ridge_solver()
    av, bv = a.clone().requires_grad_(), b.clone().requires_grad_()
    grads = torch.autograd.grad(ridge(None, lam, av, bv).pow(2).sum(), [av, bv])
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    exact = torch.autograd.grad(ridge_closed(lam, ar, br).pow(2).sum(), [ar, br])
    for g, e in zip(grads, exact):
        assert relative(g, e) <= 1e-8


@settings(max_examples=examples(6), deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 7), m=st.integers(1, 4))
def test_quadratic_jacobian_equals_minus_q_inverse_b(seed, n, m):
    """x* = argmin ½xᵀQx + (Bθ − c)ᵀx: dx*/dθ = −Q⁻¹B (jacrev and jacfwd)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, n, generator=g, dtype=F64)
    q = r @ r.T + 0.5 * torch.eye(n, dtype=F64)
    bm, c = torch.randn(n, m, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    theta = torch.randn(m, generator=g, dtype=F64)

    @custom_root(lambda x, t: q @ x + bm @ t - c)
    def solve(init, t):
        return torch.linalg.solve(q, c - bm @ t)

    exact = -torch.linalg.solve(q, bm)
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        error = record("closed form", "custom_root quadratic", relative(jac(lambda t: solve(None, t))(theta), exact))
        assert error <= 1e-8, (jac.__name__, error)


@pytest.mark.parametrize("solve", ["dense", "cg", "minres", "gmres", "normal_cg"])
def test_second_derivatives_are_exact(solve):
    """The backward saves x* as this Function's output, so differentiating the backward again sees x*'s own
    dependence on θ: hessian / jacrev∘jacrev / autograd double backward equal the closed form's. Under
    jacrev∘jacrev the inner backward is vmapped: CG cannot stop early there and must stay finite after it
    converges (it gave NaN before converged systems were frozen)."""
    a, b = ridge_data(2)
    ridge = ridge_solver(solve)
    lam = torch.linspace(0.3, 1.2, 4, dtype=F64)
    f = lambda v: (ridge(None, v, a, b) ** 3).sum()  # noqa: E731
    exact = torch.func.hessian(lambda v: (ridge_closed(v, a, b) ** 3).sum())(lam)
    assert relative(torch.func.hessian(f)(lam), exact) <= 1e-10
    assert relative(torch.func.jacrev(torch.func.jacrev(f))(lam), exact) <= 1e-10
    v = lam.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(v), v, create_graph=True)
    rows = torch.stack([torch.autograd.grad(g[i], v, retain_graph=True)[0] for i in range(4)])
    assert relative(rows, exact) <= 1e-10


# -- logistic regression solved by scipy ----------------------------------------------------------

def logistic_setup(seed: int = 0, n: int = 60, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, d, generator=g, dtype=F64)
    w_true = torch.randn(d, generator=g, dtype=F64)
    y = (torch.rand(2 * n, generator=g, dtype=F64) < torch.sigmoid(x @ w_true)).to(F64)
    return x[:n], y[:n], x[n:], y[n:]


def logistic_condition(w, lam, x, y):
    """∇_w [mean BCE(xw, y) + ½ Σ λⱼwⱼ²]."""
    return x.T @ (torch.sigmoid(x @ w) - y) / x.shape[0] + lam * w


def scipy_logistic(lam: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from scipy.optimize import minimize
    xn, yn, ln = x.numpy(), y.numpy(), lam.detach().numpy()

    def fun(w):
        z = xn @ w
        loss = np.mean(np.logaddexp(0, z) - yn * z) + 0.5 * np.sum(ln * w * w)
        return loss, xn.T @ (1 / (1 + np.exp(-z)) - yn) / len(yn) + ln * w

    result = minimize(fun, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B",
                      options={"gtol": 1e-13, "ftol": 0.0, "maxiter": 2000})
    return torch.from_numpy(result.x)


def newton_polished(lam, x, y):
    """scipy's solution refined by Newton steps to machine precision (the finite-difference reference)."""
    w = scipy_logistic(lam, x, y)
    for _ in range(3):
        p = torch.sigmoid(x @ w)
        hessian = x.T @ (x * (p * (1 - p))[:, None]) / x.shape[0] + torch.diag(lam)
        w = w - torch.linalg.solve(hessian, logistic_condition(w, lam, x, y))
    return w


def test_logistic_regression_solved_by_scipy_against_dense_ift_and_finite_differences():
    xt, yt, xv, yv = logistic_setup()
    log_lam = torch.linspace(-3, -1, xt.shape[1], dtype=F64)

    @custom_root(logistic_condition, solve="cg")
    def fit(init, lam, x, y):
        return scipy_logistic(lam, x, y)

    def validation(w):
        return torch.nn.functional.binary_cross_entropy_with_logits(xv @ w, yv)

    v = log_lam.clone().requires_grad_()
    w = fit(None, v.exp(), xt, yt)
    assert fit.last_residual <= 1e-9
    (grad,) = torch.autograd.grad(validation(w), v)

    # dense reference: dL/dlogλ = −λ ⊙ w* ⊙ H⁻¹ ∇L(w*)
    lam = log_lam.exp()
    ws = w.detach().requires_grad_()
    (dl,) = torch.autograd.grad(validation(ws), ws)
    p = torch.sigmoid(xt @ ws.detach())
    hessian = xt.T @ (xt * (p * (1 - p))[:, None]) / xt.shape[0] + torch.diag(lam)
    reference = -lam * ws.detach() * torch.linalg.solve(hessian, dl)
    assert record("closed form", "custom_root logistic (scipy) vs dense IFT", relative(grad, reference)) <= 1e-8

    direction = torch.randn(log_lam.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    numeric = list(central_differences(
        lambda h: float(validation(newton_polished((log_lam + h * direction).exp(), xt, yt))), 1.0,
        steps=(1e-5, 1e-4, 1e-3)))
    analytic = float(grad @ direction)
    error = min(abs(n - analytic) for n in numeric) / abs(analytic)
    assert record("finite differences", "custom_root logistic (scipy)", error) <= 1e-6


# -- the linear solvers --------------------------------------------------------------------------

def batched_system(seed: int, tasks: int, n: int, kind: str):
    g = torch.Generator().manual_seed(seed)
    q1 = torch.linalg.qr(torch.randn(tasks, n, n, generator=g, dtype=F64))[0]
    q2 = q1 if kind != "nonsymmetric" else torch.linalg.qr(torch.randn(tasks, n, n, generator=g, dtype=F64))[0]
    s = torch.rand(tasks, n, generator=g, dtype=F64) * 1.5 + 0.5
    if kind == "indefinite":
        s = s * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(F64)
    matrix = q1 @ torch.diag_embed(s) @ q2.transpose(1, 2)
    return matrix, torch.randn(tasks, n, generator=g, dtype=F64)


SOLVER_KINDS = {"cg": ["spd"], "minres": ["spd", "indefinite"], "gmres": ["spd", "indefinite", "nonsymmetric"],
                "dense": ["spd", "indefinite", "nonsymmetric"]}


@pytest.mark.parametrize("name", list(SOLVER_KINDS))
@settings(max_examples=examples(8), deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 12), data=st.data())
def test_each_solver_matches_a_dense_solve(name, seed, n, data):
    kind = data.draw(st.sampled_from(SOLVER_KINDS[name]))
    matrix, b = batched_system(seed, 3, n, kind)

    def apply(u):
        return [torch.einsum("tij,tj->ti", matrix, u[0])]

    solver = {"cg": CG(200, 1e-13), "minres": MINRES(200, 1e-13), "gmres": GMRES(200, 1e-13, restart=20),
              "dense": Dense()}[name]
    (w,), info = solver.solve(apply, [b])
    error = record("linear solve", f"{name} vs torch.linalg.solve", relative(w, torch.linalg.solve(matrix, b)))
    assert error <= 1e-9, (kind, error, info)
    assert info.converged and info.relative_residual <= 1e-10 and info.iterations >= 1


def test_solvers_report_iterations_and_residual_on_lists_of_tensors():
    """A vector may be several tensors of different shapes (a model's parameters); iterations are counted."""
    g = torch.Generator().manual_seed(3)
    diag = [torch.rand(2, 3, generator=g, dtype=F64) + 0.5, torch.rand(2, 2, 2, generator=g, dtype=F64) + 0.5]
    b = [torch.randn(2, 3, generator=g, dtype=F64), torch.randn(2, 2, 2, generator=g, dtype=F64)]
    apply = lambda u: [d * x for d, x in zip(diag, u)]  # noqa: E731
    for fn in (lambda: conjugate_gradient(apply, b, 50, 1e-12), lambda: minres(apply, b, 50, 1e-12),
               lambda: gmres(apply, b, 50, 1e-12), lambda: gmres(apply, b, 50, 1e-12, restart=2),
               lambda: dense(apply, b)):
        w, info = fn()
        for x, d, y in zip(w, diag, b):
            assert relative(x, y / d) <= 1e-10, info
        assert 1 <= info.iterations <= 50 and info.relative_residual <= 1e-10


def test_normal_cg_applies_a_only_as_its_iterations_need():
    """NormalCG: one product for Aᵀb, two per CG iteration and one for the reported residual
    ‖Aw − b‖/‖b‖ of the original system — not also the normal system's residual, which it does not report."""
    matrix, b = batched_system(22, 2, 6, "indefinite")
    calls = []

    def apply(u):
        calls.append(1)
        return [torch.einsum("tij,tj->ti", matrix, u[0])]

    for iterations in (1, 3):
        calls.clear()
        _, info = NormalCG(iterations, tol=0.0, on_fail="ignore").solve(apply, [b])
        assert info.iterations == iterations and len(calls) == 1 + 2 * iterations + 1


def test_normal_cg_stops_on_the_residual_it_reports():
    """NormalCG stops on ‖b − Aw‖/‖b‖ ≤ tol, the residual it reports and checks: on random SPD systems of
    condition 100 it converges without a warning (a stop on the normal equations' residual had left 14 of
    40 just above tol, with a 'raise iterations' warning at any budget), to the dense solution; batched
    over tasks and under vmap (no early stop) it agrees."""
    n = 25
    systems = []
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
        systems.append((q @ torch.diag(torch.logspace(0, 2, n, dtype=F64)) @ q.T,
                        torch.randn(1, n, generator=g, dtype=F64)))
    for m, b in systems:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            (w,), info = NormalCG(iterations=10_000).solve(lambda u: [u[0] @ m], [b])
        assert info.converged and info.relative_residual <= 1e-10 and info.iterations < 200, info
        assert relative(w, torch.linalg.solve(m, b[0])[None]) <= 100 * 1e-10
    m = torch.stack([m for m, _ in systems[:2]])
    b = torch.cat([b for _, b in systems[:2]])
    (w,), info = NormalCG(iterations=200).solve(lambda u: [torch.einsum("tij,tj->ti", m, u[0])], [b])
    assert info.converged and relative(w, torch.linalg.solve(m, b)) <= 1e-8
    mapped = torch.func.vmap(lambda mi, bi: NormalCG(iterations=60).solve(lambda u: [u[0] @ mi], [bi[None]])[0][0][0])
    assert relative(mapped(m, b), torch.linalg.solve(m, b)) <= 1e-8


def test_cg_with_float_steps_equals_the_tensor_recurrence():
    """Outside autograd, one system: CG runs with Python-float step sizes (fewer operations); it
    computes the same iterates as the task-batched recurrence (to rounding), and is not used when the
    solve is differentiated (grad mode on)."""
    matrix, b = batched_system(21, 1, 9, "spd")
    apply = lambda u: [torch.einsum("tij,tj->ti", matrix, u[0])]  # noqa: E731
    with torch.no_grad():
        (fast,), fast_info = CG(50, 1e-13).solve(apply, [b])
    (slow,), slow_info = conjugate_gradient(apply, [b], 50, 1e-13)
    assert relative(fast, slow) <= 1e-12 and fast_info.iterations == slow_info.iterations
    import diffopt.implicit.linear_solve as module
    assert module._nothing_differentiates([b]) is False  # grad mode is on here
    with torch.no_grad():
        assert module._nothing_differentiates([b]) and not module._nothing_differentiates([b.expand(2, 9)])


def test_a_torch_lbfgs_inner_solver():
    """The solver may run its own autograd (torch.optim.LBFGS on a fresh leaf): it sees detached arguments,
    and the hypergradient is the closed form's."""
    a, b = ridge_data(17)

    @custom_root(ridge_condition)
    def fit(init, lam, a, b):
        x = init.clone().requires_grad_()
        optimizer = torch.optim.LBFGS([x], lr=1, max_iter=100, tolerance_grad=1e-13, tolerance_change=0,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = 0.5 * ((a @ x - b) ** 2).sum() + 0.5 * (lam * x * x).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return x.detach()

    lam = torch.tensor([0.3, 0.6, 0.9, 1.2], dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(fit(torch.zeros(4, dtype=F64), lam, a, b).sum(), lam)
    assert fit.last_residual <= 1e-9  # (L-BFGS stops at ‖∇‖ ≈ 2e-10 here)
    exact = torch.func.grad(lambda v: ridge_closed(v, a, b).sum())(lam.detach())
    assert relative(grad, exact) <= 1e-8


# -- custom_fixed_point ------------------------------------------------------------------------------

def test_fixed_point_of_gradient_descent_equals_the_ridge_closed_form():
    a, b = ridge_data(4)
    eta = 1.0 / float(torch.linalg.matrix_norm(a, 2) ** 2 + 2.0)

    def step(x, lam):
        return x - eta * ridge_condition(x, lam, a, b)

    @custom_fixed_point(step, solve="cg")
    def iterate(init, lam):
        x = init
        for _ in range(3000):
            x = step(x, lam)
        return x

    lam = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=F64)
    jac = torch.func.jacrev(lambda v: iterate(torch.zeros(4, dtype=F64), v))(lam)
    exact = torch.func.jacrev(lambda v: ridge_closed(v, a, b))(lam)
    assert record("closed form", "custom_fixed_point (gradient descent)", relative(jac, exact)) <= 1e-8


def test_fixed_point_of_a_nonsymmetric_contraction_matches_finite_differences():
    """x = tanh(Wx + θ) with ‖W‖ < 1: I − ∂T/∂x is not symmetric; GMRES (the default) and dense agree with FD."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(5, 5, generator=g, dtype=F64)
    w = 0.6 * w / torch.linalg.matrix_norm(w, 2)
    u = torch.randn(5, generator=g, dtype=F64)
    T = lambda x, theta: torch.tanh(w @ x + theta)  # noqa: E731

    def iterate(init, theta):
        x = init
        for _ in range(200):
            x = T(x, theta)
        return x

    theta = torch.randn(5, generator=g, dtype=F64)
    direction = torch.randn(5, generator=g, dtype=F64)
    numeric = list(central_differences(lambda h: float(u @ iterate(torch.zeros(5, dtype=F64), theta + h * direction))))
    for solve in ("gmres", "dense", "normal_cg"):
        solver = custom_fixed_point(T, solve=solve)(iterate)
        v = theta.clone().requires_grad_()
        (grad,) = torch.autograd.grad(u @ solver(torch.zeros(5, dtype=F64), v), v)
        analytic = float(grad @ direction)
        error = min(abs(n - analytic) for n in numeric) / abs(analytic)
        assert record("finite differences", f"custom_fixed_point ({solve})", error) <= 1e-6, (solve, error)


# -- torch.func compositions ------------------------------------------------------------------------

@settings(max_examples=examples(5), deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 5), d=st.integers(1, 6))
def test_vmap_over_a_batch_of_regularisations(seed, batch, d):
    """torchopt #223: vmap (and vmap of grad) through the implicit solution."""
    a, b = ridge_data(seed, d=d)
    ridge = ridge_solver()
    lams = torch.logspace(-2, 1, batch, dtype=F64)
    solutions = torch.func.vmap(lambda v: ridge(None, v, a, b))(lams)
    assert relative(solutions, torch.stack([ridge_closed(v, a, b) for v in lams])) <= 1e-12
    grads = torch.func.vmap(torch.func.grad(lambda v: ridge(None, v, a, b).pow(2).sum()))(lams)
    exact = torch.func.vmap(torch.func.grad(lambda v: ridge_closed(v, a, b).pow(2).sum()))(lams)
    assert record("closed form", "custom_root vmap(grad)", relative(grads, exact)) <= 1e-8


@pytest.mark.parametrize("solve", ["cg", "minres", "gmres", "normal_cg", "dense"])
def test_jacrev_jacfwd_and_jvp_agree_with_the_closed_form(solve):
    """torchopt #223: jacrev (a vmap over the backward) works; forward mode (jvp, jacfwd) equals jacrev."""
    a, b = ridge_data(7)
    ridge = ridge_solver(solve)
    lam = torch.tensor([0.2, 0.5, 1.0, 3.0], dtype=F64)
    exact = torch.func.jacrev(lambda v: ridge_closed(v, a, b))(lam)
    rev = torch.func.jacrev(lambda v: ridge(None, v, a, b))(lam)
    fwd = torch.func.jacfwd(lambda v: ridge(None, v, a, b))(lam)
    tangent = torch.tensor([1.0, -2.0, 0.5, 0.25], dtype=F64)
    _, jvp = torch.func.jvp(lambda v: ridge(None, v, a, b), (lam,), (tangent,))
    assert record("closed form", f"custom_root jacrev ({solve})", relative(rev, exact)) <= 1e-8
    assert relative(fwd, exact) <= 1e-8
    assert relative(jvp, exact @ tangent) <= 1e-8


def test_forward_mode_ad_with_dual_tensors():
    a, b = ridge_data(8)
    ridge = ridge_solver()
    lam, tangent = torch.tensor(0.4, dtype=F64), torch.tensor(1.0, dtype=F64)
    with torch.autograd.forward_ad.dual_level():
        out = ridge(None, torch.autograd.forward_ad.make_dual(lam, tangent), a, b)
        derivative = torch.autograd.forward_ad.unpack_dual(out).tangent
    exact = torch.func.jacfwd(lambda v: ridge_closed(v, a, b))(lam)
    assert relative(derivative, exact) <= 1e-8


@pytest.mark.parametrize("solve", ["cg", "minres", "gmres", "normal_cg", "neumann", "dense"])
def test_scalar_root_gets_its_nonzero_gradient(solve):
    """torchopt #222: a 0-dim unknown and a 0-dim parameter. x* = √θ solves x² − θ = 0: dx*/dθ = 1/(2√θ)."""
    @custom_root(lambda x, theta: x * x - theta, solve=Neumann(iterations=200, alpha=0.3) if solve == "neumann"
                 else solve)
    def sqrt(init, theta):
        return theta.sqrt()

    theta = torch.tensor(2.25, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(sqrt(torch.tensor(1.0, dtype=F64), theta), theta)
    assert grad.shape == () and abs(float(grad) - 1 / 3) <= 1e-10
    assert sqrt.last_solve.iterations >= 1
    assert abs(float(torch.func.grad(lambda t: sqrt(None, t))(theta.detach())) - 1 / 3) <= 1e-10
    assert abs(float(torch.func.jacfwd(lambda t: sqrt(None, t))(theta.detach())) - 1 / 3) <= 1e-10
    one = torch.tensor([2.25], dtype=F64, requires_grad=True)  # shape (1,), torchopt's other failing case
    (grad,) = torch.autograd.grad(sqrt(None, one).sum(), one)
    assert abs(float(grad) - 1 / 3) <= 1e-10


def test_several_outputs_and_dicts():
    """x* a (weights, bias) tuple and θ a dict: ridge with an unpenalised intercept, against the closed form."""
    a, b = ridge_data(10)
    n, d = a.shape

    def condition(x, hyper, a, b):
        w, c = x
        r = a @ w + c - b
        return (a.T @ r + hyper["lam"] * w, r.sum() + hyper["mu"] * c)

    @custom_root(condition)
    def fit(init, hyper, a, b):
        ones = torch.ones(n, 1, dtype=F64)
        design = torch.cat([a, ones], 1)
        penalty = torch.diag(torch.cat([hyper["lam"] * torch.ones(d, dtype=F64), hyper["mu"].reshape(1)]))
        z = torch.linalg.solve(design.T @ design + penalty, design.T @ b)
        return z[:d], z[d]

    def closed(lam, mu):
        design = torch.cat([a, torch.ones(n, 1, dtype=F64)], 1)
        penalty = torch.diag(torch.cat([lam * torch.ones(d, dtype=F64), mu.reshape(1)]))
        z = torch.linalg.solve(design.T @ design + penalty, design.T @ b)
        return (z[:d] ** 2).sum() + 3 * z[d]

    lam = torch.tensor(0.8, dtype=F64, requires_grad=True)
    mu = torch.tensor(0.1, dtype=F64, requires_grad=True)
    w, c = fit(None, {"lam": lam, "mu": mu}, a, b)
    grads = torch.autograd.grad((w ** 2).sum() + 3 * c, [lam, mu])
    exact = torch.autograd.grad(closed(lam, mu), [lam, mu])
    for g, e in zip(grads, exact):
        assert relative(g, e) <= 1e-8

    # a dict for x as well, under jacrev
    @custom_root(lambda x, lam: {"w": ridge_condition(x["w"], lam, a, b)})
    def fit_dict(init, lam):
        return {"w": ridge_closed(lam, a, b)}

    jac = torch.func.jacrev(lambda v: fit_dict(None, v)["w"])(torch.tensor(0.6, dtype=F64))
    assert relative(jac, torch.func.jacrev(lambda v: ridge_closed(v, a, b))(torch.tensor(0.6, dtype=F64))) <= 1e-8


def test_has_aux_and_keyword_arguments():
    a, b = ridge_data(11)

    @custom_root(lambda x, lam, *, a, b: ridge_condition(x, lam, a, b), has_aux=True)
    def fit(init, lam, *, a, b):
        return ridge_closed(lam, a, b), {"iterations": 0}

    lam = torch.tensor(0.5, dtype=F64, requires_grad=True)
    x, aux = fit(None, lam, a=a.requires_grad_(), b=b)
    (grad,) = torch.autograd.grad(x.sum(), lam)
    assert aux == {"iterations": 0}
    assert relative(grad, torch.func.grad(lambda v: ridge_closed(v, a.detach(), b).sum())(lam.detach())) <= 1e-8


def test_keyword_tensors_are_differentiated_implicitly_and_the_solver_never_is():
    """A keyword tensor that requires grad gets its implicit gradient, with or without a positional one that
    requires grad (it had got None, or the gradient through the solver's own unrolled iterations); the
    solver's graph is never returned."""
    a, b = ridge_data(21, n=8)
    condition = lambda x, lam, b=None: a.T @ (a @ x - b) + lam * x  # noqa: E731

    def gradient_descent(init, lam, b=None):  # 30 steps: 1e-2 from the root, so its unrolled gradient is off
        x = torch.zeros(4, dtype=F64)
        for _ in range(30):
            x = x - 0.02 * condition(x, lam, b=b)
        return x

    root = custom_root(condition, on_residual="ignore")(gradient_descent)
    lam = torch.tensor(0.5, dtype=F64, requires_grad=True)
    b = b.requires_grad_()
    exact_b, exact_lam = torch.autograd.grad(ridge_closed(lam, a, b).sum(), (b, lam))
    for lam_in in (lam, lam.detach()):
        (grad_b,) = torch.autograd.grad(root(None, lam_in, b=b).sum(), b)
        # the implicit gradient at the returned point x: (AᵀA + λI)⁻¹ applied through Aᵀ, x-independent here
        assert relative(grad_b, exact_b) <= 1e-10
    grad_b, grad_lam = torch.autograd.grad(root(None, lam, b=b).sum(), (b, lam))
    x = gradient_descent(None, lam.detach(), b=b.detach())
    expected_lam = -torch.linalg.solve(a.T @ a + 0.5 * torch.eye(4, dtype=F64), x).sum()
    assert relative(grad_b, exact_b) <= 1e-10 and relative(grad_lam, expected_lam) <= 1e-10
    # torch.func over a keyword argument (a pytree of them) agrees with the closed form
    tree = custom_root(lambda x, lam, *, data: ridge_condition(x, lam, data["a"], data["b"]))(
        lambda init, lam, *, data: ridge_closed(lam, data["a"], data["b"]))
    jac = torch.func.jacrev(lambda v: tree(None, torch.tensor(0.5, dtype=F64), data={"a": a, "b": v}))(b.detach())
    assert relative(jac, torch.func.jacrev(lambda v: ridge_closed(torch.tensor(0.5, dtype=F64), a, v))(b.detach())) \
        <= 1e-10
    # a solver closing over a tensor that requires grad: its own graph is not returned
    scale = torch.tensor(1.0, dtype=F64, requires_grad=True)
    closed = custom_root(ridge_condition)(lambda init, lam, a, b: scale * ridge_closed(lam, a, b))
    assert closed(None, torch.tensor(0.5, dtype=F64), a, b.detach()).grad_fn is None
    ignored = custom_root(lambda x, lam, *, extra: ridge_condition(x, lam, a, b.detach()))(
        lambda init, lam, *, extra: ridge_closed(lam, a, b.detach()))
    with pytest.raises(ValueError, match=r"does not depend on keyword argument \['extra'\].*pass it detached"):
        ignored(None, lam, extra=torch.ones(2, dtype=F64, requires_grad=True))


@pytest.mark.parametrize("solve", ["cg", "minres", "gmres", "normal_cg", "dense", "neumann"])
def test_torchs_batched_gradient_api(solve):
    """autograd.grad(is_grads_batched=True), autograd.functional.jacobian(vectorize=True) and
    gradcheck(check_batched_grad=True) run on torch's legacy batched tensors, whose values cannot be read
    (the solvers had called .item() on them): each equals the Jacobian taken column by column."""
    a, b = ridge_data(22, n=8)
    options = {"neumann": {"solve": Neumann(iterations=400, alpha=0.5 / float(torch.linalg.matrix_norm(a, 2)) ** 2)},
               "normal_cg": {"solve": NormalCG(iterations=200)}}.get(solve, {"solve": solve})
    root = custom_root(ridge_condition, **options)(ridge_solver().__wrapped__)
    lam = torch.tensor(0.5, dtype=F64)
    looped = torch.autograd.functional.jacobian(lambda v: root(None, v, a, b), lam)
    assert relative(looped, torch.autograd.functional.jacobian(lambda v: ridge_closed(v, a, b), lam)) <= 1e-8
    vectorized = torch.autograd.functional.jacobian(lambda v: root(None, v, a, b), lam, vectorize=True)
    assert relative(vectorized, looped) <= 1e-12
    leaf = lam.clone().requires_grad_()
    (batched,) = torch.autograd.grad(root(None, leaf, a, b), leaf, grad_outputs=torch.eye(4, dtype=F64),
                                     is_grads_batched=True)
    assert relative(batched, looped) <= 1e-12
    two = torch.tensor([0.5, 0.8], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: root(None, v[0] * v[1], a, b), (two,), check_batched_grad=True)


def test_damping_is_added_to_the_jacobian():
    """With damping δ the solve is (A + δI)⁻¹: d x*/dλ = −(H + δI)⁻¹ x*."""
    a, b = ridge_data(12)
    ridge = ridge_solver("dense", damping=0.5)
    lam = torch.tensor(0.3, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(ridge(None, lam, a, b).sum(), lam)
    x = ridge_closed(lam.detach(), a, b)
    expected = -torch.linalg.solve(a.T @ a + (0.3 + 0.5) * torch.eye(4, dtype=F64), x).sum()
    assert relative(grad, expected) <= 1e-12


def test_engine_implicit_mode_runs_on_the_same_solvers():
    """InnerLoop(mode=Implicit(...)) accepts every solver of diffopt.implicit; on a convex inner problem
    (iMAML's proximal ridge) they all give the exact hypergradient."""
    from torch import nn

    from diffopt import optim
    from diffopt.testing import ridge
    from diffopt.unroll import Implicit, InnerLoop
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 20, 4, generator=g, dtype=F64), torch.randn(1, 20, 1, generator=g, dtype=F64)
    xv, yv = torch.randn(1, 10, 4, generator=g, dtype=F64), torch.randn(1, 10, 1, generator=g, dtype=F64)
    model = nn.Linear(4, 1, bias=False).double()
    exact = ridge(x[0], y[0], xv[0], yv[0], 2.0, center=model.weight.detach()[0]).wrt_center
    for solver in (MINRES(), GMRES(), Dense()):  # (CG and NormalCG: tests/test_unroll_modes.py, test_port_apis.py)
        loop = InnerLoop(model, optim.SGD(model.parameters(), lr=0.1), steps=400, mode=Implicit(solver), proximal=2.0)
        (grad,) = torch.autograd.grad(loop.meta_loss(x, y, xv, yv), [model.weight])
        assert relative(grad[0], exact) <= 1e-8, solver
        assert loop.last_info["solve"].solver == solver.name


# -- bad input -----------------------------------------------------------------------------------

def test_a_residual_far_from_zero_warns_or_raises_with_its_size():
    a, b = ridge_data(13)

    @custom_root(ridge_condition)
    def sloppy(init, lam, a, b):
        return ridge_closed(lam, a, b) + 0.01

    lam = torch.tensor(0.5, dtype=F64, requires_grad=True)
    residual = float(ridge_condition(ridge_closed(lam.detach(), a, b) + 0.01, lam.detach(), a, b).norm())
    with pytest.warns(OptimalityResidualWarning, match=f"{residual:.3g} from zero"):
        sloppy(None, lam, a, b)
    assert abs(sloppy.last_residual - residual) <= 1e-12
    strict = custom_root(ridge_condition, on_residual="raise")(sloppy.__wrapped__)
    with pytest.raises(OptimalityResidualError, match="residual_tol=0.0001"):
        strict(None, lam, a, b)
    loose = custom_root(ridge_condition, residual_tol=1.0)(sloppy.__wrapped__)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loose(None, lam, a, b)


def test_a_linear_solve_that_does_not_converge_reports_its_residual():
    a, b = ridge_data(14, n=30, d=8)
    lam = torch.tensor(1e-3, dtype=F64, requires_grad=True)
    ridge = ridge_solver(CG(iterations=2))
    with pytest.warns(LinearSolveWarning, match=r"cg linear solve did not converge: relative residual .* after 2 "
                                                r"iterations"):
        torch.autograd.grad(ridge(None, lam, a, b).sum(), lam)
    assert ridge.last_solve.iterations == 2 and not ridge.last_solve.converged
    assert ridge.last_solve.relative_residual > 1e-6
    strict = ridge_solver(CG(iterations=2, on_fail="raise"))
    with pytest.raises(LinearSolveError, match="relative residual"):
        torch.autograd.grad(strict(None, lam, a, b).sum(), lam)
    assert ridge.last_solve.negative_curvature is False  # ridge's A is positive definite
    # plain CG cannot solve an indefinite system: its residual is reported, not hidden, and the message
    # says why more iterations will not help (both of CG's paths: tensor steps, and float steps without autograd)
    # (diagonal: pᵀAp = Σ diag < 0 already for the first direction, b = 1; six eigenvalues need six iterations)
    indefinite = torch.tensor([[1.0, -4.0, 2.0, 3.0, -5.0, 0.5], [2.0, 1.0, -6.0, 0.25, 1.5, -1.0]], dtype=F64)
    for tasks, grad in ((1, True), (2, True), (1, False)):
        with torch.set_grad_enabled(grad):
            _, info = CG(iterations=3, on_fail="ignore").solve(lambda u: [u[0] * indefinite[:tasks]],
                                                                [torch.ones(tasks, 6, dtype=F64)])
        assert not info.converged and info.negative_curvature is True, info
    with pytest.warns(LinearSolveWarning, match=r"negative curvature \(pᵀAp < 0\): A is not positive definite.*"
                                                r"solver='minres'"):
        CG(iterations=3).solve(lambda u: [u[0] * indefinite[:1]], [torch.ones(1, 6, dtype=F64)])
    (w,), info = MINRES(iterations=50).solve(lambda u: [u[0] * indefinite[:1]], [torch.ones(1, 6, dtype=F64)])
    assert info.converged and info.negative_curvature is None and relative(w, 1 / indefinite[:1]) <= 1e-10


def test_a_solve_that_ends_in_nan_is_a_failure_not_unknown():
    """A diverged solve (nan residual) fails its check; ``converged=None`` is kept for vmap only."""
    h = torch.tensor([1.0, 10.0, 1e4], dtype=F64)  # λ_max = 1e4: alpha=0.5 > 2/λ_max, the series diverges
    apply = lambda u: [u[0] * h]  # noqa: E731
    _, info = Neumann(iterations=200, alpha=0.5, on_fail="ignore").solve(apply, [torch.ones(1, 3, dtype=F64)])
    assert info.converged is False and np.isnan(info.relative_residual)
    with pytest.warns(LinearSolveWarning, match=r"neumann linear solve diverged.*below 2/λ_max"):
        Neumann(iterations=200, alpha=0.5).solve(apply, [torch.ones(1, 3, dtype=F64)])
    root = custom_root(lambda x, t: h * x - t, solve=Neumann(iterations=200, alpha=0.5, on_fail="raise"))(
        lambda init, t: t / h)
    t = torch.ones(3, dtype=F64, requires_grad=True)
    with pytest.raises(LinearSolveError, match=r"diverged.*lower alpha below 2/λ_max\(A\)"):
        torch.autograd.grad(root(None, t).sum(), t)
    # under vmap the residual is unknown: nan with converged=None, and no check
    infos = []

    def solve_one(v):
        w, info = CG(iterations=5, on_fail="raise").solve(apply, [v[None]])
        infos.append(info)
        return w[0][0]

    (w,) = [torch.func.vmap(solve_one)(torch.ones(2, 3, dtype=F64))]
    assert infos[0].converged is None and np.isnan(infos[0].relative_residual)
    assert relative(w, (1 / h).expand(2, 3)) <= 1e-10
    with pytest.raises(ValueError, match=r"alpha.*positive and finite"):
        Neumann(alpha=float("inf"))
    with pytest.raises(ValueError, match=r"damping must be >= 0 and finite"):
        custom_root(ridge_condition, damping=float("inf"))
    from diffopt.unroll import Implicit
    with pytest.raises(ValueError, match=r"damping must be a finite number >= 0, got inf"):
        Implicit(damping=float("inf"))  # when the mode is built, not at its first solve
    from diffopt.implicit.ift import damped
    with pytest.raises(ValueError, match=r"damping must be finite"):
        damped(apply, float("inf"))


def test_arguments_without_grad_cost_nothing():
    calls = []

    def condition(x, lam, a, b):
        calls.append(1)
        return ridge_condition(x, lam, a, b)

    a, b = ridge_data(15)

    @custom_root(condition)
    def fit(init, lam, a, b):
        return ridge_closed(lam, a, b)

    out = fit(None, torch.tensor(0.5, dtype=F64), a, b)
    assert calls == [] and out.grad_fn is None and fit.last_solve is None
    with torch.no_grad():
        fit(None, torch.tensor(0.5, dtype=F64, requires_grad=True), a, b)
    assert calls == []


def test_an_optimality_condition_that_ignores_an_argument_is_an_error():
    a, b = ridge_data(16)

    @custom_root(lambda x, lam, a, b: a.T @ (a @ x - b))  # forgot the penalty: F does not depend on lam
    def fit(init, lam, a, b):
        return ridge_closed(lam, a, b)

    lam = torch.tensor(0.5, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match=r"does not depend on argument \[0\].*silently zero"):
        fit(None, lam, a, b)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match=r"solve='cgg'.*did you mean 'cg'"):
        custom_root(ridge_condition, solve="cgg")
    with pytest.raises(TypeError, match="solve must be a solver name"):
        custom_root(ridge_condition, solve=3)
    with pytest.raises(ValueError, match="on_residual"):
        custom_root(ridge_condition, on_residual="loud")
    with pytest.raises(ValueError, match="damping"):
        custom_root(ridge_condition, damping=-1.0)
    with pytest.raises(ValueError, match="on_fail"):
        CG(on_fail="loud")
    with pytest.raises(ValueError, match="restart"):
        GMRES(restart=0)

    @custom_root(lambda x, lam: x[:2] - lam)
    def wrong_shape(init, lam):
        return torch.zeros(3, dtype=F64)

    with pytest.raises(ValueError, match="structure and shapes of x"):
        wrong_shape(None, torch.zeros(2, dtype=F64, requires_grad=True))
    singular = custom_root(lambda x, lam: (x.sum() - lam) * torch.ones_like(x),  # ∂F/∂x = [[1, 1], [1, 1]]
                           solve="dense")(lambda init, lam: lam / 2 * torch.ones(2, dtype=F64))
    lam = torch.tensor(1.0, dtype=F64, requires_grad=True)
    with pytest.raises(LinearSolveError, match="singular.*lstsq=True"):
        torch.autograd.grad(singular(None, lam).sum(), lam)


def test_a_float32_solve_at_its_rounding_floor_reads_converged_without_a_warning():
    """``converged`` and the warning use one bar: max(tol, 1000·eps) (a float32 solve cannot reach 1e-10)."""
    import warnings

    from diffopt.implicit import CG

    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g)
    a = m @ m.T + 6 * torch.eye(6)
    b = [torch.randn(1, 6, generator=g)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = CG(iterations=50).solve(lambda u: [u[0] @ a.T], b)
    assert 1e-10 < info.relative_residual <= 1000 * torch.finfo(torch.float32).eps  # above the raw tol, at the floor
    assert info.converged is True



def cubic_root(solve: str):
    """``x*(θ)`` with ``x³ + x = θ`` (elementwise), by Newton's method, under ``custom_root``:
    ``d²x*/dθ² = −6x/(3x² + 1)³``."""
    def f(x, th):
        return x ** 3 + x - th

    @custom_root(f, solve=solve)
    def solution(init, th):
        x = torch.zeros_like(th)
        for _ in range(60):
            x = x - f(x, th) / (3 * x ** 2 + 1)
        return x

    return solution

@pytest.mark.parametrize("solve", ["dense", "cg"])
def test_second_derivatives_that_go_through_the_forward_rule(solve):
    """x³ + x = θ: d²x*/dθ² = −6x/(3x² + 1)³. jacrev(jacfwd) and a backward through a forward-mode
    tangent read 0 or failed before (the forward rule saw x* without its dependence on θ; review);
    jvp of jvp, which that rule cannot see through, is refused instead of reading 0."""
    import torch.autograd.forward_ad as fwAD

    solution = cubic_root(solve)

    th, one = torch.tensor(2.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    x = solution(None, th)
    exact = -6 * x / (3 * x ** 2 + 1) ** 3
    at = lambda s: solution(None, s)  # noqa: E731
    for second in (torch.func.jacrev(torch.func.jacfwd(at))(th), torch.func.jacfwd(torch.func.jacrev(at))(th),
                   torch.func.hessian(at)(th)):
        assert torch.allclose(second, exact, rtol=1e-10, atol=0), (second, exact)
    leaf = th.clone().requires_grad_()
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(solution(None, fwAD.make_dual(leaf, one))).tangent
    assert torch.allclose(torch.autograd.grad(tangent, leaf)[0], exact, rtol=1e-10, atol=0)
    with pytest.raises(RuntimeError, match="forward-mode derivative of a forward-mode derivative.*hessian"):
        torch.func.jvp(lambda t: torch.func.jvp(at, (t,), (one,))[1], (th,), (one,))


@pytest.mark.parametrize("solve", ["cg", "minres", "gmres", "normal_cg", "dense"])
def test_second_derivatives_through_an_iterative_solve_are_exact_where_its_krylov_space_closes_early(solve):
    """x³ + x = θ elementwise with equal entries: ∂F/∂x = cI, so CG stops after one step. Hessians
    used to differentiate the solver's iterations: the diagonal halved, spurious off-diagonals, NaN
    for gmres under torch.func (review). The adjoint's solve now gets its derivative by the implicit
    function theorem as well."""
    solution = cubic_root(solve)

    for th0 in (torch.full((2,), 2.5, dtype=F64), torch.tensor([2.5, 0.5], dtype=F64)):
        x = solution(None, th0)
        exact = torch.diag(-6 * x / (3 * x ** 2 + 1) ** 3)
        th = th0.clone().requires_grad_()
        (g,) = torch.autograd.grad(solution(None, th).sum(), th, create_graph=True)
        double_backward = torch.stack([torch.autograd.grad(g[i], th, retain_graph=True)[0] for i in range(2)])
        assert torch.allclose(double_backward, exact, rtol=1e-9, atol=1e-12), (solve, double_backward, exact)
        # (normal_cg's u -> A u was a vjp of a vjp closure from another functorch level: an assertion)
        hessian = torch.func.hessian(lambda s: solution(None, s).sum())(th0)
        assert torch.allclose(hessian, exact, rtol=1e-9, atol=1e-12), (solve, hessian, exact)
