"""The gradient-based meta-learners (diffopt.algorithms) against independent references.

Everything compared numerically is float64. The references never use the engine:

* MAML, first-order MAML, Meta-SGD, MAML++ and ANIL: a hand-written unrolled loop
  over the tasks (``torch.func.functional_call`` and plain ``torch.autograd.grad``,
  SGD and Adam written out by hand);
* iMAML: ``(I + H/λ)⁻¹ ∇L_Q(φ*)`` with the explicit Hessian of the support loss;
* Meta-SGD at K = 1: ``dL_Q/dα = −∇L_Q(φ) ⊙ ∇L_S(θ)``;
* Reptile: ``θ − W = α∇L(θ)`` after one SGD step, and batched / serial updates by hand.

Seeded training runs that must learn are in ``test_algorithms_training.py``; the
metric learners are in ``test_metric_learners.py``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call

import diffopt.optim as dopt
from diffopt.algorithms import ANIL, FOMAML, MAML, MAMLPlusPlus, MetaSGD, Reptile, iMAML
from diffopt.recipes import make_learner
from strategies import examples

F64 = torch.float64
EXACT = 1e-12   # the same mathematics computed in a different order
QUICK = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=examples(12))


# =============================================================================================
# Tiny problems and the hand-written reference
# =============================================================================================

def regressor(seed: int, d_in: int = 2, hidden: int = 3, d_out: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(F64)


def regression_tasks(seed: int, tasks: int = 3, shots: int = 5, query: int = 6, d_in: int = 2,
                     d_out: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=F64)
    return draw(tasks, shots, d_in), draw(tasks, shots, d_out), draw(tasks, query, d_in), draw(tasks, query, d_out)


def classification_tasks(seed: int, tasks: int = 3, ways: int = 3, shots: int = 2, query: int = 3,
                         d_in: int = 3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    sy = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone()
    qy = torch.arange(ways).repeat_interleave(query).expand(tasks, -1).clone()
    return (torch.randn(tasks, ways * shots, d_in, generator=g, dtype=F64), sy,
            torch.randn(tasks, ways * query, d_in, generator=g, dtype=F64), qy)


def call(model: nn.Module, params: Sequence[Tensor], x: Tensor) -> Tensor:
    names = [n for n, _ in model.named_parameters()]
    return functional_call(model, dict(zip(names, params)), (x,))


Rule = Callable[[list[Tensor], list[Tensor], dict, int], list[Tensor]]


def sgd_rule(lr: Callable[[int, int], float | Tensor] | float) -> Rule:
    """Hand-written SGD; ``lr(j, k)``: the learning rate of parameter j at step k."""
    rate = lr if callable(lr) else (lambda j, k: lr)

    def rule(params: list[Tensor], grads: list[Tensor], state: dict, k: int) -> list[Tensor]:
        return [p - rate(j, k) * g for j, (p, g) in enumerate(zip(params, grads))]
    return rule


def adam_rule(lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Rule:
    """Hand-written Adam (torch.optim.Adam's formula, no weight decay)."""
    b1, b2 = betas

    def rule(params: list[Tensor], grads: list[Tensor], state: dict, k: int) -> list[Tensor]:
        m = state.setdefault("m", [torch.zeros_like(p) for p in params])
        v = state.setdefault("v", [torch.zeros_like(p) for p in params])
        t = k + 1
        state["m"] = m = [b1 * mi + (1 - b1) * g for mi, g in zip(m, grads)]
        state["v"] = v = [b2 * vi + (1 - b2) * g * g for vi, g in zip(v, grads)]
        return [p - lr / (1 - b1**t) * mi / (vi.sqrt() / (1 - b2**t) ** 0.5 + eps) for p, mi, vi in zip(params, m, v)]
    return rule


def unroll(model: nn.Module, params: Sequence[Tensor], x: Tensor, y: Tensor, steps: int, rule: Rule,
           loss_fn=F.mse_loss, order: str = "second", adapt: Sequence[bool] | None = None,
           record: Callable[[list[Tensor], int], None] | None = None) -> list[Tensor]:
    """K inner steps on one task by hand; ``order="first"`` treats the inner gradients as constants.

    ``adapt[j]`` False keeps parameter j fixed; ``record(params, k)`` sees the weights after k steps.
    """
    params = list(params)
    adapt = [True] * len(params) if adapt is None else list(adapt)
    state: dict = {}
    for k in range(steps):
        loss = loss_fn(call(model, params, x), y)
        moving = [p for p, a in zip(params, adapt) if a]
        grads = list(torch.autograd.grad(loss, moving, create_graph=order == "second"))
        if order == "first":
            grads = [g.detach() for g in grads]
        new = iter(rule(moving, grads, state, k))
        params = [next(new) if a else p for p, a in zip(params, adapt)]
        if record is not None:
            record(params, k + 1)
    return params


def reference_meta_loss(model: nn.Module, batch, steps: int, rule_factory: Callable[[], Rule],
                        loss_fn=F.mse_loss, order: str = "second", adapt=None) -> Tensor:
    sx, sy, qx, qy = batch
    theta = list(model.parameters())
    total = 0.0
    for t in range(sx.shape[0]):
        phi = unroll(model, theta, sx[t], sy[t], steps, rule_factory(), loss_fn, order, adapt)
        total = total + loss_fn(call(model, phi, qx[t]), qy[t])
    return total / sx.shape[0]


def grads_of(loss: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(loss, list(tensors), allow_unused=False))


def assert_close(ours: Sequence[Tensor], reference: Sequence[Tensor], tol: float = EXACT) -> None:
    assert len(ours) == len(reference)
    scale = max(1.0, max(float(r.abs().max()) for r in reference))
    error = max(float((a - b).abs().max()) for a, b in zip(ours, reference))
    assert error <= tol * scale, f"max error {error:.3e} > {tol:.0e} x {scale:.3g}"


# =============================================================================================
# MAML
# =============================================================================================

MAML_MODES = {  # engine modes whose meta-gradient must equal second order
    "second_order": lambda k: {},
    "checkpointed": lambda k: {"segment": 1},
    "checkpointed_sqrt": lambda k: {},
    "truncated": lambda k: {"truncate": k},
}


@QUICK
@given(steps=st.integers(1, 3), inner=st.sampled_from(["sgd", "adam"]), mode=st.sampled_from(sorted(MAML_MODES)),
       vectorize=st.booleans(), seed=st.integers(0, 2**16))
def test_maml_equals_hand_unrolled_loop(steps, inner, mode, vectorize, seed):
    model = regressor(seed)
    batch = regression_tasks(seed + 1)
    engine_mode = "checkpointed" if mode.startswith("checkpointed") else mode
    if inner == "sgd":
        learner = MAML(model, F.mse_loss, inner_lr=0.1, inner_steps=steps, mode=engine_mode, vectorize=vectorize,
                       **MAML_MODES[mode](steps))
        factory = lambda: sgd_rule(0.1)  # noqa: E731
    else:
        learner = MAML(model, F.mse_loss, inner_steps=steps, mode=engine_mode, vectorize=vectorize,
                       inner_optimizer=dopt.Adam(model.parameters(), lr=0.05), **MAML_MODES[mode](steps))
        factory = lambda: adam_rule(0.05)  # noqa: E731
    theta = list(model.parameters())
    ours = learner.meta_loss(*batch)
    reference = reference_meta_loss(model, batch, steps, factory)
    torch.testing.assert_close(ours, reference, rtol=EXACT, atol=0)
    assert_close(grads_of(ours, theta), grads_of(reference, theta))


def test_maml_classification_and_zero_steps():
    model = regressor(0, d_in=3, hidden=4, d_out=3)
    batch = classification_tasks(1)
    learner = MAML(model, F.cross_entropy, inner_lr=0.3, inner_steps=2)
    theta = list(model.parameters())
    ours = learner.meta_loss(*batch)
    reference = reference_meta_loss(model, batch, 2, lambda: sgd_rule(0.3), F.cross_entropy)
    assert_close(grads_of(ours, theta), grads_of(reference, theta))
    # K = 0: the meta-loss is the query loss of θ itself
    zero = MAML(model, F.cross_entropy, inner_steps=0)
    sx, sy, qx, qy = batch
    expected = torch.stack([F.cross_entropy(model(qx[t]), qy[t]) for t in range(3)]).mean()
    torch.testing.assert_close(zero.meta_loss(*batch), expected, rtol=EXACT, atol=0)


def test_maml_learned_scalar_inner_lr_gets_its_gradient():
    model = regressor(3)
    batch = regression_tasks(4)
    lr = nn.Parameter(torch.tensor(0.1, dtype=F64))
    learner = MAML(model, inner_lr=lr, inner_steps=2)
    assert any(p is lr for p in learner.parameters())  # meta-learned with θ
    ours = learner.meta_loss(*batch)
    reference = reference_meta_loss(model, batch, 2, lambda: sgd_rule(lr))
    assert_close(grads_of(ours, [lr, *model.parameters()]), grads_of(reference, [lr, *model.parameters()]))


def test_maml_predict_and_evaluate_steps_adapt_without_graph():
    model = regressor(5)
    sx, sy, qx, qy = regression_tasks(6)
    learner = MAML(model, inner_lr=0.1, inner_steps=1)
    out = learner.evaluate_steps(sx, sy, qx, qy, steps=(0, 1, 3))
    assert out["loss"].shape == (3, 3) and not out["loss"].requires_grad
    theta = [p.detach() for p in model.parameters()]
    for t in range(3):
        for row, k in enumerate((0, 1, 3)):
            with torch.enable_grad():
                phi = unroll(model, [p.clone().requires_grad_() for p in theta], sx[t], sy[t], k, sgd_rule(0.1))
            expected = F.mse_loss(call(model, phi, qx[t]), qy[t])
            torch.testing.assert_close(out["loss"][row, t], expected.detach(), rtol=EXACT, atol=0)
    prediction = learner.predict(sx, sy, qx, steps=3)
    with torch.enable_grad():
        phi = unroll(model, [p.clone().requires_grad_() for p in theta], sx[1], sy[1], 3, sgd_rule(0.1))
    torch.testing.assert_close(prediction[1], call(model, phi, qx[1]).detach(), rtol=EXACT, atol=0)


# =============================================================================================
# First-order MAML
# =============================================================================================

@QUICK
@given(steps=st.integers(1, 3), vectorize=st.booleans(), seed=st.integers(0, 2**16))
def test_fomaml_matches_first_order_formula(steps, vectorize, seed):
    model = regressor(seed)
    batch = regression_tasks(seed + 1)
    learner = FOMAML(model, F.mse_loss, inner_lr=0.1, inner_steps=steps, vectorize=vectorize)
    assert learner.loop.mode == "first_order"
    theta = list(model.parameters())
    ours = grads_of(learner.meta_loss(*batch), theta)
    # the formula: the mean over tasks of the query gradient at the adapted weights
    sx, sy, qx, qy = batch
    expected = [torch.zeros_like(p) for p in theta]
    for t in range(sx.shape[0]):
        phi = [p.detach() for p in unroll(model, theta, sx[t], sy[t], steps, sgd_rule(0.1), order="first")]
        phi = [p.requires_grad_() for p in phi]
        g = torch.autograd.grad(F.mse_loss(call(model, phi, qx[t]), qy[t]), phi)
        expected = [e + gi / sx.shape[0] for e, gi in zip(expected, g)]
    assert_close(ours, expected)
    # and it is MAML with mode="first_order", and differs from second order
    same = MAML(model, F.mse_loss, inner_lr=0.1, inner_steps=steps, mode="first_order", vectorize=vectorize)
    assert_close(grads_of(same.meta_loss(*batch), theta), expected)
    second = grads_of(MAML(model, F.mse_loss, inner_lr=0.1, inner_steps=steps).meta_loss(*batch), theta)
    assert max(float((a - b).abs().max()) for a, b in zip(second, expected)) > 1e-6


# =============================================================================================
# iMAML
# =============================================================================================

def flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(model: nn.Module, vector: Tensor) -> list[Tensor]:
    out, start = [], 0
    for p in model.parameters():
        out.append(vector[start:start + p.numel()].view(p.shape))
        start += p.numel()
    return out


@pytest.mark.parametrize("regularization", [0.5, 2.0])
@pytest.mark.parametrize("vectorize", [True, False])
def test_imaml_matches_explicit_hessian_formula(regularization, vectorize):
    model = regressor(7)
    batch = regression_tasks(8, tasks=2)
    steps, lr = 40, 0.1
    learner = iMAML(model, F.mse_loss, inner_lr=lr, inner_steps=steps, regularization=regularization,
                    solver_iterations=200, solver_tol=1e-15, vectorize=vectorize)
    theta = list(model.parameters())
    ours = flat(grads_of(learner.meta_loss(*batch), theta))
    assert learner.loop.last_info["solve"].converged
    sx, sy, qx, qy = batch
    th = flat(theta).detach()
    expected = torch.zeros_like(th)
    adapted = learner.adapt(sx, sy)
    for t in range(sx.shape[0]):
        phi = th.clone()
        for _ in range(steps):  # SGD on L_S(φ) + λ/2 ||φ − θ||², by hand
            phi.requires_grad_()
            support_loss = F.mse_loss(call(model, unflat(model, phi), sx[t]), sy[t])
            objective = support_loss + regularization / 2 * ((phi - th) ** 2).sum()
            phi = (phi - lr * torch.autograd.grad(objective, phi)[0]).detach()
        assert_close([flat(adapted.task(t)).detach()], [phi])  # the engine's inner solution is this one
        def support(p: Tensor, t: int = t) -> Tensor:
            return F.mse_loss(call(model, unflat(model, p), sx[t]), sy[t])
        hessian = torch.autograd.functional.hessian(support, phi)
        query = phi.clone().requires_grad_()
        g_query = torch.autograd.grad(F.mse_loss(call(model, unflat(model, query), qx[t]), qy[t]), query)[0]
        identity = torch.eye(th.numel(), dtype=F64)
        expected += torch.linalg.solve(identity + hessian / regularization, g_query) / sx.shape[0]
    assert_close([ours], [expected], tol=1e-10)
    assert learner.loop.mode == "implicit" and learner.loop.proximal == regularization


# =============================================================================================
# Meta-SGD
# =============================================================================================

@QUICK
@given(seed=st.integers(0, 2**16), mode=st.sampled_from(["second_order", "first_order"]), vectorize=st.booleans())
def test_metasgd_learning_rate_gradient_hand_formula(seed, mode, vectorize):
    """K = 1: dL_Q/dα = −∇L_Q(φ) ⊙ ∇L_S(θ) (averaged over tasks), in both orders."""
    model = regressor(seed)
    batch = regression_tasks(seed + 1)
    learner = MetaSGD(model, F.mse_loss, inner_steps=1, mode=mode, vectorize=vectorize,
                      generator=torch.Generator().manual_seed(seed))
    alphas = list(learner.inner_lrs)
    ours = grads_of(learner.meta_loss(*batch), alphas)
    sx, sy, qx, qy = batch
    theta = [p.detach().requires_grad_() for p in model.parameters()]
    expected = [torch.zeros_like(a) for a in alphas]
    for t in range(sx.shape[0]):
        g_support = torch.autograd.grad(F.mse_loss(call(model, theta, sx[t]), sy[t]), theta)
        phi = [(p - a.detach() * g).detach().requires_grad_() for p, a, g in zip(theta, alphas, g_support)]
        g_query = torch.autograd.grad(F.mse_loss(call(model, phi, qx[t]), qy[t]), phi)
        expected = [e - gq * gs / sx.shape[0] for e, gq, gs in zip(expected, g_query, g_support)]
    assert_close(ours, expected)


@pytest.mark.parametrize("mode", ["second_order", "checkpointed", "truncated"])
def test_metasgd_theta_gradient_matches_hand_loop_with_per_element_rates(mode):
    model = regressor(11)
    batch = regression_tasks(12)
    options = {"truncated": {"truncate": 3}, "checkpointed": {"segment": 2}}.get(mode, {})
    learner = MetaSGD(model, F.mse_loss, inner_steps=3, mode=mode, generator=torch.Generator().manual_seed(0),
                      **options)
    alphas = list(learner.inner_lrs)
    params = [*model.parameters(), *alphas]
    ours = learner.meta_loss(*batch)
    reference = reference_meta_loss(model, batch, 3, lambda: sgd_rule(lambda j, k: alphas[j]))
    torch.testing.assert_close(ours, reference, rtol=EXACT, atol=0)
    assert_close(grads_of(ours, params), grads_of(reference, params))


def test_metasgd_initialisation_uniform_in_paper_range():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    learner = MetaSGD(model, generator=torch.Generator().manual_seed(3))
    values = torch.cat([a.detach().reshape(-1) for a in learner.inner_lrs])
    assert [a.shape for a in learner.inner_lrs] == [p.shape for p in model.parameters()]
    assert values.min() >= 0.005 and values.max() <= 0.1
    assert values.min() < 0.006 and values.max() > 0.099 and abs(float(values.mean()) - 0.0525) < 0.002
    from scipy import stats
    assert stats.kstest(values.double().numpy(), stats.uniform(0.005, 0.095).cdf).pvalue > 1e-3
    # the learning rates are meta-parameters (the outer optimizer sees them) and the generator decides them
    ids = {id(p) for p in learner.parameters()}
    assert all(id(a) in ids for a in learner.inner_lrs)
    again = MetaSGD(model, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(learner.inner_lrs, again.inner_lrs))
    other = MetaSGD(model, lr_init=(0.2, 0.3), generator=torch.Generator().manual_seed(3))
    assert all(bool(((a >= 0.2) & (a <= 0.3)).all()) for a in other.inner_lrs)


@QUICK
@given(steps=st.integers(1, 3), lr=st.sampled_from([0.01, 0.05, 0.3]), seed=st.integers(0, 2**16),
       vectorize=st.booleans())
def test_metasgd_with_equal_rates_is_maml(steps, lr, seed, vectorize):
    model = regressor(seed)
    batch = regression_tasks(seed + 1)
    meta_sgd = MetaSGD(model, inner_steps=steps, vectorize=vectorize)
    with torch.no_grad():
        for a in meta_sgd.inner_lrs:
            a.fill_(lr)
    maml = MAML(model, inner_lr=lr, inner_steps=steps, vectorize=vectorize)
    theta = list(model.parameters())
    a, b = meta_sgd.meta_loss(*batch), maml.meta_loss(*batch)
    # MAML's number lr takes torch's fused update (add(p, g, alpha=-lr), a single rounding),
    # Meta-SGD's learnable rates the tensor expression p - lr * g: equal up to rounding.
    assert abs(float(a.detach() - b.detach())) <= 1e-14 * max(1.0, abs(float(b.detach())))
    for x, y in zip(grads_of(a, theta), grads_of(b, theta)):
        assert (x - y).abs().max() <= 1e-14 * max(1.0, float(y.abs().max()))


# =============================================================================================
# MAML++
# =============================================================================================

@settings(deadline=None, max_examples=examples(60))
@given(k=st.integers(1, 8), msl_epochs=st.integers(1, 20), epoch=st.integers(0, 40))
def test_mamlpp_step_weights_sum_to_one_and_anneal_to_the_last_step(k, msl_epochs, epoch):
    learner = MAMLPlusPlus(regressor(0), inner_steps=k, multi_step_loss_epochs=msl_epochs)
    learner.set_epoch(epoch)
    w = learner.step_weights()
    assert w.shape == (k,) and abs(float(w.sum()) - 1.0) < 1e-14 and bool((w > 0).all())
    if k == 1:
        assert float(w[0]) == 1.0
        return
    assert bool((w[:-1] >= 0.03 / k - 1e-15).all())
    learner.set_epoch(0)
    assert torch.allclose(learner.step_weights(), torch.full((k,), 1.0 / k, dtype=F64), rtol=0, atol=1e-15)
    learner.set_epoch(epoch + 1)
    later = learner.step_weights()
    assert bool((later[:-1] <= w[:-1]).all()) and later[-1] >= w[-1]  # mass moves to the last step
    learner.set_epoch(max(epoch, msl_epochs))  # annealed: every earlier step at the floor
    final = learner.step_weights()
    assert torch.allclose(final[:-1], torch.full((k - 1,), 0.03 / k, dtype=F64), rtol=0, atol=1e-15)
    assert abs(float(final[-1]) - (1 - (k - 1) * 0.03 / k)) < 1e-14


def mamlpp_reference(model: nn.Module, step_lrs: Sequence[Tensor], batch, steps: int, weights: Tensor,
                     order: str = "second") -> Tensor:
    """Σ_k w_k L_Q(φ_k), φ_k = φ_{k−1} − α_{l,k−1} ∇L_S(φ_{k−1}), averaged over tasks, by hand."""
    sx, sy, qx, qy = batch
    total = 0.0
    for t in range(sx.shape[0]):
        per_step: dict[int, Tensor] = {}

        def record(params, k, t=t, per_step=per_step):
            per_step[k] = F.mse_loss(call(model, params, qx[t]), qy[t])
        unroll(model, list(model.parameters()), sx[t], sy[t], steps, sgd_rule(lambda j, k: step_lrs[j][k]),
               order=order, record=record)
        total = total + sum(weights[k - 1] * per_step[k] for k in range(1, steps + 1))
    return total / sx.shape[0]


@pytest.mark.parametrize("vectorize", [True, False])
def test_mamlpp_multi_step_loss_equals_hand_weighted_sum(vectorize):
    model = regressor(21)
    batch = regression_tasks(22)
    steps = 3
    learner = MAMLPlusPlus(model, inner_lr=0.1, inner_steps=steps, multi_step_loss_epochs=10, first_order_epochs=0,
                           vectorize=vectorize)
    assert [lr.shape for lr in learner.step_lrs] == [(steps,)] * len(list(model.parameters()))
    with torch.no_grad():  # distinct per-layer, per-step learning rates
        for j, lr in enumerate(learner.step_lrs):
            lr.copy_(torch.tensor([0.05 + 0.01 * j, 0.1 - 0.02 * j, 0.07 + 0.005 * j], dtype=F64))
    learner.set_epoch(4)
    weights = learner.step_weights()
    assert len(set(weights.tolist())) > 1  # a genuinely weighted sum
    ours = learner.meta_loss(*batch)
    reference = mamlpp_reference(model, list(learner.step_lrs), batch, steps, weights)
    torch.testing.assert_close(ours, reference, rtol=EXACT, atol=0)
    wrt = [*model.parameters(), *learner.step_lrs]
    ours_grads = grads_of(ours, wrt)
    assert_close(ours_grads, grads_of(reference, wrt))
    for g in ours_grads[len(list(model.parameters())):]:  # every layer's every step rate learns
        assert bool((g != 0).all())


def test_mamlpp_derivative_order_annealing_and_final_step_loss():
    model = regressor(23)
    batch = regression_tasks(24)
    steps = 3
    learner = MAMLPlusPlus(model, inner_lr=0.1, inner_steps=steps, multi_step_loss_epochs=2, first_order_epochs=5)
    theta = list(model.parameters())
    # first-order epochs (after the multi-step-loss epochs): θ gets first-order MAML's gradient ...
    learner.set_epoch(3)
    loss = learner.meta_loss(*batch)
    ours = torch.autograd.grad(loss, [*theta, *learner.step_lrs])
    fomaml = FOMAML(model, inner_lr=0.1, inner_steps=steps)
    assert_close(ours[:len(theta)], grads_of(fomaml.meta_loss(*batch), theta))
    # ... and the per-step learning rates still get theirs (through the last updates)
    reference = mamlpp_reference(model, list(learner.step_lrs), batch, steps,
                                 torch.tensor([0.0, 0.0, 1.0], dtype=F64), order="first")
    assert_close(ours[len(theta):], grads_of(reference, list(learner.step_lrs)))
    assert all(bool((g != 0).all()) for g in ours[len(theta):])
    # afterwards: second order, the last step's loss only, exactly MAML
    learner.set_epoch(5)
    loss = learner.meta_loss(*batch)
    maml = MAML(model, inner_lr=0.1, inner_steps=steps)
    reference_loss = maml.meta_loss(*batch)
    torch.testing.assert_close(loss, reference_loss, rtol=EXACT, atol=0)
    assert_close(grads_of(loss, theta), grads_of(reference_loss, theta))
    # during the first epochs the multi-step loss is first order too
    learner.set_epoch(0)
    early = learner.meta_loss(*batch)
    reference = mamlpp_reference(model, list(learner.step_lrs), batch, steps, learner.step_weights(), order="first")
    torch.testing.assert_close(early, reference, rtol=EXACT, atol=0)
    assert_close(grads_of(early, theta), grads_of(reference, theta))


def test_mamlpp_evaluates_with_more_test_steps_than_training_steps():
    """Test-time adaptation may run longer than K (the trainer evaluates after 10 steps)."""
    model = regressor(25)
    sx, sy, qx, qy = regression_tasks(26)
    learner = MAMLPlusPlus(model, inner_lr=0.1, inner_steps=2)
    with torch.no_grad():
        for lr in learner.step_lrs:
            lr.copy_(torch.tensor([0.05, 0.08], dtype=F64))
    out = learner.evaluate_steps(sx, sy, qx, qy, steps=(0, 2, 5))["loss"]
    assert out.shape == (3, 3) and bool(torch.isfinite(out).all())
    # steps beyond K reuse the last step's learning rates
    theta = [p.detach().requires_grad_() for p in model.parameters()]
    rates = lambda j, k: (0.05, 0.08)[min(k, 1)]  # noqa: E731
    phi = unroll(model, theta, sx[0], sy[0], 5, sgd_rule(rates))
    torch.testing.assert_close(out[2, 0], F.mse_loss(call(model, phi, qx[0]), qy[0]).detach(), rtol=EXACT, atol=0)


# =============================================================================================
# ANIL
# =============================================================================================

class CountingBody(nn.Module):
    def __init__(self, d_in: int = 3, hidden: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, hidden)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return torch.tanh(self.linear(x))


def anil_parts(seed: int) -> tuple[CountingBody, nn.Linear]:
    torch.manual_seed(seed)
    return CountingBody().to(F64), nn.Linear(4, 3).to(F64)


@QUICK
@given(steps=st.integers(1, 3), mode=st.sampled_from(["second_order", "first_order", "checkpointed"]),
       vectorize=st.booleans(), seed=st.integers(0, 2**16))
def test_anil_equals_maml_with_head_only_inner_optimizer(steps, mode, vectorize, seed):
    body, head = anil_parts(seed)
    batch = classification_tasks(seed + 1)
    anil = ANIL(body, head, F.cross_entropy, inner_lr=0.5, inner_steps=steps, mode=mode, vectorize=vectorize)
    whole = nn.Sequential(body, head)
    maml = MAML(whole, F.cross_entropy, inner_steps=steps, mode=mode, vectorize=vectorize,
                inner_optimizer=dopt.SGD(head.parameters(), lr=0.5))
    params = list(whole.parameters())
    a, b = anil.meta_loss(*batch), maml.meta_loss(*batch)
    torch.testing.assert_close(a, b, rtol=EXACT, atol=0)
    ours, theirs = grads_of(a, params), grads_of(b, params)
    assert_close(ours, theirs)
    body_grads = ours[:2]
    assert all(float(g.abs().max()) > 0 for g in body_grads)  # the meta-gradient reaches the body
    # and the hand-written reference: only the head's parameters move in the inner loop
    order = "first" if mode == "first_order" else "second"
    reference = reference_meta_loss(whole, batch, steps, lambda: sgd_rule(0.5), F.cross_entropy, order=order,
                                    adapt=[False, False, True, True])
    assert_close(ours, grads_of(reference, params))


def test_anil_adapts_only_the_head_and_computes_features_once():
    body, head = anil_parts(31)
    sx, sy, qx, qy = classification_tasks(32)
    for steps in (1, 2, 4):
        anil = ANIL(body, head, F.cross_entropy, inner_lr=0.5, inner_steps=steps)
        body.calls = 0
        adapted = anil.adapt(sx, sy)
        assert body.calls == 1
        assert len(adapted.params) == 2 and all(adapted.adapted)
        assert [p.shape for p in adapted.params] == [(3, *p.shape) for p in head.parameters()]
        assert not torch.equal(adapted.params[0][0], head.weight)  # the head moved ...
        body.calls = 0
        anil.meta_loss(sx, sy, qx, qy).backward()
        assert body.calls == 2  # support and query features once each, whatever K
        body.calls = 0
        anil.evaluate_steps(sx, sy, qx, qy, steps=(0, 1, 5))
        anil.predict(sx, sy, qx)
        assert body.calls == 4
    before = [p.detach().clone() for p in body.parameters()]
    anil.adapt(sx, sy)
    assert all(torch.equal(a, b) for a, b in zip(before, body.parameters()))  # ... the body did not


def test_anil_whole_model_modes_adapt_the_head_only():
    body, head = anil_parts(33)
    sx, sy, qx, qy = classification_tasks(34)
    anil = ANIL(body, head, F.cross_entropy, inner_lr=0.5, inner_steps=1, mode="forward")
    assert not anil.features_once
    adapted = anil.adapt(sx, sy)
    assert adapted.adapted == [False, False, True, True]
    assert torch.equal(adapted.params[0], body.linear.weight) and adapted.params[2].shape == (3, 3, 4)


def test_anil_recipe_splits_body_and_head():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    learner = make_learner("anil", model, classification=True, inner_lr=0.2, inner_steps=2)
    assert isinstance(learner, ANIL) and learner.head is model[2] and len(learner.body) == 2
    with pytest.raises(ValueError, match="nn.Sequential whose last module is the head"):
        make_learner("anil", nn.Linear(3, 2), classification=True)


# =============================================================================================
# Reptile
# =============================================================================================

@QUICK
@given(seed=st.integers(0, 2**16), lr=st.sampled_from([0.01, 0.1, 0.5]), vectorize=st.booleans())
def test_reptile_one_sgd_step_is_a_gradient_step(seed, lr, vectorize):
    """θ − W = α ∇L(θ) after one inner SGD step (averaged over the tasks of the batch)."""
    model = regressor(seed)
    sx, sy, _, _ = regression_tasks(seed + 1)
    reptile = Reptile(model, inner_lr=lr, inner_steps=1, vectorize=vectorize)
    ours = reptile.pseudo_gradient(sx, sy)
    theta = list(model.parameters())
    expected = [torch.zeros_like(p) for p in theta]
    for t in range(sx.shape[0]):
        g = torch.autograd.grad(F.mse_loss(model(sx[t]), sy[t]), theta)
        expected = [e + lr * gi / sx.shape[0] for e, gi in zip(expected, g)]
    assert_close(ours, expected)
    assert not any(p.requires_grad for p in ours)


def reptile_weights(model: nn.Module, theta: list[Tensor], x: Tensor, y: Tensor, lr: float, steps: int) -> list[Tensor]:
    theta = [p.detach().requires_grad_() for p in theta]
    return [p.detach() for p in unroll(model, theta, x, y, steps, sgd_rule(lr), order="first")]


@pytest.mark.parametrize("batched", [True, False])
def test_reptile_batched_and_serial_updates(batched):
    model = regressor(41)
    sx, sy, qx, qy = regression_tasks(42)
    reptile = Reptile(model, inner_lr=0.1, inner_steps=3, outer_lr=0.5, outer_lr_final=0.1, batched=batched)
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(reptile.parameters(), lr=123.0)
    stats = reptile.train_step((sx, sy, qx, qy), optimizer, iteration=2, total_iterations=4)
    epsilon = 0.5 + 0.5 * (0.1 - 0.5)
    assert stats["outer_lr"] == pytest.approx(epsilon, abs=1e-15)
    assert optimizer.param_groups[0]["lr"] == stats["outer_lr"]
    theta = start
    if batched:  # θ ← θ + ε (mean_t W_t − θ)
        finals = [reptile_weights(model, theta, sx[t], sy[t], 0.1, 3) for t in range(3)]
        theta = [p + epsilon * (torch.stack([w[j] for w in finals]).mean(0) - p) for j, p in enumerate(theta)]
    else:  # after every task: θ ← θ + ε (W_t(θ) − θ)
        for t in range(3):
            w = reptile_weights(model, theta, sx[t], sy[t], 0.1, 3)
            theta = [p + epsilon * (wj - p) for p, wj in zip(theta, w)]
    assert_close([p.detach() for p in model.parameters()], theta)
    # the reported loss is the query loss after adaptation from the new θ
    expected = torch.stack([
        F.mse_loss(call(model, reptile_weights(model, theta, sx[t], sy[t], 0.1, 3), qx[t]), qy[t]) for t in range(3)
    ]).mean()
    assert stats["meta_loss"] == pytest.approx(float(expected), rel=1e-12)


def test_reptile_serial_differs_from_batched_and_train_on_query_uses_query():
    batch = regression_tasks(43)
    results = {}
    for batched, on_query in ((True, False), (False, False), (True, True)):
        model = regressor(44)
        reptile = Reptile(model, inner_lr=0.1, inner_steps=2, outer_lr=0.5, outer_lr_final=None, batched=batched,
                          train_on_query=on_query)
        reptile.train_step(batch, torch.optim.SGD(reptile.parameters(), lr=0.5))
        results[batched, on_query] = flat(model.parameters()).detach()
    assert not torch.allclose(results[True, False], results[False, False])
    assert not torch.allclose(results[True, False], results[True, True])
    # train_on_query: the inner loop sees support and query together
    model = regressor(44)
    reptile = Reptile(model, inner_lr=0.1, inner_steps=2, outer_lr=0.5, outer_lr_final=None)
    sx, sy, qx, qy = batch
    joined = (torch.cat([sx, qx], 1), torch.cat([sy, qy], 1), qx, qy)
    reptile.train_step(joined, torch.optim.SGD(reptile.parameters(), lr=0.5))
    assert torch.equal(flat(model.parameters()).detach(), results[True, True])


@settings(deadline=None, max_examples=examples(40))
@given(start=st.floats(0.01, 2.0), final=st.floats(0.0, 1.0), total=st.integers(2, 500))
def test_reptile_outer_step_size_is_linear_to_the_final_value(start, final, total):
    reptile = Reptile(regressor(0), outer_lr=start, outer_lr_final=final)
    values = [reptile.outer_step_size(i, total) for i in range(total + 1)]
    assert values[0] == start
    assert values[-1] == pytest.approx(final, abs=1e-12)
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(s == pytest.approx((final - start) / total, abs=1e-12) for s in steps)  # linear
    assert reptile.outer_step_size(total + 10, total) == pytest.approx(final, abs=1e-12)  # then held
    constant = Reptile(regressor(0), outer_lr=start, outer_lr_final=None)
    assert {constant.outer_step_size(i, total) for i in range(total)} == {start}


# =============================================================================================
# Shapes and names: bad input to every gradient-based learner
# =============================================================================================

def gradient_learners() -> dict[str, Callable[[], nn.Module]]:
    return {
        "MAML": lambda: MAML(regressor(0)),
        "FOMAML": lambda: FOMAML(regressor(0)),
        "iMAML": lambda: iMAML(regressor(0), inner_steps=2),
        "MetaSGD": lambda: MetaSGD(regressor(0)),
        "MAMLPlusPlus": lambda: MAMLPlusPlus(regressor(0), inner_steps=2),
        "ANIL": lambda: ANIL(nn.Linear(2, 3).to(F64), nn.Linear(3, 1).to(F64), F.mse_loss),
        "Reptile": lambda: Reptile(regressor(0)),
    }


@pytest.mark.parametrize("name", sorted(gradient_learners()))
def test_mismatched_support_and_query_shapes_are_refused(name):
    learner = gradient_learners()[name]()
    sx, sy, qx, qy = regression_tasks(0)
    cases = {
        "support has 3 tasks but query has 2": (sx, sy, qx[:2], qy[:2]),
        r"support inputs \(3, 5\) and labels \(3, 4\)": (sx, sy[:, :4], qx, qy),
        r"query inputs \(3, 6\) and labels \(3, 5\)": (sx, sy, qx, qy[:, :5]),
        r"query inputs \(3, 6\) and labels \(2, 9\)": (sx, sy, qx, qy.reshape(2, 9, 1)),
        r"support examples have shape \(2,\) but query examples \(3,\)": (sx, sy, torch.randn(3, 6, 3, dtype=F64), qy),
        "leading task dimension and an example dimension": (sx[0, :, 0], sy[0, :, 0], qx[0, :, 0], qy[0, :, 0]),
    }
    for message, batch in cases.items():
        with pytest.raises(ValueError, match=message):
            learner.meta_loss(*batch)
        with pytest.raises(ValueError, match=message):  # evaluation checks as training does
            learner.evaluate_steps(*batch, steps=(0, 1))
        with pytest.raises(ValueError, match=message):
            learner.evaluate(*batch)
        if not message.startswith("query inputs"):  # predict has no query labels to check
            with pytest.raises(ValueError, match=message):
                learner.predict(*batch[:3])
        if name == "Reptile":
            with pytest.raises(ValueError, match=message):
                learner.train_step(batch, torch.optim.SGD(learner.parameters(), lr=0.1))


def test_unknown_algorithm_and_engine_mode_are_named():
    with pytest.raises(ValueError, match=r"unknown algorithm 'mamla'; choose one of maml, fomaml"):
        make_learner("mamla", regressor(0), classification=False)
    with pytest.raises(ValueError, match="protonet is a classification method"):
        make_learner("protonet", regressor(0), classification=False)
    with pytest.raises(ValueError, match="siamese needs embedding_dim"):
        make_learner("siamese", regressor(0), classification=True)
    with pytest.raises(ValueError, match="mode='third_order' is not a mode; valid modes: second_order"):
        MAML(regressor(0), mode="third_order")


@pytest.mark.parametrize("name", ["maml", "fomaml", "imaml", "metasgd", "mamlpp", "anil", "reptile"])
def test_recipe_learners_have_their_settings(name):
    learner = make_learner(name, regressor(0), classification=False, inner_lr=0.2, inner_steps=2)
    config = learner.config()
    assert config["algorithm"] == type(learner).__name__ and config["inner_steps"] == 2
    expected_mode = {"fomaml": "first_order", "imaml": "implicit", "reptile": "first_order"}.get(name, "second_order")
    assert learner.loop.mode == expected_mode
    if name == "maml":
        assert make_learner(name, regressor(0), classification=False, mode="checkpointed").loop.mode == "checkpointed"


@pytest.mark.parametrize("batched", [True, False])
def test_reptile_leaves_frozen_parameters_alone(batched):
    """Reptile gave a frozen layer (requires_grad=False) a zero pseudo-gradient, so an outer AdamW's
    weight decay moved it (by 8e-2 here); MAML leaves its .grad None and torch.optim skips it."""
    torch.manual_seed(0)
    sx, qx = torch.randn(2, 4, 5, 1)
    sy, qy = torch.sin(sx), torch.sin(qx)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    model[0].requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    learner = Reptile(model, F.mse_loss, inner_lr=0.02, inner_steps=3, batched=batched)
    opt = torch.optim.AdamW(learner.parameters(), lr=1e-2, weight_decay=0.1)
    learner.train_step((sx, sy, qx, qy), opt)
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert torch.equal(model[0].weight, before[0]) and torch.equal(model[0].bias, before[1])
    assert not torch.equal(model[2].weight, before[2])  # the trainable layer moved


def test_mamlpp_refuses_a_mode_it_would_ignore_and_names_inner_steps():
    """MAMLPlusPlus(mode='first_order') had been accepted and ignored (the epoch picks the graph) while
    config() reported the mode; inner_steps=0 was blamed on per_layer_per_step."""
    model = nn.Linear(1, 1)
    for mode in ("first_order", "checkpointed", "second_order"):
        with pytest.raises(TypeError, match=f"MAMLPlusPlus takes no mode= \\(got '{mode}'\\).*first_order_epochs"):
            MAMLPlusPlus(model, mode=mode)
    with pytest.raises(ValueError, match="MAMLPlusPlus: inner_steps must be an integer >= 1.*got 0"):
        MAMLPlusPlus(model, inner_steps=0)


# =============================================================================================
# Sequence labelling: (N, L, C) logits, per-token loss_fn, targets −100 on padding
# =============================================================================================

def token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token cross-entropy over every labelled position (−100 ignored, F.cross_entropy's default)."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


@pytest.mark.parametrize("length", [3, 4])  # L == C (silently wrong before) and L != C (crashed before)
def test_sequence_labelling_evaluate_uses_loss_fn_and_scores_labelled_tokens_only(length):
    classes, d_in, tasks, n = 3, 2, 2, 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, 4), nn.Tanh(), nn.Linear(4, classes)).to(F64)  # (N, L, D) -> (N, L, C)
    learner = MAML(model, token_loss, inner_lr=0.3, inner_steps=1)
    g = torch.Generator().manual_seed(length)
    sx, qx = (torch.randn(tasks, n, length, d_in, generator=g, dtype=F64) for _ in range(2))
    sy, qy = (torch.randint(0, classes, (tasks, n, length), generator=g) for _ in range(2))
    sy[:, 0, -1] = -100  # padding in the support and the query
    qy[:, 0, :2] = -100
    qy[1, 2, 0] = -100
    names = [name for name, _ in model.named_parameters()]
    for steps in (0, 1):
        losses, accuracies = [], []
        for t in range(tasks):  # by hand: SGD on the support's token loss, then the query's tokens
            params = [p.detach().clone().requires_grad_() for p in model.parameters()]
            for _ in range(steps):
                loss = token_loss(functional_call(model, dict(zip(names, params)), (sx[t],)), sy[t])
                params = [(p - 0.3 * g_).detach().requires_grad_()
                          for p, g_ in zip(params, torch.autograd.grad(loss, params))]
            logits = functional_call(model, dict(zip(names, params)), (qx[t],)).detach()
            manual = sum(-torch.log_softmax(logits[i, j], -1)[qy[t, i, j]] for i in range(n) for j in range(length)
                         if qy[t, i, j] != -100) / int((qy[t] != -100).sum())
            hits = [bool(logits[i, j].argmax() == qy[t, i, j]) for i in range(n) for j in range(length)
                    if qy[t, i, j] != -100]
            losses.append(float(manual))
            accuracies.append(sum(hits) / len(hits))
        along = learner.evaluate_steps(sx, sy, qx, qy, steps=(steps,))
        assert along["loss"].shape == along["accuracy"].shape == (1, tasks)
        torch.testing.assert_close(along["loss"][0], torch.tensor(losses, dtype=F64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(along["accuracy"][0], torch.tensor(accuracies, dtype=F64), rtol=1e-12, atol=1e-12)
        if steps == 1:  # evaluate: after the learner's K = 1 inner step
            metrics = learner.evaluate(sx, sy, qx, qy)
            assert metrics["loss"].shape == metrics["accuracy"].shape == (tasks,)
            torch.testing.assert_close(metrics["loss"], torch.tensor(losses, dtype=F64), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(metrics["accuracy"], torch.tensor(accuracies, dtype=F64), rtol=1e-12,
                                       atol=1e-12)
    with pytest.raises(ValueError, match="every query label of a task is -100"):
        learner.evaluate(sx, sy, qx, torch.full_like(qy, -100))
