"""diffopt.optim.Adafactor and diffopt.optim.Muon against torch.optim's (torch 2.13).

* parity: hypothesis-drawn configurations and problems, float32 and float64, both
  of torch's paths (Adafactor's ``foreach``): bit-identical trajectories and states;
* tensor hyperparameters, state_dict / load_state_dict and ``from_torch`` mid-training;
* meta-gradients against central finite differences (<= 1e-6 relative), through the
  factored second moments, the relative step and Muon's Newton–Schulz iteration;
* finite meta-gradients at exactly zero gradients; gradcheck / gradgradcheck of the pieces;
* leading task dimensions and the errors.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffopt
from diffopt.optim import Adafactor, Muon, from_torch, newton_schulz
from diffopt.optim._reductions import mean_square, safe_norm
from strategies import (
    F64, Problem, central_differences, examples, optimizer_configs, problems, random_like, record, state_error,
    torch_run, torch_states, trajectory_error, twin_run,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def as_dtype(problem: Problem, dtype: torch.dtype) -> Problem:
    params = [p.detach().to(dtype).requires_grad_(p.requires_grad) for p in problem.params]
    return Problem(params, problem.loss, problem.names, problem.groups, problem.unused, problem.frozen)


@st.composite
def matrix_problems(draw: st.DrawFn, unused: bool | None = None) -> Problem:
    """A bias-free tanh network (tall and wide matrices) for Muon, optionally with a matrix the loss ignores."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    n_in, hidden, n_out = draw(st.integers(2, 5)), draw(st.integers(2, 6)), draw(st.integers(1, 3))
    x, y = torch.randn(10, n_in, generator=g, dtype=F64), torch.randn(10, n_out, generator=g, dtype=F64)
    params = [torch.randn(hidden, n_in, generator=g, dtype=F64) * 0.7,
              torch.randn(n_out, hidden, generator=g, dtype=F64)]
    names = ["w1", "w2"]
    unused = draw(st.booleans()) if unused is None else unused
    if unused:
        params.append(torch.randn(3, 2, generator=g, dtype=F64))
        names.append("unused")
    for p in params:
        p.requires_grad_(True)

    def loss(ps):
        return ((torch.tanh(x.to(ps[0].dtype) @ ps[0].T) @ ps[1].T - y.to(ps[0].dtype)) ** 2).mean()

    groups = [list(range(len(params)))]
    if draw(st.booleans()) and len(params) > 1:
        groups = [[0], list(range(1, len(params)))]
    return Problem(params, loss, names, groups, unused=[2] if unused else [])


# -- parity ------------------------------------------------------------------------------------

def assert_bit_identical(name: str, problem: Problem, configs: list[dict], steps: int, foreach=None) -> None:
    reference, torch_opt, torch_params = torch_run(name, problem, configs, steps)
    ours, twin, _ = twin_run(name, problem, configs, steps, **({} if foreach is None else {"foreach": foreach}))
    error = record("parity", name, trajectory_error(ours, reference))
    error_state = state_error(twin.state, torch_states(torch_opt, torch_params))
    assert error == 0.0, f"{name} {configs}: trajectory differs from torch.optim by {error:.3e}"
    assert error_state == 0.0, f"{name} {configs}: state differs from torch.optim's by {error_state:.3e}"
    for i in problem.unused + problem.frozen:
        assert torch.equal(ours[-1][i], problem.params[i].detach().to(ours[-1][i].dtype))
        assert twin.state[i] is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=examples(6))
@given(data=st.data())
def test_adafactor_trajectories_are_bit_identical(dtype, data):
    """Embeddings, matrices, biases, tied/frozen/unused parameters, zero-gradient rows; both torch paths."""
    problem = as_dtype(data.draw(problems(), label="problem"), dtype)
    configs = [data.draw(optimizer_configs("Adafactor"), label=f"group {k}") for k in range(len(problem.groups))]
    foreach = data.draw(st.booleans(), label="foreach")
    for config in configs:
        config["foreach"] = foreach  # torch's Adafactor takes this path; the twin follows the same flag
    assert_bit_identical("Adafactor", problem, configs, data.draw(st.integers(15, 25), label="steps"))


def test_adafactor_paths_differ_as_torch_paths_do():
    """The two torch paths round the last operation differently; each twin path follows its own."""
    problem = as_dtype(Problem(*_mlp()), torch.float32)
    single, _, _ = torch_run("Adafactor", problem, [{"lr": 0.05}], 20)
    multi, _, _ = torch_run("Adafactor", problem, [{"lr": 0.05, "foreach": True}], 20)
    ours_single, _, _ = twin_run("Adafactor", problem, [{"lr": 0.05}], 20)
    ours_multi, _, _ = twin_run("Adafactor", problem, [{"lr": 0.05}], 20, foreach=True)
    assert trajectory_error(single, multi) > 0  # (the test would be vacuous otherwise)
    assert trajectory_error(ours_single, single) == 0.0 and trajectory_error(ours_multi, multi) == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=examples(6))
@given(data=st.data())
def test_muon_trajectories_are_bit_identical(dtype, data):
    """Tall and wide matrices, an unused matrix, two groups; torch's bfloat16 Newton–Schulz."""
    problem = as_dtype(data.draw(matrix_problems(), label="problem"), dtype)
    configs = [data.draw(optimizer_configs("Muon"), label=f"group {k}") for k in range(len(problem.groups))]
    assert_bit_identical("Muon", problem, configs, data.draw(st.integers(10, 20), label="steps"))


@pytest.mark.parametrize("name", ["Adafactor", "Muon"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tensor_learning_rate_is_bit_identical(name, dtype):
    """A float64 tensor lr (requiring grad) on parameters of either dtype: torch's trajectory, the
    parameters' dtype kept."""
    problem = as_dtype(Problem(*_mlp(matrices_only=name == "Muon")), dtype)
    config = {"lr": 0.03, "weight_decay": 0.1}
    reference, _, _ = torch_run(name, problem, [config], 15)
    lr = torch.tensor(0.03, dtype=F64, requires_grad=True)
    ours, _, _ = twin_run(name, problem, [{**config, "lr": lr}], 15)
    assert all(p.dtype == dtype for p in ours[-1])
    assert trajectory_error(ours, reference) == 0.0


# -- persistence ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Adafactor", "Muon"])
@pytest.mark.parametrize("foreach", [False, True])
def test_from_torch_and_state_dict_continue_the_trajectory(name, foreach):
    problem = Problem(*_mlp(matrices_only=name == "Muon"))
    config = {"lr": 0.03, "foreach": True} if foreach and name == "Adafactor" else {"lr": 0.03}
    reference, torch_opt, torch_params = torch_run(name, problem, [config], 12)
    # torch for 5 steps, then its twin for 7
    params = problem.fresh()
    warm = getattr(torch.optim, name)(params, **config)
    for _ in range(5):
        warm.zero_grad()
        problem.loss(params).backward()
        warm.step()
    twin = from_torch(warm)
    assert isinstance(twin, getattr(diffopt.optim, name))
    current = list(params)
    for step in range(7):
        current = twin.step(problem.loss(current), params=current)
        assert trajectory_error([[p.detach() for p in current]], [reference[5 + step]]) == 0.0
    assert state_error(twin.state, torch_states(torch_opt, torch_params)) == 0.0
    # the twin's state_dict (and torch's) load into a fresh twin, which continues identically
    saved = twin.state_dict()
    for source in (saved, torch_opt.state_dict()):
        fresh = getattr(diffopt.optim, name)([p.detach().clone().requires_grad_() for p in current], **config)
        fresh.load_state_dict(source)
        if source is saved:
            assert state_error(fresh.state, twin.state) == 0.0
    fresh = getattr(diffopt.optim, name)([p.detach().clone().requires_grad_() for p in current], **config)
    fresh.load_state_dict(saved)
    a = twin.step(problem.loss(current), params=current)
    b = fresh.step(problem.loss(list(fresh.params)))
    assert all(torch.equal(x.detach(), y.detach()) for x, y in zip(a, b))


# -- meta-gradients ------------------------------------------------------------------------------

def hypergradient_error(make, problem: Problem, hyper: dict[str, float], steps: int, seed: int) -> float:
    """Relative error of the meta-gradient of the final loss (w.r.t. the initial parameters and the
    hyperparameters in ``hyper``, as float64 tensors) along a random direction, against Richardson-
    extrapolated central differences."""
    params0 = [p.detach().clone() for p in problem.params]
    names = list(hyper)

    def final_loss(params, values):
        opt = make([p for p in params], **dict(zip(names, values)))
        current = list(params)
        for _ in range(steps):
            current = opt.step(problem.loss(current), params=current)
        return problem.loss(current)

    leaves = [p.clone().requires_grad_() for p in params0]
    tensors = [torch.tensor(hyper[k], dtype=F64, requires_grad=True) for k in names]
    grads = torch.autograd.grad(final_loss(leaves, tensors), leaves + tensors)
    direction = random_like(leaves + tensors, seed, unit=True)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction))
    for g in grads:
        assert torch.isfinite(g).all()

    def along(h: float) -> float:
        shifted = [(p + h * d).requires_grad_() for p, d in zip(params0, direction)]
        values = [torch.tensor(hyper[k] + h * float(d), dtype=F64) for k, d in zip(names, direction[len(params0):])]
        with torch.enable_grad():
            return float(final_loss(shifted, values).detach())

    best = min(abs(n - analytic) for n in central_differences(along, 1.0, steps=(1e-5, 1e-4, 1e-3)))
    return best / max(abs(analytic), 1e-8)


@settings(max_examples=examples(4))
@given(seed=st.integers(0, 2**16), problem=problems(tied=False, frozen=False, unused=False),
       config=optimizer_configs("Adafactor"), foreach=st.booleans(), steps=st.integers(3, 8))
def test_adafactor_hypergradients_match_finite_differences(seed, problem, config, foreach, steps):
    """Initial weights, lr, beta2_decay and weight_decay; factored (matrices) and full (vector) moments."""
    config = dict(config, d=1.0 + 2.0 * (config["d"] > 1.5))  # the clipping kink RMS(U) = d sits away from draws
    hyper = {"lr": 0.03 + 0.05 * (seed % 3) / 3, "beta2_decay": -0.8, "weight_decay": 0.3}
    rest = {k: v for k, v in config.items() if k not in hyper}
    make = lambda ps, **h: Adafactor(ps, foreach=foreach, **rest, **h)  # noqa: E731
    error = hypergradient_error(make, problem, hyper, steps, seed)
    assert record("finite differences", "Adafactor", error) <= 1e-6


@settings(max_examples=examples(4))
@given(seed=st.integers(0, 2**16), problem=matrix_problems(unused=False), config=optimizer_configs("Muon"),
       steps=st.integers(2, 6))
def test_muon_hypergradients_match_finite_differences(seed, problem, config, steps):
    """Through the Newton–Schulz iteration (in float64: ``ns_dtype=None``), momentum and weight decay."""
    hyper = {"lr": 0.02, "momentum": 0.8, "weight_decay": 0.1}
    rest = {k: v for k, v in config.items() if k not in hyper}
    error = hypergradient_error(lambda ps, **h: Muon(ps, ns_dtype=None, **rest, **h), problem, hyper, steps, seed)
    assert record("finite differences", "Muon", error) <= 1e-6


def test_muon_newton_schulz_coefficients_are_learnable():
    """Tensor ``ns_coefficients`` make the orthogonalising polynomial a meta-parameter."""
    problem = Problem(*_mlp(matrices_only=True))
    coefficients = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (3.4445, -4.7750, 2.0315)]
    opt = Muon(problem.fresh(), lr=0.02, ns_coefficients=tuple(coefficients), ns_dtype=None)
    current = list(opt.params)
    for _ in range(3):
        current = opt.step(problem.loss(current))
    grads = torch.autograd.grad(problem.loss(current), coefficients)
    analytic = float(grads[0])

    def along(h):
        values = (3.4445 + h, -4.7750, 2.0315)
        o = Muon(problem.fresh(), lr=0.02, ns_coefficients=values, ns_dtype=None)
        cur = list(o.params)
        for _ in range(3):
            cur = o.step(problem.loss(cur))
        return float(problem.loss(cur).detach())

    best = min(abs(n - analytic) for n in central_differences(along, 1.0, steps=(1e-6, 1e-5, 1e-4)))
    assert best / abs(analytic) <= 1e-6
    # with number coefficients, the twin uses torch's addmm calls; the written-out polynomial agrees
    x = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    written = newton_schulz(x, tuple(torch.tensor(c, dtype=F64) for c in (3.4445, -4.7750, 2.0315)), dtype=None)
    assert (written - newton_schulz(x, dtype=None)).abs().max() <= 1e-13


@pytest.mark.parametrize("name", ["Adafactor", "Muon"])
def test_zero_gradients_give_finite_meta_gradients(name):
    """A parameter whose gradient is exactly zero at every step (the loss multiplies it by zero) and
    a parameter starting at zero: meta-gradients of every order stay finite, and match FD."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64)
    shapes = [(4, 3), (2, 4), (3, 2)] if name == "Muon" else [(4, 3), (4,), (2, 4), (3, 2), (5,)]
    params = [torch.randn(*s, generator=g, dtype=F64) for s in shapes]
    params[-1] = torch.zeros(shapes[-1], dtype=F64)
    for p in params:
        p.requires_grad_()

    def loss(ps):
        h = torch.tanh(x @ ps[0].T + (ps[1] if name == "Adafactor" else 0))
        out = h @ ps[-3 if name == "Adafactor" else 1].T
        return ((out - y) ** 2).mean() + 0.0 * (ps[-2].sum() + ps[-1].sum())

    problem = Problem(params, loss, [str(s) for s in shapes], [list(range(len(params)))])
    cls = {"Adafactor": lambda ps, **h: Adafactor(ps, **h), "Muon": lambda ps, **h: Muon(ps, ns_dtype=None, **h)}[name]
    error = hypergradient_error(cls, problem, {"lr": 0.05}, 4, 0)
    assert error <= 1e-6
    # second order: the Hessian-vector product through the unrolled steps is finite
    lr = torch.tensor(0.05, dtype=F64, requires_grad=True)
    opt = cls(problem.fresh(), lr=lr)
    current = list(opt.params)
    for _ in range(3):
        current = opt.step(problem.loss(current))
    (glr,) = torch.autograd.grad(problem.loss(current), lr, create_graph=True)
    second = torch.autograd.grad(glr, [lr])
    assert torch.isfinite(glr) and all(torch.isfinite(s).all() for s in second)


def test_reductions_gradcheck_and_zero():
    x = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    for fn in (lambda t: safe_norm(t), lambda t: safe_norm(t, (-1,)), lambda t: mean_square(t, -1),
               lambda t: mean_square(t, -2)):
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))
        assert torch.autograd.gradcheck(fn, (x,), check_forward_ad=True, check_backward_ad=False,
                                        check_undefined_grad=False)
    zero = torch.zeros(3, 4, dtype=F64, requires_grad=True)
    (first,) = torch.autograd.grad(safe_norm(zero), zero, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), zero)
    assert torch.equal(first, torch.zeros_like(first)) and torch.isfinite(second).all()
    assert torch.equal(safe_norm(x), x.norm(2))
    assert torch.equal(mean_square(x, -1), x.norm(dim=-1, keepdim=True).square() / 4)


def test_newton_schulz_and_adafactor_step_gradcheck():
    g = torch.Generator().manual_seed(3)
    tall = torch.randn(5, 3, dtype=F64, generator=g, requires_grad=True)
    wide = torch.randn(2, 4, dtype=F64, generator=g, requires_grad=True)
    for m in (tall, wide):
        fn = lambda t: newton_schulz(t, steps=3, dtype=None)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (m,)) and torch.autograd.gradgradcheck(fn, (m,))
    rule = diffopt.optim.AdafactorRule()
    hp = dict(rule.defaults, lr=0.05, weight_decay=0.1)
    param = torch.randn(3, 4, dtype=F64, generator=g, requires_grad=True)
    grad = torch.randn(3, 4, dtype=F64, generator=g, requires_grad=True)
    lr = torch.tensor(0.05, dtype=F64, requires_grad=True)

    def one_step(p, gr, rate):
        state = {"step": 2, "row_var": torch.full((3, 1), 0.5, dtype=F64),
                 "col_var": torch.full((1, 4), 0.3, dtype=F64)}
        new, s = rule.update_one(p, gr, state, {**hp, "lr": rate, "d": 1.5})
        return new, s["row_var"], s["col_var"]

    assert torch.autograd.gradcheck(one_step, (param, grad, lr))
    assert torch.autograd.gradgradcheck(one_step, (param, grad, lr))


# -- task dimensions, errors -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Adafactor", "Muon"])
def test_leading_task_dimension_equals_separate_runs(name):
    """Weights with a leading task dimension: each task's trajectory is its own run's."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, 3, generator=g, dtype=F64)
    w1, w2 = torch.randn(3, 4, 3, generator=g, dtype=F64), torch.randn(3, 2, 4, generator=g, dtype=F64)
    b, scale = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    options = {"ns_dtype": None} if name == "Muon" else {"foreach": True}

    def loss(ps, xs=x):
        h = torch.tanh(xs @ ps[0].mT + (ps[2].unsqueeze(-2) if len(ps) > 2 else 0))
        out = h @ ps[1].mT * (ps[3][:, None, None] if len(ps) > 3 else 1)
        return (out - 0.5).square().sum()

    cls = getattr(diffopt.optim, name)
    # (Adafactor: a 0-dim parameter per task too, whose RMS and clip norm pooled the tasks)
    batched = [w1, w2] + ([b, scale] if name == "Adafactor" else [])
    opt = cls([t[0].clone().requires_grad_() for t in batched], lr=0.05, **options)
    current = [t.clone().requires_grad_() for t in batched]
    for _ in range(5):
        current = opt.step(loss(current), params=current)
    for task in range(3):
        single = cls([t[task].clone().requires_grad_() for t in batched], lr=0.05, **options)
        mine = list(single.params)
        for _ in range(5):
            mine = single.step(loss([t.unsqueeze(0) for t in mine], x[task:task + 1]), params=mine)
        for a, c in zip(current, mine):
            assert (a[task] - c).abs().max() <= 1e-12


def test_errors_name_the_argument():
    w = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"params\[1\] has shape \(3,\).*2-D"):
        Muon([w, torch.randn(3, requires_grad=True)])
    with pytest.raises(TypeError, match="complex"):
        Adafactor([torch.randn(2, 2, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match="beta2_decay"):
        Adafactor([w], beta2_decay=0.5)
    with pytest.raises(ValueError, match="invalid d"):
        Adafactor([w], d=0.5)
    with pytest.raises(ValueError, match=r"eps\[1\]"):
        Adafactor([w], eps=(None, -1.0))
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        Muon([w], adjust_lr_fn="bogus")
    with pytest.raises(ValueError, match="ns_steps"):
        Muon([w], ns_steps=100)
    with pytest.raises(TypeError, match="did you mean 'beta2_decay'"):
        Adafactor([w], beta2_decy=-0.8)


def _mlp(matrices_only: bool = False):
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, 1, generator=g, dtype=F64)
    ps = [torch.randn(4, 3, generator=g, dtype=F64).requires_grad_(), torch.randn(1, 4, generator=g, dtype=F64)]
    if not matrices_only:
        ps.append(torch.randn(4, generator=g, dtype=F64))
    for p in ps:
        p.requires_grad_()

    def loss(p):
        bias = p[2] if len(p) > 2 else 0
        return ((torch.tanh(x.to(p[0].dtype) @ p[0].T + bias) @ p[1].T - y.to(p[0].dtype)) ** 2).mean()

    return ps, loss, [f"p{i}" for i in range(len(ps))], [list(range(len(ps)))]

