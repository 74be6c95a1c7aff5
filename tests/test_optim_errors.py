"""Bad input is refused early, with a message that names the problem (checked by content)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffopt
from diffopt.optim import NonFiniteError, PerParameter, Schedule
from strategies import F64, OPTIMIZER_NAMES, examples, twin_class

pytestmark = pytest.mark.usefixtures("single_thread")


def weight(n: int = 3) -> torch.Tensor:
    return torch.randn(n, dtype=F64, requires_grad=True)


# -- unknown keywords ------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "typo", "meant"), [
    ("Adam", "lrr", "lr"), ("SGD", "momentun", "momentum"), ("Adagrad", "lr_decya", "lr_decay"),
    ("AdamW", "weight_decy", "weight_decay"), ("Adam", "amsgrd", "amsgrad"), ("RMSprop", "centred", "centered"),
    ("NAdam", "momentum_decays", "momentum_decay"), ("Rprop", "step_size", "step_sizes"), ("ASGD", "lamda", "lambd"),
])
def test_unknown_keyword_suggests_the_closest(name, typo, meant):
    with pytest.raises(TypeError) as info:
        twin_class(name)([weight()], **{typo: 0.1})
    message = str(info.value)
    assert f"unknown argument {typo!r}" in message and f"did you mean {meant!r}?" in message
    assert name in message and "Valid hyperparameters:" in message


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@settings(max_examples=examples(5))
@given(data=st.data())
def test_any_one_letter_typo_is_caught_and_corrected(name, data):
    """Hypothesis: a valid keyword with one letter doubled, in the constructor or in a group."""
    keys = [k for k in twin_class(name).rule_class.defaults if len(k) >= 3]
    key = data.draw(st.sampled_from(keys))
    at = data.draw(st.integers(0, len(key) - 1))
    typo = key[: at + 1] + key[at] + key[at + 1:]
    in_group = data.draw(st.booleans())
    with pytest.raises(TypeError, match=re.escape(f"did you mean {key!r}?")):
        if in_group:
            twin_class(name)([{"params": [weight()], typo: 0.1}])
        else:
            twin_class(name)([weight()], **{typo: 0.1})


def test_unknown_keyword_without_a_close_match_lists_the_valid_ones():
    with pytest.raises(TypeError) as info:
        diffopt.optim.SGD([weight()], lr=0.1, zzzzzz=1)
    message = str(info.value)
    assert "did you mean" not in message
    assert "Valid hyperparameters: lr, momentum, dampening, weight_decay, nesterov, maximize" in message


# -- invalid values --------------------------------------------------------------------------

@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@given(lr=st.floats(-10.0, -1e-12))
@settings(max_examples=examples(3))
def test_negative_learning_rate(name, lr):
    with pytest.raises(ValueError, match=r"parameter group 0: invalid lr -?[0-9.e-]+; it must be >= 0\.0"):
        twin_class(name)([weight()], lr=lr)
    with pytest.raises(ValueError, match="invalid lr"):  # a tensor lr is checked too
        twin_class(name)([weight()], lr=torch.tensor(lr, dtype=F64))


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adamax", "NAdam", "RAdam"])
@settings(max_examples=examples(4))
@given(bad=st.one_of(st.floats(1.0, 10.0), st.floats(-10.0, -1e-9)), which=st.sampled_from([0, 1]))
def test_betas_outside_zero_one(name, bad, which):
    betas = [0.9, 0.999]
    betas[which] = bad
    bound = "< 1.0" if bad >= 1 else ">= 0.0"
    with pytest.raises(ValueError, match=re.escape(f"invalid betas[{which}]") + r".*" + re.escape(bound)):
        twin_class(name)([weight()], betas=tuple(betas))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": 0.1, "nesterov": True}, "nesterov=True requires momentum > 0 and dampening = 0"),
    ({"lr": 0.1, "momentum": 0.9, "dampening": 0.5, "nesterov": True},
     "nesterov=True requires momentum > 0 and dampening = 0"),
    ({"lr": 0.1, "momentum": -0.5}, "invalid momentum -0.5; it must be >= 0.0"),
    ({"lr": 0.1, "nesterov": 1}, "nesterov must be True or False, got 1"),
])
def test_sgd_option_errors(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        diffopt.optim.SGD([weight()], **kwargs)


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("Adam", {"eps": -1e-8}, "invalid eps -1e-08; it must be > 0.0"),
    ("Adam", {"eps": 0.0}, "invalid eps 0.0; it must be > 0.0 (with eps = 0 a gradient coordinate that stays 0"),
    ("Adagrad", {"eps": 0.0}, "use a tiny eps such as 1e-12"),
    ("Adam", {"weight_decay": float("inf")}, "invalid weight_decay inf; it must be finite"),
    ("RMSprop", {"alpha": 1.5}, "invalid alpha 1.5; it must be <= 1.0 (above 1 the average of squares"),
    ("Rprop", {"etas": (0.5, float("inf"))}, "invalid etas[1] inf; it must be finite"),
    ("Adafactor", {"eps": (0.0, 1e-3)}, "invalid eps[0] 0.0; it must be > 0.0"),
    ("Adam", {"weight_decay": -0.1}, "invalid weight_decay -0.1"),
    ("Adam", {"weight_decay": float("nan")}, "weight_decay contains NaN"),
    ("Adam", {"betas": 0.9}, "betas must be a pair (a, b), got 0.9"),
    ("Adam", {"lr": "0.1"}, "lr must be a number or a tensor, got '0.1'"),
    ("Adam", {"lr": torch.tensor(1, dtype=torch.int64)}, "lr must be a floating-point tensor"),
    ("Adagrad", {"lr_decay": -0.1}, "invalid lr_decay -0.1"),
    ("Adagrad", {"initial_accumulator_value": -1.0}, "invalid initial_accumulator_value -1.0"),
    ("Adadelta", {"rho": 1.5}, "invalid rho 1.5; it must be <= 1.0"),
    ("NAdam", {"momentum_decay": -0.1}, "invalid momentum_decay -0.1"),
    ("RMSprop", {"alpha": -0.1}, "invalid alpha -0.1"),
    ("RMSprop", {"momentum": -0.1}, "invalid momentum -0.1"),
    ("Rprop", {"etas": (1.5, 1.2)}, "invalid etas[0] 1.5; it must be < 1.0"),
    ("Rprop", {"etas": (0.5, 0.9)}, "invalid etas[1] 0.9; it must be > 1.0"),
    ("Rprop", {"step_sizes": (-1.0, 1.0)}, "invalid step_sizes[0] -1.0"),
    ("ASGD", {"lambd": -1.0}, "invalid lambd -1.0"),
    ("ASGD", {"t0": torch.tensor(1.0)}, "t0 is a step count and must be a number, not a tensor"),
])
def test_invalid_values_name_the_argument(name, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        twin_class(name)([weight()], **kwargs)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("lr", [float("inf"), torch.tensor(float("inf"), dtype=F64)], ids=["number", "tensor"])
def test_an_infinite_learning_rate_is_refused_where_it_is_set(name, lr):
    """torch.optim accepts lr=inf and returns inf or NaN weights from the first step."""
    with pytest.raises(ValueError, match=r"parameter group 0: invalid lr inf; it must be finite"):
        twin_class(name)([weight()], lr=lr)


@pytest.mark.parametrize(("name", "kwargs"), [
    ("Rprop", {"step_sizes": (1e-6, float("inf"))}), ("ASGD", {"t0": float("inf")}), ("Adafactor", {"d": float("inf")})])
def test_an_infinite_bound_that_switches_a_limit_off_is_accepted(name, kwargs):
    """Rprop's largest step, ASGD's averaging start and Adafactor's clipping threshold may be inf (no
    limit): the weights stay finite and follow torch.optim."""
    w = weight()
    ours = twin_class(name)([w], lr=0.01, **kwargs)
    reference = torch.nn.Parameter(w.detach().clone())
    theirs = getattr(torch.optim, name)([reference], lr=0.01, **kwargs)
    for _ in range(3):
        ours.step((ours.params[0] ** 2).sum())
        theirs.zero_grad()
        (reference ** 2).sum().backward()
        theirs.step()
    assert torch.isfinite(ours.params[0]).all()
    torch.testing.assert_close(ours.params[0].detach(), reference.detach(), rtol=0, atol=1e-12)


def test_invalid_values_in_a_later_group_name_the_group():
    with pytest.raises(ValueError, match=re.escape("Adam parameter group 1: invalid betas[1] 1.5")):
        diffopt.optim.Adam([{"params": [weight()]}, {"params": [weight()], "betas": (0.9, 1.5)}])


# -- tensor hyperparameters of the wrong shape ---------------------------------------------

@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
@settings(max_examples=examples(5))
@given(param_shape=st.lists(st.integers(2, 4), min_size=1, max_size=2), extra=st.integers(1, 3))
def test_hyperparameter_tensor_of_the_wrong_shape(name, param_shape, extra):
    shape = list(param_shape)
    shape[-1] += extra  # does not broadcast against the parameter
    p = torch.zeros(param_shape, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError) as info:
        twin_class(name)([p], lr=torch.full(shape, 0.01, dtype=F64))
    message = str(info.value)
    assert f"hyperparameter 'lr' has shape {tuple(shape)}" in message
    assert f"does not broadcast to the parameter's shape {tuple(param_shape)}" in message
    assert "PerParameter" in message


def test_hyperparameter_tensor_that_would_broadcast_beyond_the_parameter():
    with pytest.raises(ValueError, match=re.escape("has shape (3, 1), which does not broadcast")):
        diffopt.optim.SGD([weight(3)], lr=torch.full((3, 1), 0.1, dtype=F64))


def test_per_parameter_and_schedule_errors():
    w1, w2 = weight(), weight(2)
    with pytest.raises(ValueError, match="'lr' is PerParameter with fewer values than the group has parameters"):
        diffopt.optim.SGD([w1, w2], lr=PerParameter([0.1]))
    wrong = "'lr' has shape (3,), which does not broadcast to the parameter's shape (2,)"
    with pytest.raises(ValueError, match=re.escape(wrong)):
        diffopt.optim.SGD([w1, w2], lr=PerParameter([torch.full((3,), 0.1, dtype=F64)] * 2))
    wrong = "'betas' has shape (2,), which does not broadcast to the parameter's shape (3,)"
    with pytest.raises(ValueError, match=re.escape(wrong)):
        diffopt.optim.Adam([w1, w2], betas=(PerParameter([torch.full((2,), 0.9, dtype=F64)] * 2), 0.999))
    with pytest.raises(TypeError, match="values must be a list or tuple with one entry per parameter"):
        PerParameter(torch.ones(2))
    with pytest.raises(ValueError, match="a 0-dim tensor has no step dimension"):
        Schedule(torch.tensor(0.1))
    opt = diffopt.optim.SGD([w1], lr=Schedule([0.1, 0.2]))
    params = opt.step((w1 ** 2).sum())
    params = opt.step((params[0] ** 2).sum())
    with pytest.raises(IndexError, match=re.escape("its Schedule has 2 entries but step 2 (0-based) was requested")):
        opt.step((params[0] ** 2).sum())


# -- the loss and the parameters -----------------------------------------------------------

@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_non_scalar_loss(name):
    w = weight()
    with pytest.raises(ValueError, match=re.escape("step(loss) at step 0: the loss must be a scalar, got shape (3,)")):
        twin_class(name)([w]).step(w ** 2)


def test_parameters_that_do_not_require_grad_or_a_loss_without_grad():
    message = "the loss does not depend on any parameter that requires grad"
    frozen = torch.randn(3, dtype=F64)
    with pytest.raises(ValueError, match=message):
        diffopt.optim.SGD([frozen], lr=0.1).step((frozen ** 2).sum())
    w = weight()
    opt = diffopt.optim.SGD([w], lr=0.1)
    with torch.no_grad():
        loss = (w ** 2).sum()
    with pytest.raises(ValueError, match=message + r".*torch\.no_grad\(\)"):
        opt.step(loss)
    with pytest.raises(ValueError, match=message):
        opt.step(torch.tensor(1.0, dtype=F64))


def test_step_argument_errors():
    w = weight()
    opt = diffopt.optim.SGD([w], lr=0.1)
    with pytest.raises(TypeError, match="a loss tensor is required"):
        opt.step()
    with pytest.raises(TypeError, match="loss must be a tensor, got float"):
        opt.step(1.0)
    with pytest.raises(ValueError, match="got 2 tensors but the optimizer has 1 parameters"):
        opt.step((w ** 2).sum(), params=[w, w])
    with pytest.raises(ValueError, match=re.escape("parameter 0 (group0.params[0]) has shape (4,), expected (3,)")):
        opt.step((w ** 2).sum(), params=[weight(4)])
    with pytest.raises(ValueError, match="got 2 gradients for 1 parameters"):
        opt.step(grads=[w, w])


def test_parameter_list_errors():
    w = weight()
    with pytest.raises(TypeError, match=re.escape("got a single tensor; wrap it in a list: [tensor]")):
        diffopt.optim.SGD(w, lr=0.1)
    with pytest.raises(ValueError, match="got an empty parameter list"):
        diffopt.optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="appears more than once; tied weights must be passed once"):
        diffopt.optim.SGD([w, w], lr=0.1)
    with pytest.raises(TypeError, match="only floating-point tensors can be optimized"):
        diffopt.optim.SGD([torch.zeros(3, dtype=torch.int64)], lr=0.1)
    with pytest.raises(TypeError, match="params\\[0\\] is a float, not a tensor"):
        diffopt.optim.SGD([0.5], lr=0.1)
    with pytest.raises(ValueError, match="a parameter group needs a 'params' entry"):
        diffopt.optim.SGD([{"lr": 0.1}])


# -- check_finite ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@settings(max_examples=examples(2))
@given(bad_step=st.integers(0, 3), bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_check_finite_non_finite_loss_names_the_step(name, bad_step, bad):
    w = weight()
    opt = twin_class(name)([w], check_finite=True)
    params = [w]
    for _ in range(bad_step):
        params = opt.step((params[0] ** 2).sum())
    with pytest.raises(NonFiniteError, match=rf"step {bad_step}: the loss is {re.escape(str(bad))}"):
        opt.step((params[0] ** 2).sum() * bad)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@settings(max_examples=examples(2))
@given(bad_step=st.integers(0, 3))
def test_check_finite_non_finite_gradient_names_the_step_and_the_parameter(name, bad_step):
    """The loss is finite but sqrt(|x|) at x = 0 has an infinite derivative."""
    model = torch.nn.Linear(2, 1).double()
    named = list(model.named_parameters())
    opt = twin_class(name)(named, check_finite=True)
    params = [p for _, p in named]
    x = torch.ones(1, 2, dtype=F64)
    for _ in range(bad_step):
        params = opt.step(((x @ params[0].T + params[1]) ** 2).sum())
    kink = params[1] - params[1].detach()  # exactly 0, on the graph
    loss = ((x @ params[0].T) ** 2).sum() + torch.sqrt(kink.abs()).sum()
    assert torch.isfinite(loss)
    with pytest.raises(NonFiniteError, match=rf"step {bad_step}: the gradient of parameter 1 \(bias\) is not finite"):
        opt.step(loss)


def test_without_check_finite_non_finite_values_pass_through():
    w = weight()
    opt = diffopt.optim.SGD([w], lr=0.1)
    (new,) = opt.step((w ** 2).sum() * float("nan"))
    assert torch.isnan(new).all()


# -- torch options: fused refused, the rest accepted and ignored -------------------------------

@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_fused_is_refused_with_the_reason(name):
    with pytest.raises(ValueError, match="fused=True has no differentiable kernel"):
        twin_class(name)([weight()], fused=True)
    with pytest.raises(ValueError, match="fused=True has no differentiable kernel"):
        twin_class(name)([{"params": [weight()], "fused": True}])
    twin_class(name)([weight()], fused=False)
    twin_class(name)([weight()], fused=None)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_foreach_capturable_differentiable_are_accepted_and_dropped(name):
    opt = twin_class(name)([{"params": [weight()], "foreach": False}], foreach=True, capturable=True,
                           differentiable=True)
    for key in ("foreach", "capturable", "differentiable", "fused"):
        assert key not in opt.param_groups[0] and key not in opt.defaults


# -- transforms ------------------------------------------------------------------------------

def test_transform_option_errors():
    w = weight()
    with pytest.raises(ValueError, match="clip_grad_norm must be positive, got -1"):
        diffopt.optim.SGD([w], lr=0.1, clip_grad_norm=-1)
    with pytest.raises(ValueError, match="clip_grad_value must be positive, got 0"):
        diffopt.optim.SGD([w], lr=0.1, clip_grad_value=0)
    with pytest.raises(TypeError, match=re.escape("grad_transform must be a callable f(grads, step) -> grads")):
        diffopt.optim.SGD([w], lr=0.1, grad_transform=3)
    opt = diffopt.optim.SGD([w], lr=0.1, grad_transform=lambda grads, step: grads + grads)
    with pytest.raises(ValueError, match="grad_transform returned 2 gradients for 1 parameters"):
        opt.step((w ** 2).sum())


def test_a_loss_that_does_not_depend_on_the_stepped_parameters_is_refused():
    """The torchopt-port trap: losses computed as loss(net(x)) after the first step do not depend
    on the optimizer's current parameters, so the step used to return them unchanged, silently."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    opt = diffopt.optim.SGD(net.parameters(), lr=0.1)
    opt.step(torch.nn.functional.cross_entropy(net(x), y))  # step 0: the loss does depend on them
    with pytest.raises(ValueError, match=r"step\(loss\) at step 1: the loss does not depend on any of the 2 "
                                         r"parameters.*opt.step\(loss\)` returns them.*diffopt.innerloop"):
        opt.step(torch.nn.functional.cross_entropy(net(x), y))


def test_a_module_instead_of_its_parameters_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"got the module Linear; pass its parameters, linear.parameters\(\)"):
        diffopt.optim.SGD(torch.nn.Linear(2, 2), lr=0.1)


def test_a_second_order_step_through_fused_attention_is_refused_with_the_fix():
    """#14: the CPU flash kernel has no double backward; the step names it and the three ways out,
    instead of a raw 'derivative ... not implemented' at the meta-backward."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    x = torch.randn(3, 5, 16)
    with pytest.raises(ValueError, match=r"step\(loss\) at step 0: the loss was computed through fused attention "
                                         r"\(ScaledDotProduct\w*Backward0\).*double_differentiable.*first_order=True"):
        diffopt.optim.SGD(layer.parameters(), lr=0.1).step(layer(x).pow(2).mean())
    diffopt.optim.SGD(layer.parameters(), lr=0.1, first_order=True).step(layer(x).pow(2).mean())  # no graph: fine
    grads = {}
    for how in ("context", "math"):
        params = list(layer.parameters())
        opt = diffopt.optim.SGD(params, lr=0.1)
        names = [n for n, _ in layer.named_parameters()]
        block = diffopt.unroll.double_differentiable() if how == "context" else torch.nn.attention.sdpa_kernel(
            [torch.nn.attention.SDPBackend.MATH])
        with block:
            new = opt.step(layer(x).pow(2).mean())
            meta = torch.func.functional_call(layer, dict(zip(names, new)), (x,)).pow(2).mean()
        grads[how] = torch.autograd.grad(meta, params)
    for a, b in zip(grads["context"], grads["math"]):
        assert torch.equal(a, b) and bool(torch.isfinite(a).all())


# -- review findings: inputs that passed validation and then gave a wrong or non-finite step -----------

@pytest.mark.parametrize("grad", [torch.ones(3, 1, dtype=F64), torch.ones(1, 3, dtype=F64), torch.ones(4, dtype=F64),
                                  torch.ones(3, dtype=torch.float32)])
def test_a_gradient_of_another_shape_or_dtype_is_refused(grad):
    """``step(grads=...)``: a (3, 1) gradient for a (3,) parameter used to broadcast it to (3, 3)."""
    with pytest.raises(ValueError, match=r"step 0: the gradient of parameter 0 .* has shape .* but the parameter "
                                         r"has shape \(3,\) and dtype torch.float64"):
        diffopt.optim.SGD([weight()], lr=0.1).step(grads=[grad])
    bad_transform = diffopt.optim.Adam([weight()], lr=0.1, grad_transform=lambda gs, step: [grad])
    with pytest.raises(ValueError, match=r"grads= or grad_transform"):
        bad_transform.step(grads=[torch.ones(3, dtype=F64)])


@pytest.mark.parametrize("option", ["clip_grad_norm", "clip_grad_value"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), 0.0, float("inf")])
def test_clipping_thresholds_given_as_tensors_are_checked_like_numbers(option, value):
    """A tensor ``clip_grad_norm`` of -1 reversed the step, NaN made every weight NaN (review)."""
    for given in (value, torch.tensor(value, dtype=F64)):
        with pytest.raises(ValueError, match=f"{option} must be positive"):
            diffopt.optim.SGD([weight()], lr=0.1, **{option: given})
    with pytest.raises(ValueError, match=f"{option} must be positive.*one-element tensor"):
        diffopt.optim.SGD([weight()], lr=0.1, **{option: torch.tensor([1.0, 2.0], dtype=F64)})


@pytest.mark.parametrize(("name", "value"), [("lr", torch.tensor(-0.1, dtype=F64)), ("momentum", -5.0),
                                             ("weight_decay", torch.tensor(float("nan"), dtype=F64)),
                                             ("lr", float("inf"))])
def test_a_callable_schedule_is_checked_at_every_step(name, value):
    options = {"lr": 0.1, name: Schedule(lambda step: value)}
    optimizer = diffopt.optim.SGD([weight()], **options)
    w = optimizer.params[0]
    with pytest.raises(ValueError, match=f"hyperparameter '{name}': its Schedule returned .* at step 0.*must be finite and >= 0"):
        optimizer.step((w * w).sum())


def test_nesterov_reads_the_values_of_tensor_hyperparameters():
    """``dampening=tensor(0.)`` is a dampening of 0 (torch accepts it); the message says what it got."""
    diffopt.optim.SGD([weight()], lr=0.1, momentum=0.9, nesterov=True, dampening=torch.tensor(0.0, dtype=F64))
    with pytest.raises(ValueError, match=r"nesterov=True requires momentum > 0 and dampening = 0, got momentum=0.9 "
                                         r"and dampening=tensor\(0.5"):
        diffopt.optim.SGD([weight()], lr=0.1, momentum=0.9, nesterov=True, dampening=torch.tensor(0.5, dtype=F64))


def test_adagrad_says_a_group_level_initial_accumulator_value_is_not_used():
    """As torch, the accumulators start from the constructor's value; a tensor set per group silently got
    no gradient (review). The twin keeps torch's values and says so."""
    import warnings

    w = weight()
    with pytest.warns(UserWarning, match="group 0 sets initial_accumulator_value, which is not used"):
        diffopt.optim.Adagrad([{"params": [w], "initial_accumulator_value": 0.3}], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diffopt.optim.Adagrad([w], lr=0.1, initial_accumulator_value=0.3)
        diffopt.optim.from_torch(torch.optim.Adagrad([w], lr=0.1, initial_accumulator_value=0.3))


def test_adamw_refuses_coupled_weight_decay_instead_of_ignoring_it():
    """AdamW(decoupled_weight_decay=False) had been accepted and silently set back to True."""
    with pytest.raises(TypeError, match=r"AdamW: decoupled_weight_decay=False is not available.*Adam\(weight_decay"):
        diffopt.optim.AdamW([weight()], decoupled_weight_decay=False)
    with pytest.raises(TypeError, match="group 1: decoupled_weight_decay=False is not available"):
        diffopt.optim.AdamW([{"params": [weight()]}, {"params": [weight()], "decoupled_weight_decay": False}])
    assert diffopt.optim.AdamW([weight()], decoupled_weight_decay=True).param_groups[0]["decoupled_weight_decay"]


def test_numpy_scalar_hyperparameters_are_accepted_as_torch_accepts_them():
    """np.float32 (unlike np.float64, not a float subclass) had been refused as 'not a number'."""
    init = torch.tensor([1.0, -2.0], dtype=F64)
    twin = diffopt.optim.Adam([init.clone()], lr=np.float32(0.1), betas=(np.float32(0.5), np.float32(0.75)))
    assert type(twin.param_groups[0]["lr"]) is float and type(twin.param_groups[0]["betas"][1]) is float
    # the value, as a Python float (torch keeps the numpy scalar, and numpy >= 2 then computes Adam's step
    # size in float32; torch's betas must be floats or tensors)
    reference = init.clone().requires_grad_()
    torch_opt = torch.optim.Adam([reference], lr=float(np.float32(0.1)), betas=(0.5, 0.75))
    current = init.clone()
    for _ in range(3):
        reference.grad = reference.detach() ** 3
        torch_opt.step()
        (current,) = twin.step(params=[current], grads=[current ** 3])
    assert torch.equal(current, reference.detach())


def test_adafactor_eps_must_be_a_pair():
    with pytest.raises(TypeError, match=r"Adafactor: eps must be a pair \(eps1, eps2\).*got 0.001"):
        diffopt.optim.Adafactor([weight()], eps=1e-3)


def test_centered_rmsprop_with_alpha_zero_is_refused():
    """The centred variance g² − g² is zero up to rounding: NaN or a step of g/eps, in torch.optim too."""
    with pytest.raises(ValueError, match=r"centered=True with alpha=0.*use alpha > 0 or centered=False"):
        diffopt.optim.RMSprop([weight()], alpha=0.0, centered=True)
    diffopt.optim.RMSprop([weight()], alpha=0.0)  # uncentred: v = g², a sign step
