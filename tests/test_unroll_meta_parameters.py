"""``meta_parameters`` (tensors the inner loss reads, outside the model and the optimizer) in
every mode of diffopt.unroll, float64, against a reference written without the engine.

The problem: a linear model w (no bias), tasks (X, y), and an inner loss whose target is moved
by two meta-parameters, a scale a (a 0-d tensor) and a shift b (shape (1,)):

    G(w) = (1/n) ‖X wᵀ − (a y + b)‖²  [+ λ/2 ‖w − θ‖²],   ∇_w G = (2/n) (X wᵀ − a y − b)ᵀ X [+ λ (w − θ)].

The query loss is the plain mean squared error. The reference is the unroll written out with
this hand-derived gradient (no autograd inside the inner loop), differentiated by autograd
afterwards; iMAML's solution is the closed form
w* = (2/n XᵀX + λI)⁻¹ (2/n Xᵀ(a y + b) + λ θᵀ). Every inner step is affine in (w, θ, a, b)
jointly, so the meta-loss is exactly quadratic in them: antithetic ES and PES have no smoothing
bias and their mean must equal the true gradient within the standard error of the estimates.

ES and PES shift a and b *in place* while they evaluate a perturbed particle (the loss function
reads them directly); after the call every tensor — θ, a, b and the learning rate — must hold
its original value bit for bit (``torch.equal``), also after ``backward()``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffopt.optim import SGD
from diffopt.unroll import InnerLoop
from strategies import record
from test_unroll import single_threaded, F64, EXACT, grads_of  # noqa: F401 (the fixture)
from test_unroll_implicit_forward import FORWARD_TOL, IMPLICIT_TOL, relative
from test_unroll_zero_order import REPEATS, SAMPLES, check_unbiased

LR, STEPS, TASKS, N, D = 0.15, 3, 2, 6, 2


def problem(seed: int = 0):
    """(model, a, b, data): a seeded linear model, the two meta-parameters, support and query sets."""
    g = torch.Generator().manual_seed(seed)
    sx, qx = (torch.randn(TASKS, N, D, generator=g, dtype=F64) for _ in range(2))
    sy, qy = (torch.randn(TASKS, N, 1, generator=g, dtype=F64) for _ in range(2))
    torch.manual_seed(seed)
    model = nn.Linear(D, 1, bias=False).to(F64)
    a = torch.tensor(0.8, dtype=F64, requires_grad=True)
    b = torch.tensor([0.3], dtype=F64, requires_grad=True)
    return model, a, b, (sx, sy, qx, qy)


def inner_loss_of(a: Tensor, b: Tensor):
    def inner_loss(prediction: Tensor, target: Tensor) -> Tensor:
        return ((prediction - (a * target + b)) ** 2).mean()
    return inner_loss


def reference_meta_loss(theta: Tensor, a: Tensor, b: Tensor, data, steps: int = STEPS, truncate: int | None = None,
                        proximal: float | None = None) -> Tensor:
    """The unroll written out: SGD with the hand-derived inner gradient, task by task.

    ``truncate=k``: the first steps − k steps see detached (θ, a, b) and the result is
    reconnected to θ as θ + stopgrad(w − θ), the documented truncated estimator."""
    sx, sy, qx, qy = data
    total = 0.0
    for t in range(sx.shape[0]):
        x, y = sx[t], sy[t]
        w = theta
        for k in range(steps):
            early = truncate is not None and k < steps - truncate
            aa, bb, th = (a.detach(), b.detach(), theta.detach()) if early else (a, b, theta)
            ww = w.detach() if early else w
            gradient = 2 / N * (x @ ww.T - (aa * y + bb)).T @ x
            if proximal is not None:
                gradient = gradient + proximal * (ww - th)
            w = ww - LR * gradient
            if early and k == steps - truncate - 1:
                w = theta + (w - theta).detach()
        total = total + ((qx[t] @ w.T - qy[t]) ** 2).mean()
    return total / sx.shape[0]


def closed_form_meta_loss(theta: Tensor, a: Tensor, b: Tensor, data, lam: float) -> Tensor:
    """iMAML's proximal inner problem solved exactly, per task."""
    sx, sy, qx, qy = data
    total = 0.0
    for t in range(sx.shape[0]):
        x, y = sx[t], sy[t]
        matrix = 2 / N * x.T @ x + lam * torch.eye(D, dtype=F64)
        w = torch.linalg.solve(matrix, 2 / N * x.T @ (a * y + b) + lam * theta.T).T
        total = total + ((qx[t] @ w.T - qy[t]) ** 2).mean()
    return total / sx.shape[0]


def snapshot(tensors) -> list[Tensor]:
    return [t.detach().clone() for t in tensors]


def assert_restored(tensors, before, what: str) -> None:
    for k, (t, saved) in enumerate(zip(tensors, before)):
        assert torch.equal(t.detach(), saved), (
            f"{what}: tensor {k} was left changed (max difference {float((t.detach() - saved).abs().max()):.3e})")


def engine_loop(model: nn.Module, a: Tensor, b: Tensor, mode: str, lr: Tensor | float = LR, **options) -> InnerLoop:
    return InnerLoop(model, SGD(model.parameters(), lr=lr), inner_loss_of(a, b), steps=options.pop("steps", STEPS),
                     mode=mode, meta_parameters=[a, b], **options)


# =============================================================================================
# Exact modes: the meta-gradient of θ, a and b equals the reference's
# =============================================================================================

EXACT_CASES = [
    ("second_order", {}, {}),
    ("checkpointed", {}, {}),                       # the default segment
    ("checkpointed", {"segment": 2}, {}),
    ("truncated", {"truncate": 1}, {"truncate": 1}),
    ("truncated", {"truncate": 0}, {"truncate": 0}),
    ("second_order", {"proximal": 0.5}, {"proximal": 0.5}),
]


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("mode,options,reference_options", EXACT_CASES)
def test_reverse_modes_give_meta_parameters_the_reference_gradient(mode, options, reference_options, vectorize):
    model, a, b, data = problem(1)
    wrt = [model.weight, a, b]
    before = snapshot(wrt)
    loss = engine_loop(model, a, b, mode, vectorize=vectorize, **options).meta_loss(*data, loss_fn=F.mse_loss)
    ours = grads_of(loss, wrt)
    reference_loss = reference_meta_loss(model.weight, a, b, data, **reference_options)
    reference = grads_of(reference_loss, wrt)
    assert abs(float(loss.detach()) - float(reference_loss.detach())) <= EXACT
    error = record("meta_parameters vs written-out unroll", mode, relative(ours, reference))
    assert error <= EXACT, (mode, options, ours, reference)
    assert float(reference[1].abs()) > 1e-3 or reference_options.get("truncate") == 0  # a matters here
    assert_restored(wrt, before, mode)


@pytest.mark.parametrize("vectorize", [False, True])
def test_first_order_treats_the_meta_parameters_as_constants(vectorize):
    """First-order MAML detaches the inner gradients, and a and b enter only through them: their
    meta-gradient is zero, θ's is the query gradient at the adapted weights."""
    model, a, b, data = problem(2)
    loss = engine_loop(model, a, b, "first_order", vectorize=vectorize).meta_loss(*data, loss_fn=F.mse_loss)
    ours = grads_of(loss, [model.weight, a, b])
    w = model.weight.detach()
    sx, sy, qx, qy = data
    adapted = []
    for t in range(TASKS):
        wt = w
        for _ in range(STEPS):
            wt = wt - LR * 2 / N * (sx[t] @ wt.T - (a.detach() * sy[t] + b.detach())).T @ sx[t]
        adapted.append(wt.requires_grad_())
    query = sum(((qx[t] @ adapted[t].T - qy[t]) ** 2).mean() for t in range(TASKS)) / TASKS
    theta_reference = sum(torch.autograd.grad(query, adapted))
    assert relative([ours[0]], [theta_reference]) <= EXACT
    assert float(ours[1].abs()) == 0 and float(ours[2].abs().max()) == 0


@pytest.mark.parametrize("solver", ["cg", "neumann"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_implicit_gives_meta_parameters_the_closed_form_gradient(solver, vectorize):
    model, a, b, data = problem(3)
    lam = 2.0
    wrt = [model.weight, a, b]
    before = snapshot(wrt)
    # contraction of the inner SGD: max |1 − LR (eig + λ)| ≤ 0.87 on these tasks; 250 steps reach 1e-15
    loop = engine_loop(model, a, b, "implicit", steps=250, proximal=lam, solver=solver, solver_iterations=300,
                       solver_tol=1e-14, neumann_alpha=LR, vectorize=vectorize)
    loss = loop.meta_loss(*data, loss_fn=F.mse_loss)
    ours = grads_of(loss, wrt)
    reference_loss = closed_form_meta_loss(model.weight, a, b, data, lam)
    reference = grads_of(reference_loss, wrt)
    assert abs(float(loss.detach()) - float(reference_loss.detach())) <= 1e-12
    error = record("implicit meta_parameters vs closed form", solver, relative(ours, reference))
    assert error <= IMPLICIT_TOL
    assert_restored(wrt, before, "implicit")


@pytest.mark.parametrize("vectorize", [False, True])
def test_forward_mode_differentiates_listed_meta_parameters(vectorize):
    model, a, b, data = problem(4)
    lr = torch.tensor(LR, dtype=F64, requires_grad=True)
    wrt = [model.weight, a, b, lr]
    before = snapshot(wrt)
    loop = engine_loop(model, a, b, "forward", lr=lr, forward_wrt=[a, b, lr, model.weight], vectorize=vectorize)
    ours = grads_of(loop.meta_loss(*data, loss_fn=F.mse_loss), wrt)
    second_order = engine_loop(model, a, b, "second_order", lr=lr, vectorize=vectorize)
    reference = grads_of(second_order.meta_loss(*data, loss_fn=F.mse_loss), wrt)
    written_out = grads_of(reference_meta_loss(model.weight, a, b, data), [model.weight, a, b])
    assert relative(reference[:3], written_out) <= EXACT
    assert record("forward meta_parameters vs second order", "a, b, lr, θ", relative(ours, reference)) <= FORWARD_TOL
    assert_restored(wrt, before, "forward")


# =============================================================================================
# ES and PES: unbiased for θ, a and b, and every perturbed tensor restored bit for bit
# =============================================================================================

def repeated(loop: InnerLoop, data, wrt, restored, before) -> tuple[Tensor, list[float]]:
    rows, reported = [], []
    for _ in range(REPEATS):
        loss = loop.meta_loss(*data, loss_fn=F.mse_loss)
        assert_restored(restored, before, f"{loop.mode} after the forward pass")
        rows.append(torch.cat([g.reshape(-1) for g in grads_of(loss, wrt)]))
        assert_restored(restored, before, f"{loop.mode} after backward")
        reported.append(loop.last_info["estimate_standard_error"])
    return torch.stack(rows), reported


@pytest.mark.parametrize("vectorize", [False, True])
def test_es_is_unbiased_for_meta_parameters_and_restores_them(vectorize):
    """es_wrt defaults to θ, the tensor hyperparameters and meta_parameters: all are perturbed."""
    model, a, b, data = problem(5)
    wrt = [model.weight, a, b]
    before = snapshot(wrt)
    truth_loss = reference_meta_loss(model.weight, a, b, data, proximal=0.5)
    truth = torch.cat([g.reshape(-1) for g in grads_of(truth_loss, wrt)])
    loop = engine_loop(model, a, b, "es", proximal=0.5, es_samples=SAMPLES, es_sigma=0.05,
                       generator=torch.Generator().manual_seed(6), vectorize=vectorize)
    estimates, reported = repeated(loop, data, wrt, wrt, before)
    value = loop.meta_loss(*data, loss_fn=F.mse_loss)
    assert abs(float(value.detach()) - float(truth_loss.detach())) <= EXACT  # the unperturbed meta-loss
    check_unbiased(estimates, truth, reported, "es meta_parameters")


def test_es_restores_a_perturbed_learning_rate_and_meta_parameters_exactly():
    """All four kinds of perturbed tensor at once — θ, a 0-d and a (1,) meta-parameter, the
    optimizer's tensor learning rate — each compared bit for bit after the call and after backward."""
    model, a, b, data = problem(6)
    lr = torch.tensor(LR, dtype=F64, requires_grad=True)
    tensors = [model.weight, a, b, lr]
    before = snapshot(tensors)
    for mode, extra in (("es", {}), ("pes", {"pes_truncation": 1})):
        loop = engine_loop(model, a, b, mode, lr=lr, es_samples=3, generator=torch.Generator().manual_seed(7), **extra)
        loss = loop.meta_loss(*data, loss_fn=F.mse_loss)
        assert_restored(tensors, before, f"{mode} after the forward pass")
        grads = torch.autograd.grad(loss, tensors)
        assert all(float(g.abs().max()) > 0 for g in grads)  # every one of them was perturbed
        assert_restored(tensors, before, f"{mode} after backward")


@pytest.mark.parametrize("vectorize", [False, True])
def test_pes_is_unbiased_for_meta_parameters_and_restores_them(vectorize, truncation=2, steps=3):
    """PES estimates ∇ mean_s L_s, L_s the query loss at the end of truncation s (ends 2 and 3)."""
    model, a, b, data = problem(8)
    wrt = [model.weight, a, b]
    before = snapshot(wrt)
    ends = [min(start + truncation, steps) for start in range(0, steps, truncation)]
    target = torch.stack([reference_meta_loss(model.weight, a, b, data, steps=end, proximal=0.5) for end in ends]).mean()
    truth = torch.cat([g.reshape(-1) for g in grads_of(target, wrt)])
    loop = engine_loop(model, a, b, "pes", steps=steps, pes_truncation=truncation, proximal=0.5, es_samples=SAMPLES,
                       es_sigma=0.05, generator=torch.Generator().manual_seed(9), vectorize=vectorize)
    estimates, reported = repeated(loop, data, wrt, wrt, before)
    assert loop.last_info["truncations"] == len(ends)
    check_unbiased(estimates, truth, reported, "pes meta_parameters")
