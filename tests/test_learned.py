"""Learned update rules (diffopt.optim.learned) against independent references.

Everything is float64. References, each written without the rule under test:

* central finite differences (fourth order) of the engine's meta-loss along a
  random direction of every learned tensor (and of θ);
* plain SGD (MAML) for Meta-SGD / per-layer-per-step with equal rates;
* a NumPy re-derivation of hypergradient descent (SGD-HD and Adam-HD, global
  and per-tensor α) on a quadratic;
* ``diffopt.optim.Adam`` for the untrained MLP rule (which is Adam by construction);
* running each task alone for the task-batched (vectorised) engine;
* the second-order mode for the checkpointed and forward modes.

Save/load, the drop-in optimizer and meta-training are in ``test_learned_io.py``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import diffopt.optim.learned as L
from diffopt.optim import SGD, Adam, NonFiniteError
from diffopt.unroll import InnerLoop

F64 = torch.float64
FD_TOL = 1e-6


# -- problems ------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net().to(F64)


def data(tasks: int = 2, seed: int = 1) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(tasks, 5, 2, generator=g, dtype=F64)
    sy = torch.randn(tasks, 5, 1, generator=g, dtype=F64)
    qx = torch.randn(tasks, 6, 2, generator=g, dtype=F64)
    qy = torch.randn(tasks, 6, 1, generator=g, dtype=F64)
    return sx, sy, qx, qy


def randomize(tensors: Sequence[Tensor], seed: int, scale: float = 0.3) -> None:
    """Move learned tensors away from their (often degenerate) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.add_(scale * torch.randn(t.shape, generator=g, dtype=t.dtype))


def build_rule(name: str, params: list[Tensor]) -> L.LearnedOptimizer | SGD:
    g = torch.Generator().manual_seed(7)
    if name == "meta_sgd":
        return L.meta_sgd(params, (0.05, 0.2), generator=g)
    if name == "per_layer_per_step":
        opt = L.per_layer_per_step(params, 3, 0.1)
        randomize(opt.lrs, 3, 0.02)
        return opt
    if name == "meta_curvature":
        opt = L.MetaCurvature(params, 0.1)
        randomize([f for fs in opt.factors for f in fs], 4, 0.2)
        return opt
    if name == "meta_curvature_diagonal":
        opt = L.MetaCurvature(params, 0.1, bias="diagonal")
        randomize([f for fs in opt.factors for f in fs], 4, 0.2)
        return opt
    if name == "lstm":
        opt = L.LSTMOptimizer(params, hidden_size=3, layers=2, generator=g)
        randomize(opt.net.parameters(), 5, 0.2)
        return opt
    if name == "mlp":
        opt = L.MLPOptimizer(params, hidden=(4,), lr=0.05, generator=g)
        randomize(opt.net.parameters(), 6, 0.2)
        return opt
    if name in ("hypergradient_sgd", "hypergradient_sgd_tensor"):
        scope = "tensor" if name.endswith("tensor") else "global"
        return L.make_rule("hypergradient_sgd", params, lr=0.1, hyper_lr=0.05, scope=scope)
    if name == "hypergradient_adam":
        return L.make_rule("hypergradient_adam", params, lr=0.05, hyper_lr=0.01)
    raise KeyError(name)


RULES = ["meta_sgd", "per_layer_per_step", "meta_curvature", "meta_curvature_diagonal", "lstm", "mlp",
         "hypergradient_sgd", "hypergradient_sgd_tensor", "hypergradient_adam"]


def learned(opt) -> list[Tensor]:
    return opt.hyperparameter_tensors()


def meta_loss(model: nn.Module, opt, steps: int = 3, mode: str = "second_order", tasks: int = 2,
              vectorize: bool = True, **kw) -> Tensor:
    loop = InnerLoop(model, opt, steps=steps, mode=mode, vectorize=vectorize, **kw)
    return loop.meta_loss(*data(tasks))


def fd4(f: Callable[[float], float], h: float) -> float:
    return (-f(2 * h) + 8 * f(h) - 8 * f(-h) + f(-2 * h)) / (12 * h)


def finite_difference(f: Callable[[float], float], steps: Sequence[float] = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6),
                      agree: float = 1e-9) -> float:
    """``f'(0)`` by fourth-order differences at shrinking steps, until two consecutive estimates
    agree to ``agree`` (relative); the later estimate of the closest pair. The LSTM's ``log|g|``
    input and the moment normalisations curve on the scale of the smallest |g|, so no single
    step fits every problem (the analytic value is never consulted)."""
    estimates = [fd4(f, steps[0])]
    best, best_gap = estimates[0], math.inf
    for h in steps[1:]:
        estimates.append(fd4(f, h))
        gap = abs(estimates[-1] - estimates[-2])
        if gap < best_gap:
            best, best_gap = estimates[-1], gap
        if gap <= agree * max(abs(estimates[-1]), 1e-12):
            break
    return best


def directional_fd(model: nn.Module, opt, wrt: list[Tensor], direction: list[Tensor]) -> float:
    originals = [w.detach().clone() for w in wrt]

    def f(eps: float) -> float:
        with torch.no_grad():
            for w, w0, d in zip(wrt, originals, direction):
                w.copy_(w0 + eps * d)
        try:
            with torch.no_grad():
                return float(meta_loss(model, opt))
        finally:
            with torch.no_grad():
                for w, w0 in zip(wrt, originals):
                    w.copy_(w0)

    return finite_difference(f)


# -- meta-gradients against finite differences --------------------------------------------
@pytest.mark.parametrize("name", RULES)
def test_meta_gradient_matches_finite_differences(name):
    model = make_net()
    opt = build_rule(name, list(model.parameters()))
    wrt = learned(opt) + list(model.parameters())
    assert learned(opt), "the rule reports its learned tensors"
    g = torch.Generator().manual_seed(11)
    for which in (learned(opt), wrt):  # the rule's tensors alone, then with θ
        direction = [torch.randn(w.shape, generator=g, dtype=F64) for w in which]
        grads = torch.autograd.grad(meta_loss(model, opt), which, allow_unused=True)
        analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, direction) if gr is not None)
        numeric = directional_fd(model, opt, which, direction)
        error = abs(analytic - numeric) / max(abs(numeric), 1e-8)
        assert error <= FD_TOL, f"{name}: analytic {analytic!r} vs finite differences {numeric!r} (rel {error:.2e})"


@pytest.mark.parametrize("name", ["lstm", "mlp", "meta_curvature", "hypergradient_adam", "per_layer_per_step"])
def test_checkpointed_and_forward_modes_equal_second_order(name):
    model = make_net()
    params = list(model.parameters())
    opt = build_rule(name, params)
    if name == "lstm":  # forward mode has one tangent per learned scalar: keep it small
        opt = L.LSTMOptimizer(params, hidden_size=2, layers=1, generator=torch.Generator().manual_seed(1))
        randomize(opt.net.parameters(), 2, 0.2)
    wrt = learned(opt)
    reference = torch.autograd.grad(meta_loss(model, opt), wrt)
    for mode, kw in (("checkpointed", {"segment": 2}), ("forward", {})):
        grads = torch.autograd.grad(meta_loss(model, opt, mode=mode, **kw), wrt)
        for a, b in zip(grads, reference):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{name} {mode}")


def pes_target(model: nn.Module, opt, ends: Sequence[int] = (2, 3)) -> Tensor:
    """What PES over 3 steps with truncations of 2 estimates the gradient of: the mean of the
    query losses at the truncation ends (steps 2 and 3), by second order."""
    return torch.stack([meta_loss(model, opt, steps=end) for end in ends]).mean()


@pytest.mark.parametrize("name", ["lstm", "mlp", "meta_curvature", "hypergradient_sgd"])
def test_pes_mode_perturbs_the_learned_tensors_and_restores_them_exactly(name):
    model = make_net()
    opt = build_rule(name, list(model.parameters()))
    wrt = learned(opt)
    everything = wrt + list(model.parameters())
    before = [t.detach().clone() for t in everything]
    loss = meta_loss(model, opt, mode="pes", es_samples=2, pes_truncation=2, es_wrt=wrt,
                     generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(loss, wrt)
    # the perturbations were undone: every learned tensor and every weight, bit for bit
    for k, (t, saved) in enumerate(zip(everything, before)):
        assert torch.equal(t.detach(), saved), f"{name}: tensor {k} moved by {float((t - saved).abs().max()):.3e}"
    # the value is the unperturbed mean of the truncation-end losses (not a perturbed particle's)
    assert abs(float(loss.detach()) - float(pes_target(model, opt).detach())) <= 1e-12
    # the estimate points along the true gradient (a sign check: its mean over 2 samples is
    # noisy; unbiasedness is tested below)
    truth = torch.autograd.grad(pes_target(model, opt), wrt)
    assert sum(float((g * t).sum()) for g, t in zip(grads, truth)) > 0


@pytest.mark.parametrize("name", ["meta_curvature", "hypergradient_sgd"])
def test_pes_estimate_for_a_learned_rule_is_unbiased(name):
    """PES's mean estimate, projected on the true gradient g of ``pes_target`` (second order),
    equals ‖g‖ within 4 standard errors. 8 calls of 32 antithetic samples each; the standard
    error comes from the spread of the 8 means. For a locally linear loss the projection of one
    sample has standard deviation √2‖g‖, so a mean of 256 has 0.09‖g‖: an estimate at half its
    size (a perturbation left in the weights) is ~5.5 standard errors off. Smoothing bias is
    O(σ²) = O(1e-4), far below that."""
    model = make_net()
    opt = build_rule(name, list(model.parameters()))
    wrt = learned(opt)
    truth = torch.cat([g.reshape(-1) for g in torch.autograd.grad(pes_target(model, opt), wrt)])
    direction = truth / truth.norm()
    generator = torch.Generator().manual_seed(3)
    means = []
    for _ in range(8):
        loss = meta_loss(model, opt, mode="pes", es_samples=32, pes_truncation=2, es_wrt=wrt, generator=generator)
        means.append(float(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, wrt)]) @ direction))
    means_t = torch.tensor(means, dtype=F64)
    standard_error = float(means_t.std(unbiased=True)) / math.sqrt(len(means))
    z = abs(float(means_t.mean()) - float(truth.norm())) / standard_error

    assert z <= 4, f"{name}: projection {float(means_t.mean()):.4f} vs ‖g‖ {float(truth.norm()):.4f} (SE {standard_error:.4f})"
    assert standard_error <= 0.15 * float(truth.norm())  # informative


# -- equivalences --------------------------------------------------------------------------
@pytest.mark.parametrize("builder", ["meta_sgd", "per_layer_per_step"])
def test_equal_learning_rates_reproduce_maml_exactly(builder):
    model = make_net()
    params = list(model.parameters())
    if builder == "meta_sgd":
        opt = L.meta_sgd(params, 0.07)
    else:
        opt = L.per_layer_per_step(params, 2, 0.07)
    maml = SGD(params, lr=0.07)
    ours = meta_loss(model, opt, steps=4)
    reference = meta_loss(model, maml, steps=4)
    assert torch.equal(ours, reference)
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(reference, params)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    assert len(learned(opt)) == len(params)


def test_meta_sgd_rates_are_per_element_and_uniform_in_range():
    model = make_net()
    opt = L.meta_sgd(model.parameters(), (0.005, 0.1), generator=torch.Generator().manual_seed(0))
    for p, lr in zip(model.parameters(), opt.lrs):
        assert lr.shape == p.shape and lr.requires_grad
        assert 0.005 <= float(lr.detach().min()) and float(lr.detach().max()) <= 0.1


def test_per_layer_per_step_uses_step_rates_and_holds_the_last():
    w = torch.zeros(3, dtype=F64, requires_grad=True)
    opt = L.per_layer_per_step([w], 2, 0.0)
    with torch.no_grad():
        opt.lrs[0].copy_(torch.tensor([0.1, 0.2], dtype=F64))
    grads = [torch.ones(3, dtype=F64)]
    params, states = [w], [None]
    for step, expected in enumerate([-0.1, -0.3, -0.5]):
        params, states = opt.update(params, grads, states, step)
        assert float(params[0][0].detach()) == pytest.approx(expected)
    strict = L.per_layer_per_step([w], 2, 0.1, hold_last=False)
    with pytest.raises(IndexError, match="Schedule has 2 entries"):
        strict.update([w], grads, [None], 2)


def test_untrained_mlp_rule_is_adam():
    model = make_net()
    params = list(model.parameters())
    rule = L.MLPOptimizer(params, hidden=(8,), lr=0.01, generator=torch.Generator().manual_seed(0))
    adam = Adam(params, lr=0.01)
    ours, reference = meta_loss(model, rule, steps=5), meta_loss(model, adam, steps=5)
    torch.testing.assert_close(ours, reference, rtol=1e-13, atol=0)
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(reference, params)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_lstm_gradient_preprocessing_formula():
    g = torch.tensor([1.0, -2.0, 1e-6, -1e-6, 0.0, math.exp(-10)], dtype=F64)
    x = L.preprocess_gradient(g, 10.0)
    expected = torch.tensor([
        [0.0, 1.0], [math.log(2) / 10, -1.0], [-1.0, math.exp(10) * 1e-6], [-1.0, -math.exp(10) * 1e-6],
        [-1.0, 0.0], [-1.0, 1.0],
    ], dtype=F64)
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)


def test_meta_curvature_on_a_conv_weight_uses_the_out_by_rest_view():
    w = torch.randn(4, 2, 3, 3, dtype=F64, requires_grad=True)
    opt = L.MetaCurvature([w], lr=0.5)
    randomize(opt.factors[0], 0, 0.3)
    b_out, b_in = opt.factors[0]
    assert b_out.shape == (4, 4) and b_in.shape == (18, 18)
    grad = torch.randn_like(w)
    (new,), _ = opt.update([w], [grad], [None], 0)
    m_out = torch.linalg.matrix_exp(0.5 * (b_out + b_out.T))
    m_in = torch.linalg.matrix_exp(0.5 * (b_in + b_in.T))
    expected = w - 0.5 * (m_out @ grad.reshape(4, 18) @ m_in).reshape(w.shape)
    torch.testing.assert_close(new, expected, rtol=1e-12, atol=1e-12)
    # SPD: the preconditioned step is a descent direction
    assert float((grad.reshape(4, 18) * (m_out @ grad.reshape(4, 18) @ m_in)).sum().detach()) > 0


def test_meta_curvature_starts_as_sgd():
    model = make_net()
    params = list(model.parameters())
    ours = meta_loss(model, L.MetaCurvature(params, 0.1), steps=3)
    torch.testing.assert_close(ours, meta_loss(model, SGD(params, lr=0.1), steps=3), rtol=1e-13, atol=0)


# -- hypergradient descent: closed form on a quadratic -------------------------------------
def _quadratic(seed: int = 0):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(5, 5))
    a = m @ m.T / 5 + np.eye(5)
    b = rng.normal(size=5)
    return a, b


def _numpy_hd(a, b, theta, lr, beta, steps, adam, scope, split=(3,)):
    """Baydin et al.'s recursions written out in NumPy; parameters are θ[:3] and θ[3:]."""
    theta = theta.copy()
    parts = np.split(np.arange(len(theta)), split)
    alphas = [lr] * len(parts)
    prev = None
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    history = []
    for t in range(1, steps + 1):
        g = a @ theta - b
        if prev is not None:
            dots = [g[idx] @ prev[idx] for idx in parts]
            if scope == "global":
                alphas = [al + beta * sum(dots) for al in alphas]
            else:
                alphas = [al + beta * d for al, d in zip(alphas, dots)]
        if adam:
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            u = (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        else:
            u = g
        for idx, al in zip(parts, alphas):
            theta[idx] = theta[idx] - al * u[idx]
        prev = u
        history.append((theta.copy(), list(alphas)))
    return history


@pytest.mark.parametrize("adam", [False, True], ids=["sgd_hd", "adam_hd"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_hypergradient_learning_rate_matches_closed_form(adam, scope):
    a, b = _quadratic()
    theta0 = np.random.default_rng(1).normal(size=5)
    lr, beta = (0.05, 0.002) if adam else (0.1, 0.01)
    reference = _numpy_hd(a, b, theta0, lr, beta, 8, adam, scope)
    A, B = torch.tensor(a), torch.tensor(b)
    p1 = torch.tensor(theta0[:3], requires_grad=True)
    p2 = torch.tensor(theta0[3:], requires_grad=True)
    cls = L.HypergradientAdam if adam else L.HypergradientSGD
    opt = cls([p1, p2], lr=lr, hyper_lr=beta, scope=scope)
    for theta_ref, alphas_ref in reference:
        theta = torch.cat(opt.params)
        loss = 0.5 * theta @ A @ theta - B @ theta
        opt.step(loss)
        torch.testing.assert_close(torch.cat(opt.params).detach(), torch.tensor(theta_ref), rtol=1e-12, atol=1e-12)
        for state, alpha in zip(opt.state, alphas_ref):
            assert float(state["lr"].detach()) == pytest.approx(alpha, rel=1e-12, abs=1e-14)
    assert float(opt.state[0]["lr"].detach()) != lr  # it adapted


def test_hypergradient_sgd_first_update_closed_form():
    """α₁ = α₀ + β g₁·g₀ exactly, on f(θ) = ½‖θ‖²: g₀ = θ₀, θ₁ = (1−α₀)θ₀, g₁ = θ₁."""
    theta0 = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    p = theta0.clone().requires_grad_()
    opt = L.HypergradientSGD([p], lr=0.1, hyper_lr=0.01)
    params = opt.step(0.5 * (p * p).sum())
    params = opt.step(0.5 * (params[0] * params[0]).sum())
    alpha1 = 0.1 + 0.01 * float(((1 - 0.1) * theta0) @ theta0)
    assert float(opt.state[0]["lr"].detach()) == pytest.approx(alpha1, rel=1e-14)
    torch.testing.assert_close(params[0].detach(), (1 - 0.1) * theta0 * (1 - alpha1), rtol=1e-14, atol=0)


# -- task-batched (vectorised) equals per task ---------------------------------------------
@pytest.mark.parametrize("name", ["lstm", "mlp", "meta_curvature", "hypergradient_sgd", "hypergradient_adam",
                                  "meta_sgd"])
def test_vectorised_over_tasks_equals_each_task_alone(name):
    model = make_net()
    opt = build_rule(name, list(model.parameters()))
    sx, sy, qx, qy = data(3)
    loop = InnerLoop(model, opt, steps=3, vectorize=True)
    batched = loop.adapt(sx, sy).params
    for t in range(3):
        single = InnerLoop(model, opt, steps=3, vectorize=False).adapt(sx[t:t + 1], sy[t:t + 1]).params
        for a, b in zip(batched, single):
            torch.testing.assert_close(a[t], b[0], rtol=1e-12, atol=1e-13)
    # and the meta-gradient of the mean equals the mean of the per-task meta-gradients
    wrt = learned(opt)
    total = torch.autograd.grad(loop.meta_loss(sx, sy, qx, qy), wrt)
    parts = [torch.autograd.grad(InnerLoop(model, opt, steps=3, vectorize=False).meta_loss(
        sx[t:t + 1], sy[t:t + 1], qx[t:t + 1], qy[t:t + 1]), wrt) for t in range(3)]
    for k, g in enumerate(total):
        torch.testing.assert_close(g, sum(p[k] for p in parts) / 3, rtol=1e-10, atol=1e-13)


# -- bad input -----------------------------------------------------------------------------
def test_meta_curvature_refuses_a_factor_too_large():
    w = torch.zeros(2, 64, 8, 8, requires_grad=True)
    with pytest.raises(ValueError, match=r"viewed as \(2, 4096\).*max_factor=1000"):
        L.MetaCurvature([w], max_factor=1000)


def test_meta_curvature_refuses_factors_of_other_shapes():
    from diffopt.optim import PerParameter

    w = torch.zeros(3, 4, requires_grad=True)
    factors = PerParameter([(torch.zeros(3, 3), torch.zeros(5, 5))])
    with pytest.raises(ValueError, match=r"expected \(M_out 3×3, M_in 4×4"):
        L.MetaCurvature([w], curvature=factors)


@pytest.mark.parametrize("cls", [L.LSTMOptimizer, L.MLPOptimizer])
def test_non_finite_gradients_raise_or_are_skipped(cls):
    w = torch.ones(4, dtype=torch.float32, requires_grad=True)
    grad = torch.tensor([1.0, float("inf"), float("nan"), -0.5])
    opt = cls([w], generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteError, match="non-finite input features.*nonfinite='skip'"):
        opt.update([w], [grad], [None], 0)
    opt = cls([w], nonfinite="skip", generator=torch.Generator().manual_seed(0))
    (new,), (state,) = opt.update([w.detach()], [grad], [None], 0)
    assert torch.isfinite(new).all()
    assert torch.equal(new[1:3], w.detach()[1:3])      # skipped coordinates unchanged
    assert not torch.equal(new[[0, 3]], w.detach()[[0, 3]])
    fresh = opt.rule.init_state(w, opt.tensor_hyperparameters(opt.param_groups[0], 0, 0, w, 0))
    for key, value in state.items():
        if isinstance(value, Tensor):
            assert torch.equal(value[1:3], fresh[key][1:3]), key   # and so is their state
            assert torch.isfinite(value).all()


def test_mlp_overflowing_second_moment_is_caught():
    w = torch.ones(3, dtype=torch.float32, requires_grad=True)
    grad = torch.tensor([1e30, 1.0, -1.0])  # finite, but g² overflows float32
    opt = L.MLPOptimizer([w])
    with pytest.raises(NonFiniteError):
        opt.update([w], [grad], [None], 0)
    opt = L.MLPOptimizer([w], nonfinite="skip")
    (new,), (state,) = opt.update([w.detach()], [grad], [None], 0)
    assert float(new[0].detach()) == 1.0 and torch.isfinite(state["exp_avg_sq"]).all()


def test_engine_reports_non_finite_inner_loss_for_learned_rules():
    model = make_net()
    opt = L.LSTMOptimizer(model.parameters(), generator=torch.Generator().manual_seed(0))
    sx, sy, qx, qy = data(2)
    sy = sy.clone()
    sy[1, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"task\(s\) \[1\]"):
        InnerLoop(model, opt, steps=2).meta_loss(sx, sy, qx, qy)


def test_mlp_rejects_unknown_features_and_mismatched_net():
    with pytest.raises(ValueError, match="unknown: \\['rms'\\]"):
        L.MLPRuleNet(["grad", "rms"])
    net = L.MLPRuleNet(["grad", "param"])
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="built for features \\['grad', 'param'\\]"):
        L.MLPOptimizer([w], net, features=("grad", "step_10"))
    with pytest.raises(ValueError, match="takes 2 input features but features lists 3"):
        L.MLPRule().validate_group({**L.MLPRule.defaults, "weights": net.weights(),
                                    "features": ("grad", "param", "step_10")}, "group")


def test_learned_rules_refuse_fewer_dimensions_than_at_construction():
    w = torch.zeros(2, 3, requires_grad=True)
    opt = L.MetaCurvature([w])
    with pytest.raises(ValueError, match="fewer dimensions than at construction"):
        opt.update([torch.zeros(3)], [torch.zeros(3)], [None], 0)


def test_meta_curvature_on_scalars_and_diagonal_biases():
    scalar = torch.tensor(2.0, dtype=F64, requires_grad=True)
    bias = torch.ones(3, dtype=F64, requires_grad=True)
    opt = L.MetaCurvature([scalar, bias], lr=0.5, bias="diagonal")
    assert [tuple(f.shape) for fs in opt.factors for f in fs] == [(1,), (3,)]
    with torch.no_grad():
        opt.factors[0][0].fill_(math.log(2.0))
        opt.factors[1][0].copy_(torch.tensor([0.0, math.log(3.0), -math.log(2.0)], dtype=F64))
    grads = [torch.tensor(1.0, dtype=F64), torch.ones(3, dtype=F64)]
    (s, b), _ = opt.update([scalar, bias], grads, [None, None], 0)
    assert float(s.detach()) == pytest.approx(2.0 - 0.5 * 2.0)
    torch.testing.assert_close(b.detach(), torch.tensor([0.5, -0.5, 0.75], dtype=F64))


@pytest.mark.parametrize("name", RULES)
def test_every_learned_tensor_is_reported_to_the_engine(name):
    model = make_net()
    opt = build_rule(name, list(model.parameters()))
    reported = {id(t) for t in opt.hyperparameter_tensors()}
    live = L.serialization.live_tensors(opt)
    assert {id(t) for t in live.values()} == reported
    loop = InnerLoop(model, opt, steps=1)
    assert reported <= {id(t) for t in loop.meta_tensors()}


def _flat_hypergradient_reference(kind: str, params: list[Tensor], grads_per_step: list[list[Tensor | None]],
                                  lr: float, hyper_lr: float, betas=(0.9, 0.999), eps=1e-8) -> list[Tensor]:
    """Baydin et al.'s reference SGD-HD / Adam-HD: the group as one flat vector (a missing gradient is
    zeros), one α, h_t = ∇f_t · u_{t−1}."""
    sizes = [p.numel() for p in params]
    theta = torch.cat([p.flatten() for p in params]).clone()
    alpha, u_prev = lr, None
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    for t, grads in enumerate(grads_per_step, start=1):
        g = torch.cat([torch.zeros(n, dtype=theta.dtype) if x is None else x.flatten() for n, x in zip(sizes, grads)])
        if u_prev is not None:
            alpha = alpha + hyper_lr * float(g @ u_prev)
        if kind == "sgd":
            u = g
        else:
            m = betas[0] * m + (1 - betas[0]) * g
            v = betas[1] * v + (1 - betas[1]) * g * g
            u = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        theta = theta - alpha * u
        u_prev = u
    return list(theta.split(sizes))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("seed", range(4))
def test_global_hypergradient_descent_with_missing_gradients_follows_the_flat_reference(kind, seed):
    """One α for the group: a tensor without a gradient at some step counts with a zero gradient (the
    paper's reference flattens the group), so its α and direction do not go stale."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    steps = [[None if torch.rand((), generator=g) < 0.3 else torch.randn(p.shape, generator=g, dtype=torch.float64)
              for p in params] for _ in range(6)]
    cls, options = (L.HypergradientSGD, {"lr": 0.1, "hyper_lr": 0.01}) if kind == "sgd" else (
        L.HypergradientAdam, {"lr": 0.01, "hyper_lr": 1e-3})
    opt = cls([p.clone() for p in params], scope="global", **options)
    current, states = [p.clone() for p in params], opt.initial_states(params)
    for k, grads in enumerate(steps):
        current, states = opt.update(current, grads, states, k)
    expected = _flat_hypergradient_reference(kind, params, steps, options["lr"], options["hyper_lr"])
    for ours, theirs in zip(current, expected):
        torch.testing.assert_close(ours.flatten(), theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [L.HypergradientSGD, L.HypergradientAdam])
def test_hypergradient_rules_keep_each_parameters_dtype(cls):
    """A float64 lr tensor, or a global α over float32 and float64 tensors, had promoted a float32
    parameter to float64 (and Adam-HD's lerp then failed)."""
    w32, w64 = torch.ones(3), torch.ones(2, dtype=torch.float64)
    for lr in (0.01, torch.tensor(0.01, dtype=torch.float64)):
        opt = cls([w32.clone(), w64.clone()], lr=lr, scope="global")
        current, states = [w32.clone(), w64.clone()], opt.initial_states([w32, w64])
        for k in range(3):
            current, states = opt.update(current, [torch.full_like(w32, 0.5), torch.full_like(w64, 0.5)], states, k)
        assert [p.dtype for p in current] == [torch.float32, torch.float64]


@pytest.mark.parametrize("make", [lambda p: L.LSTMOptimizer(p, hidden_size=2), lambda p: L.MLPOptimizer(p, hidden=(2,))],
                         ids=["lstm", "mlp"])
def test_network_rules_run_under_a_users_vmap(make):
    """Their non-finite guard branched on the values (data-dependent control flow under vmap)."""
    tasks = torch.randn(4, 3, dtype=torch.float64)
    opt = make([torch.zeros(3, dtype=torch.float64)])

    def step(p: Tensor) -> Tensor:
        return opt.update([p], [torch.sin(p)], [None], 0)[0][0]

    assert torch.equal(torch.func.vmap(step)(tasks), torch.stack([step(p) for p in tasks]))


def test_rules_take_empty_parameters_as_torch_optim_does():
    empty_matrix, empty_vector, w = torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    for opt, params in ((L.MetaCurvature([empty_matrix, w], lr=0.1), [empty_matrix, w]),
                        (L.meta_sgd([empty_vector, w], init=0.1), [empty_vector, w])):
        new, _ = opt.update(params, [torch.ones_like(p) for p in params], opt.initial_states(params), 0)
        assert new[0].shape == params[0].shape and torch.allclose(new[1], torch.full_like(w, 0.9))


def test_hypergradient_dropin_with_a_missing_gradient_equals_the_functional_rule():
    """The drop-in had skipped a tensor without a gradient, dropping the state the global-scope rule computed
    for it (a zero gradient): its α went stale and split from the others', and the other tensor moved
    differently (-1.30 against -1.15)."""
    grads_a = [torch.tensor([1.0, 2.0], dtype=F64), None, torch.tensor([3.0, -1.0], dtype=F64),
               torch.tensor([0.5, 0.5], dtype=F64), torch.tensor([1.0, 1.0], dtype=F64)]
    grad_b = torch.tensor([1.0], dtype=F64)
    functional = L.HypergradientSGD([torch.zeros(2, dtype=F64), torch.zeros(1, dtype=F64)], lr=0.1, hyper_lr=0.05)
    for g in grads_a:
        functional.step(grads=[g, grad_b])
    a, b = torch.zeros(2, dtype=F64, requires_grad=True), torch.zeros(1, dtype=F64, requires_grad=True)
    dropin = L.DropInOptimizer(L.HypergradientSGD([a, b], lr=0.1, hyper_lr=0.05))
    for g in grads_a:
        a.grad, b.grad = g, grad_b
        dropin.step()
    assert torch.equal(a.detach(), functional.params[0]) and torch.equal(b.detach(), functional.params[1])
    assert [float(dropin.state[p]["lr"]) for p in (a, b)] == [float(s["lr"]) for s in functional.state]


def test_global_hypergradient_descent_keeps_one_rate_per_group():
    """∂f/∂α_g = −∇_g f · u_g: the dot product had summed over every group, so one group's rate moved by
    another's gradients (α = [10.2, 10.11] instead of [0.2, 10.01])."""
    a, b = torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64)
    opt = L.HypergradientSGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}], hyper_lr=0.1)
    for _ in range(2):
        opt.step(grads=[torch.tensor([1.0], dtype=F64), torch.tensor([10.0], dtype=F64)])
    assert [float(s["lr"]) for s in opt.state] == pytest.approx([0.1 + 0.1 * 1 * 1, 0.01 + 0.1 * 10 * 10], abs=1e-15)


def test_saving_keeps_every_setting_or_refuses(tmp_path):
    """A saved rule keeps one value per option: groups that differ were saved with group 0's (a second
    group's lr lost); a 0-dim tensor momentum of meta_sgd was dropped; LSTM's output_scale took NaN."""
    w = [torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64)]
    two = L.HypergradientSGD([{"params": [w[0]], "lr": 0.1}, {"params": [w[1]], "lr": 0.5}])
    with pytest.raises(L.LearnedRuleError, match=r"group 1 sets lr=0.5, group 0 0.1.*one rule per group"):
        L.save(two, tmp_path / "two.pt")
    opt = L.meta_sgd([torch.ones(2, dtype=F64)], 0.1, momentum=torch.tensor(0.9, dtype=F64))
    L.save(opt, tmp_path / "sgd.pt")
    loaded = L.load_differentiable(tmp_path / "sgd.pt", [torch.ones(2, dtype=F64)])
    def two_steps(rule) -> list[Tensor]:
        current = list(rule.params)
        for _ in range(2):
            current = rule.step(grads=[torch.ones(2, dtype=F64)], params=current)
        return current

    assert torch.equal(two_steps(opt)[0], two_steps(loaded)[0])  # (0.71 each; the momentum had been lost: 0.8)
    with pytest.raises(ValueError, match="output_scale contains NaN"):
        L.LSTMOptimizer([torch.zeros(2, dtype=F64)], output_scale=float("nan"))


def test_rules_built_for_real_tensors_refuse_complex_parameters():
    """Four rules had crashed inside their maths on a complex parameter ('size of tensor a (3) must match',
    'mat1 and mat2 shapes cannot be multiplied'); they refuse it where it is given, naming the fix."""
    z = torch.zeros(3, dtype=torch.complex128)
    for build in (lambda: L.HypergradientSGD([z]), lambda: L.HypergradientAdam([z]), lambda: L.MetaCurvature([z]),
                  lambda: L.LSTMOptimizer([z])):
        with pytest.raises(TypeError, match=r"params\[0\] is complex .*view_as_real"):
            build()
    assert L.meta_sgd([z.clone()], 0.1).params[0].dtype == torch.complex128  # elementwise rules take them
