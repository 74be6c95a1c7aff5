"""diffopt.optim.lr_scheduler against torch.optim.lr_scheduler (torch 2.13).

* every scheduler, 1,000 steps, two parameter groups: the learning rates (and the
  momenta CyclicLR / OneCycleLR cycle) equal torch's bit for bit with number
  arguments, and to <= 1e-12 with tensor arguments (hypothesis-drawn arguments);
* torch's chainable form (ChainedScheduler, SequentialLR) and closed form (``step(epoch)``);
* hypergradients of a training run's final loss with respect to scheduler arguments
  (OneCycle's peak lr and warm-up fraction, the cosine's eta_min, ...) against
  central finite differences (<= 1e-6 relative);
* ReduceLROnPlateau (usable; a metric requiring grad is refused), ``scheduler_from_torch``
  mid-training together with ``from_torch``, ``as_schedule``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffopt
from diffopt.optim import lr_scheduler as D
from strategies import F64, central_differences, examples, floats, record

T = torch.optim.lr_scheduler

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def optimizers(name: str = "SGD", lr: Any = 0.1) -> tuple[torch.optim.Optimizer, diffopt.optim.DifferentiableOptimizer]:
    """The torch optimizer and its twin, two groups each (the second with its own lr)."""
    kwargs = {"momentum": 0.9} if name == "SGD" else {}
    number = float(lr) if isinstance(lr, torch.Tensor) else lr
    torch_opt = getattr(torch.optim, name)([{"params": [torch.zeros(2, requires_grad=True)]},
                                            {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.05}],
                                           lr=number, **kwargs)
    twin = getattr(diffopt.optim, name)([{"params": [torch.zeros(2, dtype=F64, requires_grad=True)]},
                                         {"params": [torch.zeros(1, dtype=F64, requires_grad=True)], "lr": 0.05}],
                                        lr=lr, **kwargs)
    return torch_opt, twin


def schedule_error(torch_sched: Any, twin_sched: Any, torch_opt: Any, twin_opt: Any, steps: int,
                   epochs: Callable[[int], int] | None = None) -> float:
    """Worst relative difference of the learning rates (and cycled momenta) over ``steps`` steps."""
    worst = 0.0

    def compare(a: Any, b: Any) -> None:
        nonlocal worst
        worst = max(worst, abs(float(a) - float(b)) / max(1.0, abs(float(a))))

    for step in range(steps):
        torch_opt.step()
        if epochs is None:
            torch_sched.step()
            twin_sched.step()
        else:
            torch_sched.step(epochs(step))
            twin_sched.step(epochs(step))
        for a, b in zip(torch_sched.get_last_lr(), twin_sched.get_last_lr()):
            compare(a, b)
        for g1, g2 in zip(torch_opt.param_groups, twin_opt.param_groups):
            compare(g1["lr"], g2["lr"])
            if "momentum" in g1:
                compare(g1["momentum"], g2["momentum"])
            if "betas" in g1:
                compare(g1["betas"][0], g2["betas"][0])
    return worst


def t(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=F64, requires_grad=True)


# name -> (torch optimizer name, builder(module, optimizer, argument wrapper)); the wrapper turns an
# argument into a tensor requiring grad for the tensor runs and leaves it a number otherwise.
CASES: dict[str, tuple[str, Callable[..., Any]]] = {
    "LambdaLR": ("SGD", lambda M, o, w: M.LambdaLR(o, lambda e: 0.99**e)),
    "MultiplicativeLR": ("SGD", lambda M, o, w: M.MultiplicativeLR(o, lambda e: 0.995)),
    "StepLR": ("SGD", lambda M, o, w: M.StepLR(o, 30, w(0.7))),
    "MultiStepLR": ("SGD", lambda M, o, w: M.MultiStepLR(o, [10, 100, 100, 500], w(0.5))),
    "ConstantLR": ("SGD", lambda M, o, w: M.ConstantLR(o, w(0.3), 40)),
    "LinearLR": ("SGD", lambda M, o, w: M.LinearLR(o, w(0.2), w(0.9), 300)),
    "ExponentialLR": ("SGD", lambda M, o, w: M.ExponentialLR(o, w(0.998))),
    "CosineAnnealingLR": ("SGD", lambda M, o, w: M.CosineAnnealingLR(o, 120, w(0.001))),
    "CosineAnnealingWarmRestarts": ("SGD", lambda M, o, w: M.CosineAnnealingWarmRestarts(o, 50, 2, w(0.001))),
    "CyclicLR-exp_range": ("SGD", lambda M, o, w: M.CyclicLR(o, w(0.01), w(0.1), 70, 30, mode="exp_range",
                                                             gamma=w(0.999))),
    "CyclicLR-triangular2": ("Adam", lambda M, o, w: M.CyclicLR(o, [w(0.01), 0.02], w(0.1), 50, mode="triangular2")),
    "OneCycleLR": ("SGD", lambda M, o, w: M.OneCycleLR(o, w(0.5), total_steps=1001, pct_start=w(0.3123),
                                                       div_factor=w(25.0), final_div_factor=w(1e4))),
    "OneCycleLR-three-phase-linear": ("Adam", lambda M, o, w: M.OneCycleLR(
        o, [w(0.5), 0.2], total_steps=1001, three_phase=True, anneal_strategy="linear", max_momentum=w(0.97))),
    "PolynomialLR": ("SGD", lambda M, o, w: M.PolynomialLR(o, 700, w(2.5))),
    "SequentialLR": ("SGD", lambda M, o, w: M.SequentialLR(o, [M.LinearLR(o, w(0.1), 1.0, 50),
                                                               M.CosineAnnealingLR(o, 900, w(0.002))], [50])),
    "ChainedScheduler": ("SGD", lambda M, o, w: M.ChainedScheduler(
        [M.ExponentialLR(o, w(0.999)), M.StepLR(o, 100, 0.5), M.CosineAnnealingLR(o, 300), M.ConstantLR(o, 0.5, 20)])),
}


def number(value: float) -> float:
    return value


@pytest.mark.parametrize("case", list(CASES))
def test_numbers_equal_torch_bit_for_bit_over_1000_steps(case):
    """Including torch's chainable form: ChainedScheduler scales the previous scheduler's rate, SequentialLR
    restarts the next scheduler at its milestone, CosineAnnealingLR past T_max climbs back."""
    name, build = CASES[case]
    torch_opt, twin = optimizers(name)
    error = schedule_error(build(T, torch_opt, number), build(D, twin, number), torch_opt, twin, 1000)
    assert record("schedule parity (numbers)", case, error) == 0.0


@pytest.mark.parametrize("case", list(CASES))
def test_tensor_arguments_equal_torch_over_1000_steps(case):
    """The same schedules with a tensor base lr and tensor arguments (requiring grad): <= 1e-12, on the graph."""
    name, build = CASES[case]
    torch_opt, twin = optimizers(name, lr=t(0.1))
    leaves: list[torch.Tensor] = []

    def tensor(value: float) -> torch.Tensor:
        leaves.append(t(value))
        return leaves[-1]

    twin_sched = build(D, twin, tensor)
    error = schedule_error(build(T, torch_opt, number), twin_sched, torch_opt, twin, 1000)
    assert record("schedule parity (tensors)", case, error) <= 1e-12
    lr = twin.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.requires_grad


@pytest.mark.parametrize("case", ["StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR",
                                  "CosineAnnealingLR", "PolynomialLR", "CosineAnnealingWarmRestarts"])
def test_closed_form_step_epoch_equals_torch(case):
    """torch's deprecated ``step(epoch)`` uses the closed form, which differs from the chainable one when
    steps are skipped or repeated; the twin does the same."""
    name, build = CASES[case]
    torch_opt, twin = optimizers(name)
    epochs = lambda k: (3 * k) % 700 + (k % 5)  # noqa: E731  (jumps forward and back)
    error = schedule_error(build(T, torch_opt, number), build(D, twin, number), torch_opt, twin, 300, epochs)
    assert error == 0.0


@settings(max_examples=examples(10))
@given(max_lr=floats(0.01, 2.0), pct=floats(0.05, 0.95), total=st.integers(2, 400), div=floats(2.0, 100.0),
       final_div=floats(10.0, 1e5), three_phase=st.booleans(), strategy=st.sampled_from(["cos", "linear"]),
       tensors=st.booleans())
def test_onecycle_drawn_arguments(max_lr, pct, total, div, final_div, three_phase, strategy, tensors):
    wrap = t if tensors else number
    torch_opt, twin = optimizers("SGD", lr=t(0.1) if tensors else 0.1)

    def build(M, o, w):
        return M.OneCycleLR(o, w(max_lr), total_steps=total, pct_start=w(pct), div_factor=w(div),
                            final_div_factor=w(final_div), three_phase=three_phase, anneal_strategy=strategy)

    error = schedule_error(build(T, torch_opt, number), build(D, twin, wrap), torch_opt, twin, total - 1)
    assert error <= (1e-12 if tensors else 0.0)


@settings(max_examples=examples(10))
@given(base=floats(1e-4, 0.05), top=floats(0.06, 1.0), up=st.integers(1, 60), down=st.integers(1, 60),
       mode=st.sampled_from(["triangular", "triangular2", "exp_range"]), gamma=floats(0.9, 1.0), eta=floats(0.0, 0.01),
       t_max=st.integers(1, 300), tensors=st.booleans())
def test_cyclic_and_cosine_drawn_arguments(base, top, up, down, mode, gamma, eta, t_max, tensors):
    wrap = t if tensors else number
    for build in (lambda M, o, w: M.CyclicLR(o, w(base), w(top), up, down, mode=mode, gamma=w(gamma)),
                  lambda M, o, w: M.CosineAnnealingLR(o, t_max, w(eta))):
        torch_opt, twin = optimizers("SGD", lr=t(0.1) if tensors else 0.1)
        error = schedule_error(build(T, torch_opt, number), build(D, twin, wrap), torch_opt, twin, 400)
        assert error <= (1e-12 if tensors else 0.0)


# -- hypergradients ------------------------------------------------------------------------------

def training_loss(make_scheduler: Callable[[Any, list[torch.Tensor]], Any], values: list[torch.Tensor],
                  steps: int = 30, optimizer: str = "SGD") -> torch.Tensor:
    """Final loss of ``steps`` differentiable steps on a small tanh regression, scheduled by ``make_scheduler``."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, generator=g, dtype=F64), torch.randn(12, 1, generator=g, dtype=F64)
    params = [torch.randn(4, 3, generator=g, dtype=F64).requires_grad_(), torch.randn(1, 4, generator=g, dtype=F64)
              .requires_grad_()]

    def loss(ps: list[torch.Tensor]) -> torch.Tensor:
        return ((torch.tanh(x @ ps[0].T) @ ps[1].T - y) ** 2).mean()

    opt = getattr(diffopt.optim, optimizer)(params, lr=0.05, **({"momentum": 0.5} if optimizer == "SGD" else {}))
    sched = make_scheduler(opt, values)
    current = params
    for _ in range(steps):
        current = opt.step(loss(current), params=current)
        sched.step()
    return loss(current)


HYPER_CASES: dict[str, tuple[Callable[[Any, list[torch.Tensor]], Any], list[float], str]] = {
    "OneCycleLR peak lr and warm-up": (
        lambda o, v: D.OneCycleLR(o, v[0], total_steps=31, pct_start=v[1], cycle_momentum=False), [0.3, 0.3123], "SGD"),
    "OneCycleLR with momentum cycling (Adam betas)": (
        lambda o, v: D.OneCycleLR(o, v[0], total_steps=31, pct_start=v[1], max_momentum=v[2]), [0.05, 0.4321, 0.95],
        "Adam"),
    "CosineAnnealingLR eta_min and base lr": (
        lambda o, v: (o.param_groups[0].__setitem__("lr", v[1]), D.CosineAnnealingLR(o, 20, v[0]))[1], [0.01, 0.2],
        "SGD"),
    "CosineAnnealingWarmRestarts eta_min": (
        lambda o, v: D.CosineAnnealingWarmRestarts(o, 7, 2, v[0]), [0.02], "SGD"),
    "CyclicLR base and max": (
        lambda o, v: D.CyclicLR(o, v[0], v[1], 6, 4, mode="exp_range", gamma=v[2], cycle_momentum=False),
        [0.02, 0.2, 0.97], "SGD"),
    "LinearLR + ExponentialLR chained": (
        lambda o, v: D.ChainedScheduler([D.LinearLR(o, v[0], 1.0, 10), D.ExponentialLR(o, v[1])]), [0.2, 0.95], "SGD"),
    "SequentialLR warm-up then PolynomialLR": (
        lambda o, v: D.SequentialLR(o, [D.ConstantLR(o, v[0], 5), D.PolynomialLR(o, 40, v[1])], [5]), [0.4, 1.7],
        "SGD"),
    "StepLR / MultiStepLR gamma": (
        lambda o, v: D.ChainedScheduler([D.StepLR(o, 7, v[0]), D.MultiStepLR(o, [4, 20], v[1])]), [0.8, 0.6], "SGD"),
}


@pytest.mark.parametrize("case", list(HYPER_CASES))
def test_hypergradients_match_finite_differences(case):
    make, values, optimizer = HYPER_CASES[case]
    leaves = [t(v) for v in values]
    grads = torch.autograd.grad(training_loss(make, leaves, optimizer=optimizer), leaves)
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(len(values), generator=g, dtype=F64)
    direction /= direction.norm()
    analytic = float(sum(gr * d for gr, d in zip(grads, direction)))
    assert analytic != 0.0

    def along(h: float) -> float:
        shifted = [torch.tensor(v + h * float(d), dtype=F64) for v, d in zip(values, direction)]
        with torch.enable_grad():
            return float(training_loss(make, shifted, optimizer=optimizer).detach())

    error = min(abs(n - analytic) for n in central_differences(along, 1.0, steps=(1e-6, 1e-5, 1e-4))) / abs(analytic)
    assert record("schedule finite differences", case, error) <= 1e-6


# -- ReduceLROnPlateau, conversion, as_schedule ----------------------------------------------------

def test_reduce_on_plateau_matches_torch_and_refuses_a_metric_gradient():
    torch_opt, twin = optimizers("SGD", lr=t(0.1))
    torch_sched = T.ReduceLROnPlateau(torch_opt, factor=0.5, patience=2, min_lr=0.004, cooldown=1)
    twin_sched = D.ReduceLROnPlateau(twin, factor=0.5, patience=2, min_lr=0.004, cooldown=1)
    metrics = [1.0, 0.9, 0.95, 0.95, 0.95, 0.8, 0.81, 0.82, 0.83, 0.84] * 5
    for m in metrics:
        torch_sched.step(m)
        twin_sched.step(torch.tensor(m))
        assert [float(v) for v in twin_sched.get_last_lr()] == torch_sched.get_last_lr()
    lr0 = twin.param_groups[0]["lr"]
    assert lr0.requires_grad  # max(lr * factor^k, min_lr): on the graph of the initial tensor lr
    with pytest.raises(TypeError, match="piecewise-constant.*metrics.detach"):
        twin_sched.step(torch.tensor(1.0, requires_grad=True) * 2)


@pytest.mark.parametrize("case", ["OneCycleLR", "SequentialLR", "ChainedScheduler", "CosineAnnealingWarmRestarts"])
def test_from_torch_converts_the_optimizer_and_its_scheduler_mid_training(case):
    """torch for 15 steps, then the twins for 25: the trajectory and the rates are torch's."""
    name, build = CASES[case]
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 3, generator=g, dtype=F64), torch.randn(10, 1, generator=g, dtype=F64)
    w0 = [torch.randn(4, 3, generator=g, dtype=F64), torch.randn(1, 4, generator=g, dtype=F64)]

    def loss(ps):
        return ((torch.tanh(x @ ps[0].T) @ ps[1].T - y) ** 2).mean()

    def fresh():
        return [w.clone().requires_grad_() for w in w0]

    reference = fresh()
    ref_opt = torch.optim.SGD(reference, lr=0.1, momentum=0.9)
    ref_sched = build(T, ref_opt, number)
    warm = fresh()
    warm_opt = torch.optim.SGD(warm, lr=0.1, momentum=0.9)
    warm_sched = build(T, warm_opt, number)
    for _ in range(15):
        for opt, sched, ps in ((ref_opt, ref_sched, reference), (warm_opt, warm_sched, warm)):
            opt.zero_grad()
            loss(ps).backward()
            opt.step()
            sched.step()
    twin = diffopt.optim.from_torch(warm_opt)
    twin_sched = D.scheduler_from_torch(warm_sched, twin)
    current = list(twin.params)
    for _ in range(25):
        ref_opt.zero_grad()
        loss(reference).backward()
        ref_opt.step()
        ref_sched.step()
        current = twin.step(loss(current), params=current)
        twin_sched.step()
        assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(current, reference))
        assert twin_sched.get_last_lr() == ref_sched.get_last_lr()


def test_as_schedule_and_errors():
    """``as_schedule(K)``: the rates the next K steps would use, as Schedules (one per group)."""
    (_, twin), (_, other) = optimizers("SGD"), optimizers("SGD")
    schedules = D.ExponentialLR(twin, 0.9).as_schedule(5)
    reference, expected = D.ExponentialLR(other, 0.9), []
    for _ in range(5):
        expected.append([group["lr"] for group in other.param_groups])
        reference.step()
    assert [[s.at(k, "lr") for s in schedules] for k in range(5)] == expected
    with pytest.raises(TypeError, match="diffopt.optim.DifferentiableOptimizer.*from_torch"):
        D.StepLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), 3)
    with pytest.raises(ValueError, match="pct_start"):
        D.OneCycleLR(twin, 0.1, total_steps=10, pct_start=1.5)


def test_state_dict_resumes_the_schedule_and_schedule_lrs_are_refused():
    _, twin = optimizers("SGD")
    _, other = optimizers("SGD")
    first = D.OneCycleLR(twin, 0.5, total_steps=100, pct_start=0.25)
    for _ in range(30):
        first.step()
    saved = first.state_dict()
    for key in ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "lr", "momentum"):
        for mine, theirs in zip(other.param_groups, twin.param_groups):
            mine[key] = theirs[key]
    second = D.OneCycleLR(other, 0.5, total_steps=100, pct_start=0.25, last_epoch=29)
    second.load_state_dict(saved)
    for _ in range(50):
        first.step()
        second.step()
        assert first.get_last_lr() == second.get_last_lr()
    _, scheduled = optimizers("SGD")
    scheduled.param_groups[0]["lr"] = diffopt.optim.Schedule([0.1, 0.2])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['lr'\] is a Schedule"):
        D.StepLR(scheduled, 3)


@pytest.mark.parametrize("vectorize", [False, True])
def test_as_schedule_drives_the_inner_loop_engine(vectorize):
    """OneCycle's rates as a Schedule in InnerLoop: the meta-gradient reaches the peak lr (vs FD)."""
    from diffopt.unroll import InnerLoop

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    g = torch.Generator().manual_seed(0)
    sx, sy, qx, qy = (torch.randn(2, 5, 1, generator=g, dtype=F64) for _ in range(4))

    def meta_loss(peak):
        opt = diffopt.optim.SGD(list(model.parameters()), lr=0.01, momentum=0.5)
        schedules = D.OneCycleLR(opt, peak, total_steps=5, cycle_momentum=False).as_schedule(5)
        for group, schedule in zip(opt.param_groups, schedules):
            group["lr"] = schedule
        return InnerLoop(model, opt, steps=5, vectorize=vectorize).meta_loss(sx, sy, qx, qy)

    peak = t(0.3)
    (grad,) = torch.autograd.grad(meta_loss(peak), peak)
    numeric = central_differences(lambda h: float(meta_loss(torch.tensor(0.3 + h, dtype=F64)).detach()), 1.0,
                                  steps=(1e-6, 1e-5))
    assert min(abs(n - float(grad)) for n in numeric) <= 1e-6 * abs(float(grad))


def test_a_step_count_the_schedule_divides_by_must_be_positive():
    """StepLR(step_size=0), CosineAnnealingLR(T_max=0) and CyclicLR(step_size_up=0) had failed at their first
    step with a bare ZeroDivisionError (torch's do too); they are refused where they are built."""
    opt = diffopt.optim.SGD([torch.zeros(2)], lr=0.1)
    for build, name in ((lambda: D.StepLR(opt, 0), "StepLR: step_size"),
                        (lambda: D.CosineAnnealingLR(opt, T_max=0), "CosineAnnealingLR: T_max"),
                        (lambda: D.CyclicLR(opt, 0.01, 0.1, step_size_up=0), "CyclicLR: step_size_up"),
                        (lambda: D.CyclicLR(opt, 0.01, 0.1, step_size_down=0), "CyclicLR: step_size_down")):
        with pytest.raises(ValueError, match=f"{name} must be a number of steps >= 1, got 0"):
            build()
