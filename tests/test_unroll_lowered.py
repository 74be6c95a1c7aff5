"""diffopt.unroll.lowered: task-batched kernels (baddbmm, grouped convolutions, BatchNorm over
T·C channels) give the task loop's meta-gradients in float64, for every layer they cover, every
BatchNorm policy, shared (not adapted) and tied weights; anything else falls back to vmap with
the reason; the per-task losses without vmap equal vmap's; the deferred non-finite checks read
once per meta-step and still name the step, task and tensor."""
from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from diffopt.optim import SGD, Adam, NonFiniteError
from diffopt.unroll import InnerLoop
from diffopt.unroll.lowered import lower, per_task_loss
from diffopt.unroll.functional import FunctionalModel

TOLERANCE = 1e-10


def meta_gradients(model, optimizer, loss_fn, batch, vectorize, **options):
    model.zero_grad()
    loop = InnerLoop(model, optimizer(model), loss_fn, vectorize=vectorize, **options)
    loss = loop.meta_loss(*batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() if p.grad is not None else None for p in model.parameters()], loop


def assert_same_as_task_loop(model, optimizer, loss_fn, batch, **options):
    loss_loop, grads_loop, _ = meta_gradients(model, optimizer, loss_fn, batch, False, **options)
    loss_low, grads_low, loop = meta_gradients(model, optimizer, loss_fn, batch, True, **options)
    assert loop.vectorize_reason.startswith("task-batched kernels"), loop.vectorize_reason
    assert abs(float(loss_loop - loss_low)) < TOLERANCE
    for a, b in zip(grads_loop, grads_low):
        assert (a is None) == (b is None)
        if a is not None:
            assert float((a - b).abs().max()) < TOLERANCE * max(1.0, float(a.abs().max()))


def sgd(lr=0.1, subset=None):
    def make(model):
        params = list(model.parameters())
        return SGD(params if subset is None else [params[i] for i in subset], lr=lr)
    return make


def classification(tasks, shots, shape, ways, seed):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(tasks, shots, *shape, generator=g, dtype=torch.float64)
    qx = torch.randn(tasks, shots + 1, *shape, generator=g, dtype=torch.float64)
    sy = torch.randint(0, ways, (tasks, shots), generator=g)
    qy = torch.randint(0, ways, (tasks, shots + 1), generator=g)
    return sx, sy, qx, qy


ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus, nn.Sigmoid, nn.LeakyReLU]


@settings(max_examples=25, deadline=None)
@given(hidden=st.lists(st.integers(1, 7), min_size=0, max_size=3), activation=st.sampled_from(ACTIVATIONS),
       bias=st.booleans(), steps=st.integers(1, 3), tasks=st.integers(1, 4), mode=st.sampled_from(
           ["second_order", "first_order"]), extra_dim=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_mlps_match_the_task_loop(hidden, activation, bias, steps, tasks, mode, extra_dim, seed):
    torch.manual_seed(seed)
    sizes = [3] + hidden + [2]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b, bias=bias), activation()]
    model = nn.Sequential(*layers[:-1]).double()
    g = torch.Generator().manual_seed(seed)
    shape = (tasks, 5, 2, 3) if extra_dim else (tasks, 5, 3)  # (examples, 2 tokens, features)
    sx, qx = torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(*shape, generator=g,
                                                                                 dtype=torch.float64)
    sy, qy = torch.tanh(sx[..., :2]), torch.cos(qx[..., :2])
    assert_same_as_task_loop(model, sgd(), F.mse_loss, (sx, sy, qx, qy), steps=steps, mode=mode)


@settings(max_examples=20, deadline=None)
@given(policy=st.sampled_from(["transductive", "frozen", "per_task"]), stride=st.integers(1, 2),
       padding=st.sampled_from([0, 1, "same"]), groups=st.sampled_from([1, 2]), dilation=st.integers(1, 2),
       pool=st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(2), nn.AdaptiveMaxPool2d(1)]),
       momentum=st.sampled_from([0.1, None]), tasks=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_conv_nets_match_the_task_loop_under_every_batchnorm_policy(policy, stride, padding, groups, dilation,
                                                                      pool, momentum, tasks, seed):
    if padding == "same":
        stride = 1  # (torch refuses strided 'same' padding)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=stride, padding=padding, groups=groups, dilation=dilation),
        nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(), pool, nn.Flatten(),
    )
    features = model(torch.zeros(1, 2, 9, 9)).shape[1]
    model = nn.Sequential(*model, nn.Linear(features, 3)).double()
    with torch.no_grad():  # running statistics other than (0, 1), as after training
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    batch = classification(tasks, 4, (2, 9, 9), 3, seed)
    assert_same_as_task_loop(model, sgd(0.3), F.cross_entropy, batch, steps=2, batchnorm=policy)


@pytest.mark.parametrize("conv, shape", [(nn.Conv1d(2, 3, 3, padding=1), (2, 7)),
                                         (nn.Conv3d(2, 3, 2), (2, 3, 3, 3))])
def test_one_and_three_dimensional_convolutions(conv, shape):
    torch.manual_seed(0)
    body = nn.Sequential(conv, nn.Tanh(), nn.Flatten())
    features = body(torch.zeros(1, *shape)).shape[1]
    model = nn.Sequential(*body, nn.Linear(features, 2)).double()
    assert_same_as_task_loop(model, sgd(), F.cross_entropy, classification(3, 4, shape, 2, 1), steps=2)


def test_shared_weights_and_a_batchnorm1d_on_features():
    """Only the head adapted (ANIL-like): the body's weights are shared, without a task dimension."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    assert_same_as_task_loop(model, sgd(0.5, subset=[4, 5]), nn.CrossEntropyLoss(), classification(3, 5, (4,), 3, 2),
                             steps=3)
    # adapted weight with a shared bias, and the reverse
    assert_same_as_task_loop(model, sgd(0.5, subset=[0, 5]), F.cross_entropy, classification(3, 5, (4,), 3, 3),
                             steps=2)


def test_tied_weights_and_adam():
    torch.manual_seed(2)
    first, last = nn.Linear(3, 3), nn.Linear(3, 3)
    last.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), last).double()
    g = torch.Generator().manual_seed(0)
    batch = tuple(torch.randn(2, 6, 3, generator=g, dtype=torch.float64) for _ in range(4))
    assert_same_as_task_loop(model, lambda m: Adam(m.parameters(), lr=0.05), F.mse_loss, batch, steps=3)


def test_a_module_placed_twice_runs_twice():
    # Sequential runs every entry of _modules; named_children() yields a repeated module once
    torch.manual_seed(0)
    square = nn.Linear(5, 5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), square, nn.ReLU(), square, nn.Tanh(), nn.Linear(5, 2)).double()
    batch = tuple(torch.randn(3, 5, d, dtype=torch.float64) for d in (4, 2, 4, 2))
    for mode in ("second_order", "first_order"):
        assert_same_as_task_loop(model, sgd(), F.mse_loss, batch, steps=2, mode=mode)


class Shift(nn.Module):
    def forward(self, x):
        return 2.0 * x + 1.0


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("hook", ["forward", "pre"])
def test_forward_hooks_run_in_every_path(vectorize, hook):
    # A hook changes the function: the inner loop must evaluate it. Kernels and higher's copy do not call
    # the modules, so a hooked model runs through functional_call and is not lowered.
    torch.manual_seed(0)
    hooked = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    first, last = copy.deepcopy(hooked[0]), copy.deepcopy(hooked[2])  # the same weights, without the hook
    plain = nn.Sequential(first, *([Shift()] if hook == "forward" else []), nn.Tanh(),
                          *([Shift()] if hook == "pre" else []), last)
    if hook == "forward":
        hooked[0].register_forward_hook(lambda module, inputs, output: 2.0 * output + 1.0)
    else:
        hooked[2].register_forward_pre_hook(lambda module, inputs: (2.0 * inputs[0] + 1.0,))
    batch = tuple(torch.randn(3, 5, d, dtype=torch.float64) for d in (4, 2, 4, 2))
    loss_ref, grads_ref, _ = meta_gradients(plain, sgd(), F.mse_loss, batch, False, steps=2)
    loss, grads, loop = meta_gradients(hooked, sgd(), F.mse_loss, batch, vectorize, steps=2)
    assert loop.backend == "functional_call" and "forward hooks" in loop.backend_reason
    assert "forward hooks" in loop.patched.lowered_reason
    assert abs(float(loss - loss_ref)) < TOLERANCE
    for a, b in zip(grads_ref, grads):
        assert float((a - b).abs().max()) < TOLERANCE


def test_higher_with_a_hooked_model_is_refused_naming_the_module():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    model[2].register_forward_pre_hook(lambda module, inputs: inputs)
    with pytest.raises(ValueError, match=r"backend='higher': 2 \(Linear\) has forward hooks.*functional_call"):
        InnerLoop(model, SGD(model.parameters(), lr=0.1), backend="higher")


def test_vmap_and_the_lowered_kernels_agree_and_vmap_can_be_forced():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    g = torch.Generator().manual_seed(0)
    batch = tuple(torch.randn(4, 5, d, generator=g, dtype=torch.float64) for d in (3, 2, 3, 2))
    _, lowered, loop = meta_gradients(model, sgd(), F.mse_loss, batch, True, steps=2)
    _, vmapped, vloop = meta_gradients(model, sgd(), F.mse_loss, batch, "vmap", steps=2)
    assert "baddbmm" not in loop.vectorize_reason and "Linear → ReLU → Linear" in loop.vectorize_reason
    assert vloop.vectorize_reason == "vmap: requested (vectorize='vmap')" and vloop.patched.lowered is None
    for a, b in zip(lowered, vmapped):
        assert float((a - b).abs().max()) < TOLERANCE


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(x) * 2


@pytest.mark.parametrize("model, reason", [
    (Custom(), "model (Custom) has no task-batched kernel here"),
    (nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)), "1 (Dropout) has no task-batched kernel here"),
    (nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")), "pads with 'reflect'"),
    (nn.Sequential(nn.Linear(3, 3), nn.Flatten(0)), "flattens dimensions 0..-1"),
    (nn.Sequential(nn.LSTM(3, 3)), "0 (LSTM) has no task-batched kernel here"),
])
def test_other_modules_run_under_vmap_with_the_reason(model, reason):
    fm = FunctionalModel(model)
    assert fm.lowered is None and reason in fm.lowered_reason
    lowered, why = lower(model, fm.layout.position, [])
    assert lowered is None and why == fm.lowered_reason


def test_a_custom_module_still_vectorises_under_vmap():
    torch.manual_seed(0)
    model = Custom().double()
    g = torch.Generator().manual_seed(0)
    batch = tuple(torch.randn(3, 4, d, generator=g, dtype=torch.float64) for d in (3, 2, 3, 2))
    _, grads_vmap, loop = meta_gradients(model, sgd(), F.mse_loss, batch, True, steps=2)
    _, grads_loop, _ = meta_gradients(model, sgd(), F.mse_loss, batch, False, steps=2)
    assert loop.vectorize_reason.startswith("vmap")
    for a, b in zip(grads_vmap, grads_loop):
        assert float((a - b).abs().max()) < TOLERANCE


@pytest.mark.parametrize("loss_fn", [F.mse_loss, nn.MSELoss()])
def test_per_task_mse_equals_vmap(loss_fn):
    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(4, 5, 2, generator=g, dtype=torch.float64), torch.randn(4, 5, 2, generator=g,
                                                                                  dtype=torch.float64)
    torch.testing.assert_close(per_task_loss(loss_fn, out, y), torch.func.vmap(loss_fn)(out, y), rtol=0, atol=1e-15)
    assert per_task_loss(loss_fn, out, y[..., :1]) is None  # broadcasting stays on the checked per-task path


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(ignore_index=1)])
def test_per_task_cross_entropy_equals_the_task_by_task_mean(loss_fn):
    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(3, 6, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (3, 6), generator=g)
    expected = torch.stack([loss_fn(o, t) for o, t in zip(out, y)])
    torch.testing.assert_close(per_task_loss(loss_fn, out, y), expected, rtol=0, atol=1e-15)
    assert per_task_loss(nn.CrossEntropyLoss(label_smoothing=0.1), out, y) is None
    assert per_task_loss(lambda a, b: F.cross_entropy(a, b), out, y) is None


class CountReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("vectorize", [True, False])
def test_non_finite_checks_read_once_per_meta_step(vectorize):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.1), steps=5, vectorize=vectorize)
    batch = tuple(torch.randn(3, 4, d) for d in (3, 2, 3, 2))
    with CountReads() as mode:
        loop.meta_loss(*batch)
    assert mode.counts["aten._local_scalar_dense"] == 1  # one read of one flag, not two per inner step


@pytest.mark.parametrize("vectorize", [True, False])
def test_finite_float16_weights_whose_sum_overflows_are_not_reported(vectorize):
    # Every weight is 50 (finite in float16) but a layer's sum, 320,000, is past float16's
    # 65,504: the one-read check's sum overflows, and must be confirmed element by element.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1600), nn.ReLU(), nn.Linear(1600, 1)).half()
    with torch.no_grad():
        model[0].weight.fill_(50.0)
    assert torch.isinf(model[0].weight.sum())
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.0), steps=2, vectorize=vectorize)
    x, y = torch.randn(2, 5, 4).half(), torch.randn(2, 5, 1).half()
    with CountReads() as mode:
        loss = loop.meta_loss(x, y, x, y)
    assert torch.isfinite(loss)
    # the overflowing sum, then the confirmation: one read per checked tensor (the inner losses, 4 weights)
    assert mode.counts["aten._local_scalar_dense"] == 1 + 1 + 4


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("bad", ["support", "learning rate"])
def test_deferred_checks_name_the_first_bad_step_task_and_tensor(vectorize, bad):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    sx, sy, qx, qy = (torch.randn(3, 4, d, dtype=torch.float64) for d in (3, 2, 3, 2))
    if bad == "support":
        sy[1, 0, 0] = float("nan")
        lr, message = 0.1, r"inner loss is not finite for task\(s\) \[1\] at inner step 0"
    else:  # a learning rate that overflows after the first step
        lr, message = 1e300, r"inner (loss|gradient of .*) is not finite for task\(s\) \[0, 1, 2\] at inner step 1"
    loop = InnerLoop(model, SGD(model.parameters(), lr=lr), steps=3, vectorize=vectorize)
    with pytest.raises(NonFiniteError, match=message):
        loop.meta_loss(sx, sy, qx, qy)
    with pytest.raises(NonFiniteError, match=message):
        loop.adapt(sx, sy)
    loop.check_finite = False
    loop.meta_loss(sx, sy, qx, qy)  # off: no check, no error
