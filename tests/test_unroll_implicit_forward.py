"""Implicit (IFT) and forward-mode meta-gradients of diffopt.unroll, float64.

Implicit mode against the closed-form hypergradient of ridge regression (the inner
problem solved exactly by a linear solve, differentiated by autograd): the
initialisation θ through iMAML's proximal term, the proximal strength λ as a
tensor, and a regularisation strength inside the loss passed as a
``meta_parameter``; with CG and Neumann solves. Against second order unrolled to
convergence on strongly convex, non-quadratic inner problems. Forward mode
against reverse mode (second order) for every kind of hyperparameter and for
model parameters listed in ``forward_wrt``.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from diffopt.optim import SGD, Adam, PerParameter, Schedule
from diffopt.unroll import InnerLoop, SolveInfo
from strategies import examples, record
from test_unroll import (
    F64, QUICK, build, grads_of, hyper, make_optimizer, max_error, single_threaded, tasks, wrt_of,
)  # noqa: F401 (the fixture)

IMPLICIT_TOL = 1e-6   # relative, against closed forms and converged unrolls
STEPS_ANIL = 120  # the head's inner loop converges to ~1e-13 at lr 0.2
FORWARD_TOL = 1e-10   # forward mode against reverse mode


def relative(ours: list[Tensor], reference: list[Tensor]) -> float:
    """``‖ours − ref‖ / ‖ref‖`` over all the tensors together."""
    num = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(ours, reference)))
    den = math.sqrt(sum(float((b**2).sum()) for b in reference))
    return num / den


# =============================================================================================
# Ridge regression: the inner problem with a closed form
# =============================================================================================

D, N_SUPPORT, N_QUERY, N_TASKS = 3, 20, 10, 3


def ridge_data(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(N_TASKS, N_SUPPORT, D, generator=g, dtype=F64)
    qx = torch.randn(N_TASKS, N_QUERY, D, generator=g, dtype=F64)
    w_true = torch.randn(N_TASKS, D, 1, generator=g, dtype=F64)
    sy = sx @ w_true + 0.3 * torch.randn(N_TASKS, N_SUPPORT, 1, generator=g, dtype=F64)
    qy = qx @ w_true + 0.3 * torch.randn(N_TASKS, N_QUERY, 1, generator=g, dtype=F64)
    return sx, sy, qx, qy


def linear_model(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D, 1, bias=False).to(F64)


def steps_to_converge(hessians: Tensor, lr: float, target: float = 1e-15) -> int:
    """Gradient-descent steps for the error to contract below ``target`` (linear rate)."""
    eig = torch.linalg.eigvalsh(hessians)
    rate = float((1 - lr * eig).abs().max())
    return math.ceil(math.log(target) / math.log(rate))


def proximal_ridge_closed_form(theta: Tensor, lam: Tensor | float, data) -> Tensor:
    """Mean query MSE at φ* = argmin (1/n)‖Xφ − y‖² + λ/2‖φ − θ‖², differentiable in θ and λ."""
    sx, sy, qx, qy = data
    eye = torch.eye(D, dtype=F64)
    total = 0.0
    for t in range(N_TASKS):
        a = 2 / N_SUPPORT * sx[t].T @ sx[t] + lam * eye
        b = 2 / N_SUPPORT * sx[t].T @ sy[t] + lam * theta.reshape(D, 1)
        phi = torch.linalg.solve(a, b)
        total = total + ((qx[t] @ phi - qy[t]) ** 2).mean()
    return total / N_TASKS


@pytest.mark.parametrize("solver", ["cg", "neumann"])
@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("learn_lambda", [False, True])
def test_implicit_imaml_matches_ridge_closed_form(solver, vectorize, learn_lambda):
    """iMAML: ∂L/∂θ = λ (H + λI)⁻¹ ∇L(φ*); with λ a tensor, ∂L/∂λ as well."""
    data = ridge_data(1)
    model = linear_model(2)
    lam_value = 1.0
    lam = hyper(lam_value) if learn_lambda else lam_value
    hessians = 2 / N_SUPPORT * data[0].transpose(1, 2) @ data[0] + lam_value * torch.eye(D, dtype=F64)
    top = float(torch.linalg.eigvalsh(hessians).max())
    lr = 1 / top
    steps = steps_to_converge(hessians, lr)
    assert steps <= 300
    loop = InnerLoop(model, SGD(model.parameters(), lr=lr), steps=steps, mode="implicit", vectorize=vectorize,
                     proximal=lam, solver=solver, solver_iterations=200, solver_tol=1e-12,
                     neumann_alpha=1 / top)
    wrt = [model.weight] + ([lam] if learn_lambda else [])
    loss = loop.meta_loss(*data)
    ours = grads_of(loss, wrt)

    theta = model.weight.detach().clone().requires_grad_()
    lam_ref = hyper(lam_value) if learn_lambda else lam_value
    reference_loss = proximal_ridge_closed_form(theta, lam_ref, data)
    reference = grads_of(reference_loss, [theta] + ([lam_ref] if learn_lambda else []))
    reference_value = float(reference_loss.detach())
    assert abs(float(loss.detach()) - reference_value) <= 1e-12 * reference_value  # the inner loop converged
    error = record("implicit vs ridge closed form", f"{solver}{'+lambda' if learn_lambda else ''}",
                   relative(ours, reference))
    assert error <= IMPLICIT_TOL
    solve = loop.last_info["solve"]
    assert isinstance(solve, SolveInfo) and solve.solver == solver
    assert solve.iterations >= 1 and solve.relative_residual <= 1e-10 and solve.converged
    if solver == "neumann":
        assert solve.iterations == 200


class RidgeWithPenaltyOutput(nn.Module):
    """``x ↦ [x w; wᵀ]``: the weights are appended to the output so that a loss function can
    regularise them with a strength that is a meta-parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(D, 1, dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x @ self.w, self.w], dim=0)


@pytest.mark.parametrize("solver", ["cg", "neumann"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_implicit_learned_regularisation_strength_matches_closed_form(solver, vectorize):
    """A regularisation strength inside the loss, registered as ``meta_parameters``:
    inner G(w) = (1/n)‖Xw − y‖² + ρ‖w‖², ∂L/∂ρ = −∇L(w*)ᵀ (∂²G/∂w²)⁻¹ 2w*."""
    data = ridge_data(3)
    torch.manual_seed(4)
    model = RidgeWithPenaltyOutput()
    rho = hyper(0.7)

    def inner_loss(output: Tensor, target: Tensor) -> Tensor:
        n = target.shape[0]
        return ((output[:n] - target) ** 2).mean() + rho * (output[n:] ** 2).sum()

    def query_loss(output: Tensor, target: Tensor) -> Tensor:
        return ((output[: target.shape[0]] - target) ** 2).mean()

    hessians = 2 / N_SUPPORT * data[0].transpose(1, 2) @ data[0] + 2 * 0.7 * torch.eye(D, dtype=F64)
    top = float(torch.linalg.eigvalsh(hessians).max())
    steps = steps_to_converge(hessians, 1 / top)
    loop = InnerLoop(model, SGD(model.parameters(), lr=1 / top), inner_loss, steps=steps, mode="implicit",
                     vectorize=vectorize, meta_parameters=[rho], solver=solver, solver_iterations=200,
                     solver_tol=1e-12, neumann_alpha=1 / top)
    loss = loop.meta_loss(*data, loss_fn=query_loss)
    ours = grads_of(loss, [rho])

    rho_ref = hyper(0.7)
    sx, sy, qx, qy = data
    total = 0.0
    for t in range(N_TASKS):
        w = torch.linalg.solve(sx[t].T @ sx[t] / N_SUPPORT + rho_ref * torch.eye(D, dtype=F64),
                               sx[t].T @ sy[t] / N_SUPPORT)
        total = total + ((qx[t] @ w - qy[t]) ** 2).mean()
    reference = grads_of(total / N_TASKS, [rho_ref])
    assert abs(float(loss.detach()) - float(total.detach() / N_TASKS)) <= 1e-12
    error = record("implicit vs ridge closed form", f"{solver}+meta_parameter", relative(ours, reference))
    assert error <= IMPLICIT_TOL
    assert model.w.grad is None or float(model.w.grad.abs().max()) == 0  # φ* does not depend on θ here


def logistic_tasks(seed: int, n_tasks: int = 3, n: int = 12, d: int = 3):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(n_tasks, n, d, generator=g, dtype=F64)
    qx = torch.randn(n_tasks, n, d, generator=g, dtype=F64)
    w = torch.randn(n_tasks, d, 1, generator=g, dtype=F64)
    sy = (sx @ w + 0.5 * torch.randn(n_tasks, n, 1, generator=g, dtype=F64) > 0).to(F64)
    qy = (qx @ w > 0).to(F64)
    return sx, sy, qx, qy


@settings(QUICK, max_examples=examples(2))
@given(seed=st.integers(0, 2**16), vectorize=st.booleans(), solver=st.sampled_from(["cg", "neumann"]))
def test_implicit_equals_second_order_unrolled_to_convergence(seed, vectorize, solver):
    """Logistic regression with a proximal term (strongly convex, not quadratic): the unrolled
    second-order meta-gradient converges to the implicit one; θ and a tensor λ."""
    data = logistic_tasks(seed)
    lr, steps = 0.5, 60   # Hessian eigenvalues in [λ, λ + ‖x‖²/4n]: contraction ≤ 0.5 per step
    results = []
    for mode in ("second_order", "implicit"):
        torch.manual_seed(seed)
        model = nn.Linear(3, 1).to(F64)
        lam = hyper(1.0)
        loop = InnerLoop(model, SGD(model.parameters(), lr=lr), F.binary_cross_entropy_with_logits, steps=steps,
                         mode=mode, vectorize=vectorize, proximal=lam, solver=solver, solver_iterations=100,
                         neumann_alpha=0.5, solver_tol=1e-12)
        results.append(grads_of(loop.meta_loss(*data), list(model.parameters()) + [lam]))
    error = record("implicit vs converged second_order", f"logistic/{solver}", relative(results[1], results[0]))
    assert error <= IMPLICIT_TOL


@pytest.mark.parametrize("vectorize", [False, True])
def test_implicit_anil_body_is_a_hyperparameter(vectorize):
    """Only the head is adapted (with a proximal term): the body is a hyperparameter of the
    inner problem and gets the implicit gradient −(∂²G/∂body∂φ)ᵀ w, and so do inputs that
    require grad (features from an encoder outside the loop); equals second order unrolled
    to convergence."""
    sx, sy, qx, qy = tasks("mlp", 3, 21, support=8, query=8)
    encoder = torch.tensor([[0.9, -0.4], [0.3, 1.1]], dtype=F64, requires_grad=True)
    results, infos = [], []
    for mode in ("second_order", "implicit"):
        model = build("anil", 22)
        loop = InnerLoop(model, SGD(model.head.parameters(), lr=0.2), steps=STEPS_ANIL, mode=mode,
                         vectorize=vectorize, proximal=1.0, solver_tol=1e-12)
        loss = loop.meta_loss(torch.tanh(sx @ encoder), sy, torch.tanh(qx @ encoder), qy)
        results.append(grads_of(loss, list(model.parameters()) + [encoder]))
        infos.append(loop.last_info)
    error = record("implicit vs converged second_order", "anil body", relative(results[1], results[0]))
    assert error <= IMPLICIT_TOL
    assert infos[1]["solver"] == "cg" and infos[1]["solve"].converged


def test_implicit_reports_an_unconverged_solve():
    data = ridge_data(5)
    model = linear_model(6)
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.3), steps=60, mode="implicit", proximal=0.05,
                     solver_iterations=1, solver_tol=1e-12)
    loop.meta_loss(*data).backward()
    solve = loop.last_info["solve"]
    assert solve.iterations == 1 and not solve.converged and solve.relative_residual > 1e-12


# =============================================================================================
# Forward mode
# =============================================================================================

def forward_cases(model: nn.Module, steps: int):
    """(name, optimizer, tensors differentiated) for every kind of tensor hyperparameter."""
    params = list(model.parameters())
    lr = hyper(0.2)
    yield "lr", SGD(params, lr=lr), [lr]
    per_element = [torch.full_like(p, 0.1).add_(torch.rand_like(p) * 0.2).requires_grad_() for p in params]
    yield "per-element lr", SGD(params, lr=PerParameter(per_element)), per_element
    schedule = torch.linspace(0.3, 0.1, steps, dtype=F64).requires_grad_()
    yield "Schedule lr", SGD(params, lr=Schedule(schedule)), [schedule]
    lr, momentum = hyper(0.2), hyper(0.7)
    yield "momentum", SGD(params, lr=lr, momentum=momentum, nesterov=True), [lr, momentum]
    lr, b1, b2 = hyper(0.05), hyper(0.8), hyper(0.95)
    yield "adam betas", Adam(params, lr=lr, betas=(b1, b2), eps=1e-6), [lr, b1, b2]


@pytest.mark.parametrize("vectorize", [False, True])
def test_forward_equals_reverse_for_hyperparameters(vectorize):
    steps = 3
    data = tasks("mlp", 2, 31)
    model = build("mlp", 30)
    for name, optimizer, wrt in forward_cases(model, steps):
        reverse = grads_of(InnerLoop(model, optimizer, steps=steps, vectorize=vectorize).meta_loss(*data), wrt)
        loop = InnerLoop(model, optimizer, steps=steps, mode="forward", vectorize=vectorize)
        loss = loop.meta_loss(*data)
        forward = grads_of(loss, wrt)
        assert loop.last_info["forward_directions"] == sum(w.numel() for w in wrt)
        error = record("forward vs reverse", name, max_error(forward, reverse))
        assert error <= FORWARD_TOL, name
        # the model's parameters are not forward-differentiated unless listed
        assert all(g is None for g in torch.autograd.grad(loop.meta_loss(*data), list(model.parameters()),
                                                           allow_unused=True))


@pytest.mark.parametrize("proximal", [None, 0.5])
@pytest.mark.parametrize("vectorize", [False, True])
def test_forward_with_model_parameters_listed(proximal, vectorize):
    """``forward_wrt`` = every model parameter plus the learning rate on a tiny model (θ also
    enters the proximal term at every step)."""
    torch.manual_seed(40)
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)).to(F64)
    data = tasks("mlp", 2, 41, support=4, query=4)
    results = []
    for mode in ("second_order", "forward"):
        optimizer, hp = make_optimizer("momentum", list(model.parameters()))
        wrt = wrt_of(model, hp)
        loop = InnerLoop(model, optimizer, steps=3, mode=mode, vectorize=vectorize, proximal=proximal,
                         forward_wrt=wrt if mode == "forward" else None)
        results.append(grads_of(loop.meta_loss(*data), wrt))
    error = record("forward vs reverse", "theta+lr", max_error(results[1], results[0]))
    assert error <= FORWARD_TOL


def test_a_truncated_solve_warns_once_per_loop_and_reports_every_residual():
    """iMAML's few CG steps do not converge by design: one LinearSolveWarning per loop (not one per
    meta-step), and every solve's residual in last_info."""
    import warnings

    from diffopt.errors import LinearSolveWarning
    from diffopt.implicit import CG

    model = build("mlp")
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.1), steps=3, mode="implicit", proximal=0.5,
                     solver=CG(iterations=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        residuals = []
        for seed in range(3):
            loop.meta_loss(*tasks("mlp", 2, seed)).backward()
            residuals.append(loop.last_info["solve"].relative_residual)
    solve_warnings = [w for w in caught if issubclass(w.category, LinearSolveWarning)]
    assert len(solve_warnings) == 1 and "warned once per loop" in str(solve_warnings[0].message)
    assert all(r > 1e-10 for r in residuals)


@pytest.mark.parametrize("on_fail", ["raise", "ignore"])
def test_a_truncated_solve_raises_or_stays_quiet_by_on_fail(on_fail):
    """The engine keeps the solver's on_fail: "raise" raises at every backward, "ignore" never warns; the
    mode's solver object is left as given."""
    import warnings

    from diffopt.errors import LinearSolveError, LinearSolveWarning
    from diffopt.implicit import CG

    model = build("mlp")
    solver = CG(iterations=1, on_fail=on_fail)
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.1), steps=3, mode="implicit", proximal=0.5, solver=solver)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(2):
            if on_fail == "raise":
                with pytest.raises(LinearSolveError, match="InnerLoop\\(mode='implicit'\\): cg linear solve did not"):
                    loop.meta_loss(*tasks("mlp", 2, seed)).backward()
            else:
                loop.meta_loss(*tasks("mlp", 2, seed)).backward()
                assert loop.last_info["solve"].converged is False
    assert not [w for w in caught if issubclass(w.category, LinearSolveWarning)]
    assert loop.mode.solver is solver


@pytest.mark.parametrize("held", ["all", "weight only"])
def test_implicit_frozen_parameter_held_by_the_optimizer_is_a_constant(held):
    """A frozen bias (requires_grad=False) never moves, so it is a constant of the inner problem;
    held by the inner optimizer it had entered the implicit system and moved θ's meta-gradient by 50%.
    Reference: ridge regression's closed form, argmin_w mean((Xw + b - y)^2) + ½‖w - W0‖²."""
    from diffopt.unroll import Dense, Implicit

    g = torch.Generator().manual_seed(0)
    tasks, n = 3, 6
    sx, qx = torch.randn(2, tasks, n, 2, generator=g, dtype=torch.float64)
    sy, qy = torch.randn(2, tasks, n, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(2, 1).double()
    model.bias.requires_grad_(False)
    params = list(model.parameters()) if held == "all" else [model.weight]
    loop = InnerLoop(model, SGD(params, lr=0.1), F.mse_loss, steps=300, mode=Implicit(Dense()), proximal=1.0)
    (ours,) = torch.autograd.grad(loop.meta_loss(sx, sy, qx, qy), model.weight)
    w0, b = model.weight, model.bias.detach()
    total = 0
    for t in range(tasks):
        x, y = sx[t], sy[t]
        w = torch.linalg.solve(2 / n * x.T @ x + torch.eye(2, dtype=torch.float64), 2 / n * x.T @ (y - b) + w0.T)
        total = total + F.mse_loss(qx[t] @ w + b, qy[t])
    (exact,) = torch.autograd.grad(total / tasks, w0)
    assert relative([ours], [exact]) <= 1e-8


def test_rebind_with_plain_tensors_still_adapts():
    """rebind(theta=...) 'for finite differences' with tensors that do not require grad had frozen
    every weight (the meta-loss was the unadapted one); which tensors adapt is the model's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    model[2].bias.requires_grad_(False)
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.5), F.mse_loss, steps=3)
    sx, qx = torch.randn(2, 2, 5, 2, dtype=torch.float64)
    sy, qy = torch.randn(2, 2, 5, 1, dtype=torch.float64)
    theta = [p.detach().clone() for p in model.parameters()]
    expected = loop.meta_loss(sx, sy, qx, qy).detach()
    for tensors in (theta, [t.clone().requires_grad_() for t in theta]):
        assert torch.equal(loop.rebind(theta=tensors).meta_loss(sx, sy, qx, qy).detach(), expected)
        with torch.no_grad():
            assert torch.equal(loop.rebind(theta=tensors).meta_loss(sx, sy, qx, qy), expected)
    # a frozen parameter stays frozen under rebind, even when its stand-in requires grad
    frozen = [t.clone().requires_grad_() for t in theta]
    adapted = loop.rebind(theta=frozen).adapt(sx, sy).params
    assert torch.equal(adapted[-1][0], theta[-1]) and not torch.equal(adapted[0][0], theta[0])


def test_implicit_reports_and_warns_when_the_inner_loop_is_not_stationary():
    """The implicit theorem holds at a stationary point. Here one task's inner loop settles into a
    period-2 oscillation (lr 0.2): the implicit meta-gradient was 150% off the unrolled one with no
    word; the backward now measures each task's ‖∇G‖ against the start and warns once per loop."""
    from diffopt.errors import OptimalityResidualWarning
    from diffopt.unroll import Dense, Implicit

    g = torch.Generator().manual_seed(0)
    sx, qx = torch.randn(2, 2, 6, 2, generator=g, dtype=torch.float64)
    sy, qy = torch.randn(2, 2, 6, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3, dtype=torch.float64), nn.Tanh(), nn.Linear(3, 1, dtype=torch.float64))
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.2), F.mse_loss, steps=800, mode=Implicit(Dense()),
                     proximal=0.8)
    with pytest.warns(OptimalityResidualWarning, match=r"did not reach a stationary point: on task 0 .* 0\.6\d* times"):
        loop.meta_loss(sx, sy, qx, qy).backward()
    report = loop.last_info["stationarity"]
    assert report["task"] == 0 and 0.5 < report["relative_gradient_norm"] < 0.7 and report["gradient_norm"] > 1
    # the same problem with a rate that converges: the ratio is at rounding level, no warning
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.05), F.mse_loss, steps=2000, mode=Implicit(Dense()),
                     proximal=0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimalityResidualWarning)
        loop.meta_loss(sx, sy, qx, qy).backward()
    assert loop.last_info["stationarity"]["relative_gradient_norm"] <= 1e-10


def test_rebind_with_forward_mode_dual_tensors_keeps_their_tangents():
    """rebind(theta=duals) had detached a dual that does not require grad (to make it adapt), losing its
    tangent: the meta-loss's tangent was None. It equals reverse mode's directional derivative."""
    from torch.autograd import forward_ad as fwAD

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.3), F.mse_loss, steps=2)
    sx, qx = torch.randn(2, 2, 5, 2, dtype=torch.float64)
    sy, qy = torch.randn(2, 2, 5, 1, dtype=torch.float64)
    theta = [p.detach().clone() for p in model.parameters()]
    tangents = [torch.randn_like(t) for t in theta]
    leaves = [t.clone().requires_grad_() for t in theta]
    grads = torch.autograd.grad(loop.rebind(theta=leaves).meta_loss(sx, sy, qx, qy), leaves)
    reverse = sum(float((g * v).sum()) for g, v in zip(grads, tangents))
    with fwAD.dual_level():
        for stand_ins in (theta, leaves):
            out = loop.rebind(theta=[fwAD.make_dual(t, v) for t, v in zip(stand_ins, tangents)]).meta_loss(
                sx, sy, qx, qy)
            tangent = fwAD.unpack_dual(out).tangent
            assert tangent is not None and abs(float(tangent) - reverse) <= 1e-12 * max(1.0, abs(reverse))
