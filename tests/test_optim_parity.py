"""Trajectory parity of diffopt.optim with the installed torch.optim.

Tolerance everywhere: ``|ours - torch| <= 1e-10 * max(1, |torch|)`` per element,
i.e. 1e-10 absolute for values of magnitude up to 1 and 1e-10 relative above
(see ``strategies.parity_error``). Parameters are float64 and configurations,
problems and seeds are searched by hypothesis.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffopt
from diffopt.optim import Schedule, clip_grad_norm, clip_grad_value
from strategies import (
    F64, OPTIMIZER_NAMES, Problem, discard_if_ill_conditioned, examples, flag_combinations, optimizer_configs,
    parity_error, problems, record, state_error, torch_class, torch_run, torch_states, trajectory_error, twin_class,
    twin_run,
)

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-10
FIXTURE_OK = [HealthCheck.function_scoped_fixture]


def check_parity(name: str, problem: Problem, configs: list[dict], steps: int, kind: str,
                 foreach: bool | None = None) -> None:
    """``foreach=False`` takes the per-tensor path; otherwise groups of plain numbers take the
    multi-tensor one (and must then be bit-identical to torch)."""
    reference, torch_opt, torch_params = torch_run(name, problem, configs, steps)
    ours, twin, _ = twin_run(name, problem, configs, steps, foreach=foreach)
    reference_state = torch_states(torch_opt, torch_params)
    error, error_state = trajectory_error(ours, reference), state_error(twin.state, reference_state)
    discard_if_ill_conditioned(max(error, error_state), name, problem, configs, steps,
                               (reference, reference_state), TOL)
    record(kind, name, error)
    record(f"{kind} (state)", name, error_state)
    assert error <= TOL, f"{name} {configs}: trajectory differs from torch.optim by {error:.3e}"
    assert error_state <= TOL, f"{name} {configs}: state differs from torch.optim's by {error_state:.3e}"
    if foreach is not False:
        # The multi-tensor path does torch's arithmetic in torch's order: bit-identical.
        assert error == 0.0, f"{name} {configs}: multi-tensor path differs from torch.optim by {error:.3e}"
    # Parameters torch skips (unused: no gradient; frozen: requires_grad=False) never move.
    for i in problem.unused + problem.frozen:
        assert torch.equal(ours[-1][i], problem.params[i].detach())
        assert torch.equal(reference[-1][i], problem.params[i].detach())
    if name != "Adagrad":  # Adagrad, like torch, creates state for every parameter up front
        for i in problem.unused + problem.frozen:
            assert twin.state[i] is None and not torch_opt.state.get(torch_params[i])


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@settings(max_examples=examples(4), suppress_health_check=FIXTURE_OK)
@given(data=st.data())
def test_trajectory_parity(name, default_dtype, data):
    """Random configuration per group, random problem structure, 20-25 steps, both default dtypes."""
    problem = data.draw(problems(), label="problem")
    configs = [data.draw(optimizer_configs(name), label=f"group {k}") for k in range(len(problem.groups))]
    foreach = data.draw(st.sampled_from([None, False]), label="foreach")
    check_parity(name, problem, configs, data.draw(st.integers(20, 25), label="steps"), "parity", foreach)


@pytest.mark.parametrize(
    ("name", "flags"),
    [(name, flags) for name in OPTIMIZER_NAMES for flags in flag_combinations(name)],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={int(b)}" for k, b in v.items()) or "none",
)
@settings(max_examples=examples(2))
@given(data=st.data())
def test_every_flag_combination(name, flags, data):
    """Each combination of boolean options (nesterov, amsgrad, centered, maximize, ...), one group."""
    problem = data.draw(problems(max_groups=1), label="problem")
    config = data.draw(optimizer_configs(name, **flags), label="config")
    check_parity(name, problem, [config], 20, "parity", data.draw(st.sampled_from([None, False]), label="foreach"))


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@settings(max_examples=examples(2), suppress_health_check=FIXTURE_OK)
@given(data=st.data())
def test_parity_with_every_structure(name, default_dtype, data):
    """Tied weights, a frozen and an unused parameter, zero-gradient rows and two differently set groups."""
    problem = data.draw(problems(tied=True, frozen=True, unused=True, sparse=True, min_groups=2), label="problem")
    configs = [data.draw(optimizer_configs(name), label=f"group {k}") for k in range(2)]
    check_parity(name, problem, configs, 20, "parity", data.draw(st.sampled_from([None, False]), label="foreach"))


def test_tied_weights_receive_the_summed_gradient():
    """The same tensor used twice in the loss gets one update from the summed gradient, as in torch."""
    torch.manual_seed(0)
    emb = torch.randn(5, 3, dtype=F64, requires_grad=True)
    idx = torch.tensor([0, 2, 4])

    def loss(ps):
        return torch.nn.functional.cross_entropy(torch.tanh(ps[0][idx]) @ ps[0].T, torch.tensor([1, 2, 3]))

    for name in OPTIMIZER_NAMES:
        problem = Problem([emb], loss, ["emb"], [[0]])
        check_parity(name, problem, [{"lr": 0.01}], 20, "parity")


@pytest.mark.parametrize("name", ["NAdam", "ASGD"])
def test_float32_scalar_state_rounding_is_followed(name):
    """torch keeps NAdam's mu_product and ASGD's eta/mu in float32 unless the default dtype is float64.

    The two settings give measurably different float64 trajectories in torch, and
    the twin follows each one.
    """
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, 1, generator=g, dtype=F64)
    w0 = [torch.randn(4, 3, generator=g, dtype=F64), torch.randn(1, 4, generator=g, dtype=F64)]
    problem = Problem([w.requires_grad_() for w in w0],
                      lambda ps: ((torch.tanh(x @ ps[0].T) @ ps[1].T - y) ** 2).mean(), ["w1", "w2"], [[0, 1]])
    config = {"lr": 0.0731, "momentum_decay": 0.0137} if name == "NAdam" else {"lr": 0.0731, "lambd": 0.0173,
                                                                                 "t0": 3.0}
    trajectories = {}
    for dtype in (torch.float64, torch.float32):
        torch.set_default_dtype(dtype)
        reference, _, _ = torch_run(name, problem, [config], 25)
        ours, _, _ = twin_run(name, problem, [config], 25)
        assert record("parity (scalar state)", name, trajectory_error(ours, reference)) <= TOL
        trajectories[dtype] = reference
    torch.set_default_dtype(torch.float64)
    assert trajectory_error(trajectories[torch.float32], trajectories[torch.float64]) > 1e-13


# -- ignored torch options ---------------------------------------------------------------------

@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_capturable_differentiable_are_accepted_and_ignored_and_foreach_chooses_the_path(name):
    """``foreach=True`` is the default multi-tensor path; ``foreach=False`` the per-tensor
    one, equal up to rounding; ``capturable``/``differentiable``/``fused=None`` change nothing."""
    problem = Problem(*_small_mlp())
    reference, _, _ = torch_run(name, problem, [{}], 5)
    ours, _, _ = twin_run(name, problem, [{}], 5)
    same, _, _ = twin_run(name, problem, [{"foreach": True, "capturable": False, "differentiable": True}], 5)
    per_tensor, _, _ = twin_run(name, problem, [{"foreach": False, "capturable": True, "fused": None}], 5)
    assert trajectory_error(same, ours) == 0.0
    assert trajectory_error(ours, reference) == 0.0  # the multi-tensor path is torch's arithmetic
    assert trajectory_error(per_tensor, reference) <= 1e-14


def _small_mlp():
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, 1, generator=g, dtype=F64)
    ps = [torch.randn(4, 3, generator=g, dtype=F64).requires_grad_(),
          torch.randn(1, 4, generator=g, dtype=F64).requires_grad_()]
    return ps, (lambda p: ((torch.tanh(x @ p[0].T) @ p[1].T - y) ** 2).mean()), ["w1", "w2"], [[0, 1]]


# -- gradient transforms -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop", "Rprop"])
@settings(max_examples=examples(4))
@given(problem=problems(max_groups=1), max_norm=st.floats(0.01, 2.0), data=st.data())
def test_clip_grad_norm_matches_torch(name, problem, max_norm, data):
    """``clip_grad_norm=`` equals torch.optim after ``torch.nn.utils.clip_grad_norm_`` each step."""
    config = data.draw(optimizer_configs(name))

    def clip(params):
        torch.nn.utils.clip_grad_norm_([p for p in params if p.requires_grad], max_norm)

    reference, _, _ = torch_run(name, problem, [config], 20, before_step=clip)
    ours, _, _ = twin_run(name, problem, [config], 20, clip_grad_norm=max_norm)
    assert record("clip_grad_norm parity", name, trajectory_error(ours, reference)) <= TOL


@settings(max_examples=examples(10))
@given(
    grads=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=4),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    max_norm=st.floats(0.05, 5.0),
)
def test_clip_grad_norm_function_matches_torch(grads, scale, max_norm):
    tensors = [torch.randn(3, 2, generator=torch.Generator().manual_seed(s), dtype=F64) * scale for s in grads]
    copies = [torch.zeros_like(t, requires_grad=True) for t in tensors]
    for c, t in zip(copies, tensors):
        c.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(copies, max_norm)
    clipped = clip_grad_norm(tensors + [None], max_norm)
    assert clipped[-1] is None
    for mine, c in zip(clipped, copies):
        assert record("clip_grad_norm fn", "-", parity_error(mine, c.grad)) <= 1e-15


@settings(max_examples=examples(10))
@given(seed=st.integers(0, 2**31 - 1), clip=st.floats(0.01, 2.0))
def test_clip_grad_value_matches_torch(seed, clip):
    t = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    c = torch.zeros_like(t, requires_grad=True)
    c.grad = t.clone()
    torch.nn.utils.clip_grad_value_([c], clip)
    assert torch.equal(clip_grad_value([t], clip)[0], c.grad)


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "Adamax"])
@settings(max_examples=examples(3))
@given(problem=problems(max_groups=1), clip=st.floats(0.005, 0.5), data=st.data())
def test_clip_grad_value_trajectory_matches_torch(name, problem, clip, data):
    config = data.draw(optimizer_configs(name))

    def clip_values(params):
        torch.nn.utils.clip_grad_value_([p for p in params if p.requires_grad], clip)

    reference, _, _ = torch_run(name, problem, [config], 20, before_step=clip_values)
    ours, _, _ = twin_run(name, problem, [config], 20, clip_grad_value=clip)
    assert record("clip_grad_value parity", name, trajectory_error(ours, reference)) <= TOL


def test_grad_transform_callback_is_applied_with_the_step_index():
    """A user ``grad_transform(grads, step)`` runs after clipping; compare with torch doing the same by hand."""
    problem = Problem(*_small_mlp())
    seen = []

    def transform(grads, step):
        seen.append(step)
        return [None if g is None else g * (1.0 + 0.1 * step) for g in grads]

    step = {"n": 0}

    def by_hand(params):
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        for p in params:
            p.grad.mul_(1.0 + 0.1 * step["n"])
        step["n"] += 1

    reference, _, _ = torch_run("Adam", problem, [{"lr": 0.05}], 20, before_step=by_hand)
    ours, _, _ = twin_run("Adam", problem, [{"lr": 0.05}], 20, clip_grad_norm=0.3, grad_transform=transform)
    assert seen == list(range(20))
    assert record("grad_transform parity", "Adam", trajectory_error(ours, reference)) <= TOL


# -- vectorised rules (leading task dimension) -------------------------------------------------

@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@settings(max_examples=examples(3), suppress_health_check=FIXTURE_OK)
@given(data=st.data(), tasks=st.integers(2, 4), seed=st.integers(0, 2**31 - 1))
def test_rules_on_a_leading_task_dimension_equal_per_task_runs(name, float64_default, data, tasks, seed):
    """``update_one`` on weights of shape (tasks, *shape) equals the per-task updates, exactly."""
    config = data.draw(optimizer_configs(name))
    rule = twin_class(name).rule_class()
    hp = dict(rule.defaults)
    hp.update(config)
    if name == "AdamW":
        hp["decoupled_weight_decay"] = True
    g = torch.Generator().manual_seed(seed)
    batched = torch.randn(tasks, 3, 2, generator=g, dtype=F64)
    grads = [torch.randn(tasks, 3, 2, generator=g, dtype=F64) for _ in range(6)]
    grads[1][0, 0, 0] = 0.0  # an exactly-zero gradient element in task 0
    state, current = rule.init_state(batched, hp), batched
    for grad in grads:
        current, state = rule.update_one(current, grad, state, hp)
    for t in range(tasks):
        single_state, single = rule.init_state(batched[t], hp), batched[t]
        for grad in grads:
            single, single_state = rule.update_one(single, grad[t], single_state, hp)
        assert record("vectorised", name, parity_error(current[t], single)) <= 1e-15
        assert torch.equal(current[t], single)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_optimizer_steps_on_task_batched_weights_equal_per_task_runs(name):
    """``opt.step(loss summed over tasks, params=batched)`` gives each task its own trajectory."""
    tasks = 3
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(tasks, 8, 3, generator=g, dtype=F64), torch.randn(tasks, 8, 1, generator=g, dtype=F64)
    w0 = [torch.randn(4, 3, generator=g, dtype=F64), torch.randn(1, 4, generator=g, dtype=F64)]
    starts = [torch.randn(tasks, *w.shape, generator=g, dtype=F64) * 0.5 for w in w0]

    def loss(ps, xs, ys):
        h = torch.tanh(xs @ ps[0].transpose(-1, -2))
        return ((h @ ps[1].transpose(-1, -2) - ys) ** 2).mean(dim=(-1, -2)).sum()

    config = {"lr": 0.03}
    opt = twin_class(name)([w.clone().requires_grad_() for w in w0], **config)
    current = [s.clone().requires_grad_() for s in starts]
    for _ in range(8):
        current = opt.step(loss(current, x, y), params=current)
    for t in range(tasks):
        single_opt = twin_class(name)([s[t].clone().requires_grad_() for s in starts], **config)
        single = list(single_opt.params)
        for _ in range(8):
            single = single_opt.step(loss(single, x[t], y[t]))
        for a, b in zip(current, single):
            assert record("vectorised optimizer", name, parity_error(a[t], b)) <= 1e-14


def test_per_task_hyperparameters_in_rules():
    """A per-task learning rate, shape (tasks, 1, 1), applies each task's own value."""
    rule = diffopt.optim.AdamRule()
    hp = dict(rule.defaults)
    lrs = torch.tensor([0.1, 0.01, 0.001], dtype=F64)
    batched_hp = dict(hp, lr=lrs.view(3, 1, 1))
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, 4, 2, generator=g, dtype=F64)
    grads = [torch.randn(3, 4, 2, generator=g, dtype=F64) for _ in range(4)]
    state, current = rule.init_state(w, batched_hp), w
    for grad in grads:
        current, state = rule.update_one(current, grad, state, batched_hp)
    for t in range(3):
        single_hp = dict(hp, lr=float(lrs[t]))
        s, single = rule.init_state(w[t], single_hp), w[t]
        for grad in grads:
            single, s = rule.update_one(single, grad[t], s, single_hp)
        assert parity_error(current[t], single) <= 1e-15


def test_torch_classes_are_the_installed_ones():
    for name in OPTIMIZER_NAMES:
        assert diffopt.optim.TWINS[torch_class(name)] is twin_class(name)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_update_runs_under_torch_func_vmap_and_equals_per_task_updates(name):
    """Inside ``torch.func.vmap`` (which cannot batch ``_foreach_*`` operations) the update takes
    the per-tensor path; two steps on each of 3 tasks equal the multi-tensor path task by task."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(3, 4, 2, generator=g, dtype=F64), torch.randn(3, 2, generator=g, dtype=F64)]
    grads = [[torch.randn(3, 4, 2, generator=g, dtype=F64), torch.randn(3, 2, generator=g, dtype=F64)]
             for _ in range(2)]
    opt = twin_class(name)([w[0] for w in weights], lr=0.05)

    def two_steps(w0, w1, a0, a1, b0, b1):
        params, states = [w0, w1], opt.initial_states([w0, w1])
        for step, step_grads in enumerate(([a0, a1], [b0, b1])):
            params, states = opt.update(params, step_grads, states, step)
        return tuple(params)

    batched = torch.func.vmap(two_steps)(*weights, *grads[0], *grads[1])
    for t in range(3):
        single = two_steps(*(w[t] for w in weights), *(x[t] for x in grads[0]), *(x[t] for x in grads[1]))
        for a, b in zip(batched, single):
            assert (a[t] - b).abs().max() <= 1e-15


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_a_parameter_that_joins_late_keeps_the_multi_tensor_path_bit_identical(name):
    """A tensor without gradient for the first steps is behind the others (its step count, its
    momentum buffer): the multi-tensor step runs once per step count, still torch's arithmetic."""
    g = torch.Generator().manual_seed(3)
    start = [torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64),
             torch.randn(4, generator=g, dtype=F64)]
    x, y = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 4, generator=g, dtype=F64)
    config = {"lr": 0.05, "momentum": 0.5} if name == "SGD" else {"lr": 0.05}

    def loss(ps, step):
        out = torch.tanh(x @ ps[0].T + ps[1])
        if step >= 3:  # the third tensor joins at step 3
            out = out * ps[2]
        return ((out - y) ** 2).mean()

    reference = [p.clone().requires_grad_() for p in start]
    torch_opt = torch_class(name)(reference, **config)
    ours = [p.clone().requires_grad_() for p in start]
    twin = twin_class(name)(ours, **config)
    for step in range(8):
        torch_opt.zero_grad()
        loss(reference, step).backward()
        torch_opt.step()
        ours = twin.step(loss(ours, step), ours)  # before step 3 the third tensor gets no gradient
    for a, b in zip(ours, reference):
        assert torch.equal(a.detach(), b.detach()), f"{name}: {float((a - b).abs().max()):.2e}"


def test_a_rule_that_overrides_update_one_is_not_bypassed_by_the_inherited_group_update():
    """A user rule derived from SGDRule that changes only ``update_one`` must run its own maths
    (the inherited multi-tensor ``update_group`` would silently apply plain SGD)."""
    from diffopt.optim import SGDRule

    class HalfStepRule(SGDRule):
        def update_one(self, param, grad, state, hp):
            return param - 0.5 * hp["lr"] * grad, state

    class HalfStepSGD(diffopt.optim.SGD):
        rule_class = HalfStepRule

    class FastHalfStepRule(HalfStepRule):
        def update_group(self, params, grads, states, hp):
            return torch._foreach_add(params, grads, alpha=-0.5 * hp["lr"]), states

    assert not HalfStepRule.has_group_update() and FastHalfStepRule.has_group_update()
    assert SGDRule.has_group_update() and not diffopt.optim.UpdateRule.has_group_update()
    w = [torch.ones(3, dtype=F64, requires_grad=True), torch.ones(2, dtype=F64, requires_grad=True)]
    grads = [torch.full((3,), 2.0, dtype=F64), torch.full((2,), 4.0, dtype=F64)]
    new = HalfStepSGD(w, lr=0.1).step(grads=grads)
    assert torch.equal(new[0].detach(), torch.full((3,), 0.9, dtype=F64))
    assert torch.equal(new[1].detach(), torch.full((2,), 0.8, dtype=F64))


def test_group_names_and_initial_lr_do_not_leave_the_multi_tensor_path():
    """Entries that are not hyperparameters (``name``, ``initial_lr`` from LR schedulers) do not
    matter to the choice of path: the group is still torch's, bit for bit."""
    g = torch.Generator().manual_seed(1)
    start = [torch.randn(3, 2, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)]
    reference = [p.clone().requires_grad_() for p in start]
    torch_opt = torch.optim.Adam(reference, lr=0.1)
    ours = [p.clone().requires_grad_() for p in start]
    twin = diffopt.optim.Adam([{"params": ours, "name": "encoder", "initial_lr": 0.1}], lr=0.1)
    for _ in range(5):
        torch_opt.zero_grad()
        (reference[0].sin().sum() * reference[1].cos().sum()).backward()
        torch_opt.step()
        ours = twin.step(ours[0].sin().sum() * ours[1].cos().sum(), ours)
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(ours, reference))


def test_a_group_without_gradients_does_not_resolve_its_schedule():
    """A group that takes no step (no gradients) is not asked for its Schedule's entry."""
    a = torch.ones(2, dtype=F64, requires_grad=True)
    b = torch.ones(2, dtype=F64, requires_grad=True)
    opt = diffopt.optim.SGD([{"params": [a]}, {"params": [b], "lr": Schedule([0.1, 0.1])}], lr=0.1)
    grads = [torch.ones(2, dtype=F64), torch.ones(2, dtype=F64)]
    params = opt.step(grads=grads)
    params = opt.step(grads=grads, params=params)
    before = params[1]
    params = opt.step(grads=[grads[0], None], params=params)  # step 2: b's schedule has run out
    assert params[1] is before


def test_nadam_states_keep_their_own_mu_product():
    a, b = torch.ones(2, dtype=F64, requires_grad=True), torch.ones(3, dtype=F64, requires_grad=True)
    opt = diffopt.optim.NAdam([a, b], lr=0.1)
    params = opt.step(grads=[torch.ones(2, dtype=F64), torch.ones(3, dtype=F64)])
    opt.step(grads=[torch.ones(2, dtype=F64), torch.ones(3, dtype=F64)], params=params)
    assert opt.state[0]["mu_product"] is not opt.state[1]["mu_product"]
    assert torch.equal(opt.state[0]["mu_product"], opt.state[1]["mu_product"])


def test_a_derived_group_update_does_not_inherit_the_tensor_lr_promise():
    """A user rule that overrides ``update_group`` for number hyperparameters (here with
    ``alpha=``) is not handed a tensor lr: that group goes tensor by tensor instead."""
    from diffopt.optim import SGDRule

    class NumbersOnlyRule(SGDRule):
        def update_one(self, param, grad, state, hp):
            return param - hp["lr"] * grad, state

        def update_group(self, params, grads, states, hp):
            return torch._foreach_add(params, grads, alpha=-hp["lr"]), states  # needs a number

    class NumbersOnlySGD(diffopt.optim.SGD):
        rule_class = NumbersOnlyRule

    assert SGDRule.group_update_takes_tensor_lr() and not NumbersOnlyRule.group_update_takes_tensor_lr()
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    w = [torch.ones(3, dtype=F64, requires_grad=True), torch.ones(2, dtype=F64, requires_grad=True)]
    new = NumbersOnlySGD(w, lr=lr).step(grads=[torch.full((3,), 2.0, dtype=F64), torch.full((2,), 4.0, dtype=F64)])
    (grad_lr,) = torch.autograd.grad(sum(p.sum() for p in new), lr)
    assert float(grad_lr) == -(3 * 2.0 + 2 * 4.0)


@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_sgd_with_a_tensor_momentum_of_zero_follows_torch(dampening):
    """torch applies momentum only when ``momentum != 0``; a tensor momentum of 0 with a dampening used to
    take the buffer path and scale the gradient by 1 − dampening (review). Its hypergradient stays: at
    dampening 0 the buffer path is torch's value."""
    w0 = torch.tensor([2.0, 1.0], dtype=torch.float64)
    reference = w0.clone().requires_grad_()
    torch_sgd = torch.optim.SGD([reference], lr=0.1, momentum=0.0, dampening=dampening)
    momentum = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    ours = diffopt.optim.SGD([w0.clone().requires_grad_()], lr=0.1, momentum=momentum, dampening=dampening)
    for _ in range(3):
        torch_sgd.zero_grad()
        (reference ** 3).sum().backward()
        torch_sgd.step()
        w = ours.params[0]
        ours.step((w ** 3).sum())
    assert torch.equal(ours.params[0].detach(), reference.detach())
    if dampening == 0.0:
        (hypergradient,) = torch.autograd.grad(ours.params[0].sum(), momentum)
        assert hypergradient != 0


@pytest.mark.parametrize("dampening", [0.0, 0.3])
def test_sgd_per_element_momentum_follows_torch_element_by_element(dampening):
    """Each element of a per-element momentum follows torch.optim.SGD with that element's momentum; at
    momentum 0 torch keeps no buffer and ignores the dampening (the twin had scaled the gradient by it)."""
    momenta = [0.0, 0.5, 0.9]
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    twin = diffopt.optim.SGD([x0.clone()], lr=0.1, momentum=torch.tensor(momenta, dtype=torch.float64),
                             dampening=dampening)
    references = [x0[j:j + 1].clone().requires_grad_() for j in range(3)]
    optimizers = [torch.optim.SGD([r], lr=0.1, momentum=m, dampening=dampening) for r, m in zip(references, momenta)]
    current = x0.clone()
    for step in range(5):
        grad = torch.sin(current * (step + 1)) + current
        for j, (r, opt) in enumerate(zip(references, optimizers)):
            r.grad = torch.sin(r.detach() * (step + 1)) + r.detach()
            opt.step()
        (current,) = twin.step(params=[current], grads=[grad])
    for j, r in enumerate(references):
        assert abs(float(current[j]) - float(r)) <= 1e-15, (j, float(current[j]), float(r))
