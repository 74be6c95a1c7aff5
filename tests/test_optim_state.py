"""from_torch, state_dict / load_state_dict: the twin picks up and hands over optimizer state exactly.

Parity tolerance as in tests/test_optim_parity.py: ``|ours - torch| <= 1e-10 * max(1, |torch|)``.
A twin restored from its own state dict continues *bitwise* identically.
"""
from __future__ import annotations

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffopt
from diffopt.optim import PerParameter, from_torch
from strategies import (
    F64, OPTIMIZER_NAMES, continue_torch, continue_twin, discard_if_ill_conditioned, examples, optimizer_configs,
    problems, record, split_defaults, state_error, torch_run, torch_states, trajectory_error, twin_class, twin_run,
)

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-10
FIXTURE_OK = [HealthCheck.function_scoped_fixture]


def _round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- from_torch ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("params_as", ["default", "list", "mapping"])
@settings(max_examples=examples(1), suppress_health_check=FIXTURE_OK)  # x 3 ways x 2 dtypes per optimizer
@given(data=st.data())
def test_from_torch_after_warm_up_continues_torch_trajectory(name, params_as, default_dtype, data):
    """n torch steps, convert (groups, hyperparameters and state), then both continue: same trajectory."""
    problem = data.draw(problems(), label="problem")
    configs = [data.draw(optimizer_configs(name), label=f"group {k}") for k in range(len(problem.groups))]
    warm_up = data.draw(st.integers(1, 10), label="warm-up steps")
    more = 20 - warm_up
    warm_trajectory, torch_opt, torch_params = torch_run(name, problem, configs, warm_up)

    if params_as == "default":
        twin = from_torch(torch_opt)  # starts from torch's own parameter tensors
        start = torch_params
    else:
        start = [p.detach().clone().requires_grad_(p.requires_grad) for p in torch_params]
        replacements = start if params_as == "list" else dict(zip(torch_params, start))
        twin = from_torch(torch_opt, params=replacements)
    assert type(twin) is twin_class(name)
    assert all(a is b for a, b in zip(twin.params, start))
    # The twin first (it never writes into torch's tensors), then torch continues in place.
    ours = continue_twin(twin, problem, more)
    # Meta-gradients reach the tensors the twin started from (before torch overwrites them).
    used = [p for i, p in enumerate(start) if p.requires_grad and i not in problem.unused]
    grads = torch.autograd.grad(problem.loss(twin.params), used)
    assert all(torch.isfinite(g).all() for g in grads)
    reference = continue_torch(torch_opt, problem, torch_params, more)
    reference_state = torch_states(torch_opt, torch_params)
    error, error_state = trajectory_error(ours, reference), state_error(twin.state, reference_state)
    discard_if_ill_conditioned(max(error, error_state), name, problem, configs, 20,
                               (warm_trajectory + reference, reference_state), TOL)
    assert record("from_torch parity", name, error) <= TOL, f"{name}: from_torch trajectory differs by {error:.3e}"
    assert record("from_torch parity (state)", name, error_state) <= TOL


def test_from_torch_copies_groups_and_hyperparameters():
    w1 = torch.randn(3, dtype=F64, requires_grad=True)
    w2 = torch.randn(2, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([{"params": [w1], "lr": 0.1, "amsgrad": True}, {"params": [w2], "betas": (0.5, 0.6)}],
                           lr=0.01, weight_decay=0.1, foreach=False)
    twin = from_torch(opt)
    assert len(twin.param_groups) == 2
    assert twin.param_groups[0]["lr"] == 0.1 and twin.param_groups[0]["amsgrad"] is True
    assert twin.param_groups[1]["lr"] == 0.01 and twin.param_groups[1]["betas"] == (0.5, 0.6)
    assert all(g["weight_decay"] == 0.1 for g in twin.param_groups)
    assert all("foreach" not in g for g in twin.param_groups)
    assert twin.state == [None, None]  # no step taken: no state yet, as in torch


def test_from_torch_converts_subclasses_and_refuses_unknown_optimizers():
    class MyAdam(torch.optim.Adam):
        pass

    w = torch.randn(3, dtype=F64, requires_grad=True)
    assert type(from_torch(MyAdam([w]))) is diffopt.optim.Adam
    assert type(from_torch(torch.optim.AdamW([w]))) is diffopt.optim.AdamW
    with pytest.raises(TypeError, match="no differentiable twin for LBFGS"):
        from_torch(torch.optim.LBFGS([w]))


def test_from_torch_params_must_match():
    w1, w2 = (torch.randn(3, dtype=F64, requires_grad=True) for _ in range(2))
    opt = torch.optim.SGD([w1, w2], lr=0.1)
    with pytest.raises(ValueError, match="got 1 tensors, the optimizer has 2"):
        from_torch(opt, params=[w1.clone()])
    with pytest.raises(KeyError, match=r"positions \[1\]"):
        from_torch(opt, params={w1: w1.clone()})


def test_from_torch_passes_options():
    w = torch.randn(3, dtype=F64, requires_grad=True)
    twin = from_torch(torch.optim.SGD([w], lr=0.1), first_order=True, check_finite=True, clip_grad_norm=1.0)
    assert twin.first_order and twin.check_finite


# -- state_dict round trips ------------------------------------------------------------------

@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@settings(max_examples=examples(2), suppress_health_check=FIXTURE_OK)
@given(data=st.data())
def test_state_dict_round_trip_through_torch_save_continues_identically(name, default_dtype, data):
    """state_dict -> torch.save -> torch.load(weights_only=True) -> load_state_dict: the same future."""
    problem = data.draw(problems(), label="problem")
    configs = [data.draw(optimizer_configs(name), label=f"group {k}") for k in range(len(problem.groups))]
    first = data.draw(st.integers(1, 8), label="steps before saving")
    _, twin, current = twin_run(name, problem, configs, first)
    saved = _round_trip(twin.state_dict())
    assert saved["step_count"] == first

    restart = [p.detach().clone().requires_grad_(p.requires_grad) for p in current]
    defaults, overrides = split_defaults(configs)
    restored = twin_class(name)(problem.grouped(restart, overrides), **defaults)
    restored.load_state_dict(saved)
    assert restored.step_count == first

    expected = continue_twin(twin, problem, 6)
    got = continue_twin(restored, problem, 6, params=restart)
    error = record("state_dict round trip", name, trajectory_error(got, expected))
    assert error == 0.0, f"{name}: restored twin differs by {error:.3e}"


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@settings(max_examples=examples(2), suppress_health_check=FIXTURE_OK)
@given(data=st.data())
def test_loading_a_torch_state_dict_into_the_twin(name, default_dtype, data):
    """torch.optim's state_dict (saved and loaded with weights_only=True) loads into the twin."""
    problem = data.draw(problems(), label="problem")
    configs = [data.draw(optimizer_configs(name), label=f"group {k}") for k in range(len(problem.groups))]
    warm_up = data.draw(st.integers(1, 8), label="warm-up steps")
    warm_trajectory, torch_opt, torch_params = torch_run(name, problem, configs, warm_up)
    saved = _round_trip(torch_opt.state_dict())

    start = [p.detach().clone().requires_grad_(p.requires_grad) for p in torch_params]
    # Constructed with another lr: loading replaces the group hyperparameters, as in torch.
    defaults, overrides = split_defaults(configs)
    twin = twin_class(name)(problem.grouped(start, overrides), **dict(defaults, lr=0.123))
    twin.load_state_dict(saved)
    assert twin.param_groups[0]["lr"] == configs[0]["lr"]

    ours = continue_twin(twin, problem, 20 - warm_up, params=start)
    reference = continue_torch(torch_opt, problem, torch_params, 20 - warm_up)
    error = trajectory_error(ours, reference)
    discard_if_ill_conditioned(error, name, problem, configs, 20,
                               (warm_trajectory + reference, torch_states(torch_opt, torch_params)), TOL)
    assert record("torch state_dict parity", name, error) <= TOL, (
        f"{name}: twin loaded from torch's state_dict differs by {error:.3e}")


def test_state_dict_layout_is_torch_like_and_detached():
    w = torch.randn(3, dtype=F64, requires_grad=True)
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    opt = diffopt.optim.Adam([w], lr=lr)
    params = opt.step((w ** 2).sum())
    opt.step((params[0] ** 2).sum())
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "step_count"}
    assert sd["param_groups"][0]["params"] == [0]
    assert sd["state"][0]["step"] == 2
    for value in [*sd["state"][0].values(), sd["param_groups"][0]["lr"]]:
        if isinstance(value, torch.Tensor):
            assert not value.requires_grad and value.grad_fn is None
    assert sd["state"][0]["exp_avg"] is not opt.state[0]["exp_avg"]


def test_state_dict_refuses_per_parameter_and_schedule_hyperparameters():
    w = torch.randn(3, dtype=F64, requires_grad=True)
    opt = diffopt.optim.SGD([w], lr=PerParameter([0.1]))
    with pytest.raises(TypeError, match="PerParameter and Schedule hyperparameters are not saved"):
        opt.state_dict()


def test_load_state_dict_checks_the_layout():
    w1, w2 = (torch.randn(3, dtype=F64, requires_grad=True) for _ in range(2))
    one_group = diffopt.optim.SGD([w1, w2], lr=0.1).state_dict()
    two_groups = diffopt.optim.SGD([{"params": [w1]}, {"params": [w2]}], lr=0.1)
    with pytest.raises(ValueError, match="state dict has 1 parameter groups, this optimizer has 2"):
        two_groups.load_state_dict(one_group)
    smaller = diffopt.optim.SGD([w1], lr=0.1)
    with pytest.raises(ValueError, match="group 0 has 2 parameters in the state dict and 1 here"):
        smaller.load_state_dict(one_group)


def test_loading_a_state_dict_keeps_a_learnable_hyperparameter_it_equals():
    """Restoring a checkpoint of the same run used to swap a learnable lr for the saved detached copy,
    so later steps silently stopped differentiating with respect to it (review)."""
    def run(reload: bool, saved_lr: float | None = None):
        w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
        lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        opt = diffopt.optim.Adam([w], lr=lr)
        p = opt.step((w ** 2).sum())
        if reload:
            saved = _round_trip(opt.state_dict())
            if saved_lr is not None:
                saved["param_groups"][0]["lr"] = saved_lr
            opt.load_state_dict(saved)
        p = opt.step((p[0] ** 2).sum(), params=p)
        return opt, torch.autograd.grad((p[0] ** 2).sum(), lr)[0]

    reloaded, gradient = run(True)
    assert reloaded.hyperparameter_tensors() and torch.equal(gradient, run(False)[1])
    with pytest.warns(UserWarning, match=r"group 0's 'lr': a tensor that requires grad was replaced by the saved "
                                         r"value 0.2.*no longer differentiate"):
        replaced, _ = run(True, saved_lr=0.2)
    assert replaced.param_groups[0]["lr"] == 0.2 and replaced.hyperparameter_tensors() == []


@pytest.mark.parametrize("source", ["torch", "diffopt"])
def test_a_scheduler_resumes_after_load_state_dict(source):
    """The standard resume (load the optimizer's state, then build the scheduler with last_epoch=k)
    needs the saved groups' initial_lr, which load_state_dict had dropped as a key its groups lacked."""
    library = torch.optim if source == "torch" else diffopt.optim
    schedulers = torch.optim.lr_scheduler if source == "torch" else diffopt.optim.lr_scheduler
    saved_opt = library.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    scheduler = schedulers.StepLR(saved_opt, step_size=2, gamma=0.5)
    for _ in range(3):
        scheduler.step()
    state = saved_opt.state_dict()
    twin = diffopt.optim.SGD([torch.zeros(2)], lr=0.1)
    twin.load_state_dict(state)
    assert twin.param_groups[0]["initial_lr"] == 0.1 and "foreach" not in twin.param_groups[0]
    resumed = diffopt.optim.lr_scheduler.StepLR(twin, step_size=2, gamma=0.5, last_epoch=3)
    resumed.step()
    assert twin.param_groups[0]["lr"] == 0.025


def test_a_converted_or_loaded_tensor_lr_is_not_shared_with_the_torch_optimizer():
    """torch's scheduler writes a tensor lr in place: the twin keeps the value it was given."""
    for load in (False, True):
        torch_opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=torch.tensor(0.1))
        if load:
            twin = diffopt.optim.SGD([torch.zeros(2)], lr=torch.tensor(0.3))
            twin.load_state_dict(torch_opt.state_dict())
        else:
            twin = diffopt.optim.from_torch(torch_opt)
        assert twin.param_groups[0]["lr"] is not torch_opt.param_groups[0]["lr"]
        torch.optim.lr_scheduler.StepLR(torch_opt, step_size=1, gamma=0.5).step()
        assert torch_opt.param_groups[0]["lr"] == torch.tensor(0.05) and twin.param_groups[0]["lr"] == torch.tensor(0.1)
