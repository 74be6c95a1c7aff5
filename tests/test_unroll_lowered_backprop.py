"""diffopt.unroll.lowered_backprop: inner gradients of lowered MLPs by backpropagation written out
as task-batched operations equal autograd's (≤ 1e-12 in float64), and the meta-gradients through
them equal the task loop's and the lowered autograd path's (≤ 1e-10), first and second order, for
every activation and loss it covers, tied, shared and frozen weights; anything else falls back."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from diffopt.optim import SGD, Adam
from diffopt.unroll import InnerLoop
from diffopt.unroll.lowered_backprop import ExplicitBackprop

PARITY = 1e-10
GRADIENTS = 1e-12


def activation_of(name: str, slope: float) -> nn.Module:
    return {"relu": nn.ReLU(), "leaky": nn.LeakyReLU(slope), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(),
            "silu": nn.SiLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "elu": nn.ELU(4 * slope),
            "softplus": nn.Softplus(beta=1 + 4 * slope, threshold=2.0), "identity": nn.Identity(),
            "dropout0": nn.Dropout(0.0)}[name]


def mlp(sizes: list[int], activation: str, slope: float, bias: bool, flatten: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if k + 2 < len(sizes):
            layers.append(activation_of(activation, slope))
    return nn.Sequential(*layers).double()


def task_data(tasks: int, shots: int, features: int, outputs: int, loss: str, flatten: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (tasks, shots, 2, features // 2) if flatten else (tasks, shots, features)
    sx = torch.randn(*shape, generator=g, dtype=torch.float64)
    qx = torch.randn(tasks, shots + 2, *shape[2:], generator=g, dtype=torch.float64)
    if loss == "mse":
        return sx, torch.randn(tasks, shots, outputs, generator=g, dtype=torch.float64), qx, torch.randn(
            tasks, shots + 2, outputs, generator=g, dtype=torch.float64)
    sy = torch.randint(0, outputs, (tasks, shots), generator=g)
    qy = torch.randint(0, outputs, (tasks, shots + 2), generator=g)
    if loss == "cross_entropy_ignore":
        sy[:, 0] = -100  # an ignored target in every task: the mean is over the others
    return sx, sy, qx, qy


def loss_of(name: str):
    return F.mse_loss if name == "mse" else (F.cross_entropy if name == "cross_entropy" else nn.CrossEntropyLoss())


def meta_gradients(model, make_optimizer, loss_fn, batch, path: str, mode: str, steps: int):
    """Meta-loss and meta-gradients on one of three paths: "written out", "autograd" (the lowered
    forward, autograd's inner gradient) or "task loop"."""
    model.zero_grad()
    loop = InnerLoop(model, make_optimizer(model), loss_fn, steps=steps, mode=mode,
                     vectorize=path != "task loop")
    if path == "written out":
        assert loop._backprop is not None

        def refuse(*args, **kwargs):
            raise AssertionError("autograd's inner gradient ran where the written-out one applies")
        loop._inner_gradients = refuse
    elif path == "autograd":
        loop._backprop = None
    loss = loop.meta_loss(*batch)
    loss.backward()
    return float(loss.detach()), [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def assert_close(reference, other, tolerance):
    (loss_a, grads_a), (loss_b, grads_b) = reference, other
    assert abs(loss_a - loss_b) <= tolerance * max(1.0, abs(loss_a))
    for a, b in zip(grads_a, grads_b):
        assert (a is None) == (b is None)
        if a is not None:
            assert float((a - b).abs().max()) <= tolerance * max(1.0, float(a.abs().max()))


ACTIVATIONS = ["relu", "leaky", "tanh", "sigmoid", "silu", "gelu", "gelu_tanh", "elu", "softplus"]

OPTIMIZERS = {
    "sgd": lambda model: SGD(model.parameters(), lr=0.1),
    "momentum": lambda model: SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda model: Adam(model.parameters(), lr=0.01),
}


@pytest.mark.parametrize("activation", ACTIVATIONS + ["identity", "dropout0"])  # every one (hypothesis: the rest)
@settings(max_examples=10, deadline=None)
@given(hidden=st.lists(st.integers(1, 6), min_size=0, max_size=3),
       slope=st.floats(0.01, 0.5), bias=st.booleans(), flatten=st.booleans(),
       loss=st.sampled_from(["mse", "cross_entropy", "cross_entropy_ignore"]),
       optimizer=st.sampled_from(sorted(OPTIMIZERS)), mode=st.sampled_from(["second_order", "first_order"]),
       steps=st.integers(1, 3), tasks=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_meta_gradients_equal_autograd_and_the_task_loop(hidden, activation, slope, bias, flatten, loss, optimizer,
                                                         mode, steps, tasks, seed):
    torch.manual_seed(seed)
    model = mlp([4] + hidden + [3], activation, slope, bias, flatten)
    batch = task_data(tasks, 5, 4, 3, loss, flatten, seed)
    args = (model, OPTIMIZERS[optimizer], loss_of(loss), batch)
    written_out = meta_gradients(*args, "written out", mode, steps)
    assert_close(meta_gradients(*args, "autograd", mode, steps), written_out, PARITY)
    assert_close(meta_gradients(*args, "task loop", mode, steps), written_out, PARITY)


@pytest.mark.parametrize("activation", ACTIVATIONS)  # every one: a second derivative missing in torch fails here
@settings(max_examples=6, deadline=None)
@given(slope=st.floats(0.01, 0.5),
       loss=st.sampled_from(["mse", "cross_entropy", "cross_entropy_ignore"]), tasks=st.integers(1, 3),
       seed=st.integers(0, 2 ** 16))
def test_inner_gradients_and_their_derivatives_equal_autograds(activation, slope, loss, tasks, seed):
    torch.manual_seed(seed)
    model = mlp([4, 5, 6, 3], activation, slope, True, False)
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.1), loss_of(loss), vectorize=True)
    sx, sy, _, _ = task_data(tasks, 5, 4, 3, loss, False, seed)
    theta = [p.detach().unsqueeze(0).repeat(tasks, *([1] * p.dim())).requires_grad_() for p in model.parameters()]
    losses, by_position = loop._backprop.loss_and_gradients(theta, sx, sy, loop.loss_fn, range(len(theta)))
    reference_losses, _ = loop.task_losses(theta, [], sx, sy, "inner")
    reference = torch.autograd.grad(reference_losses.sum(), theta, create_graph=True)
    assert float((losses - reference_losses).detach().abs().max()) <= GRADIENTS
    for j, g in enumerate(reference):
        g, ours = g.detach(), by_position[j].detach()
        assert float((ours - g).abs().max()) <= GRADIENTS * max(1.0, float(g.abs().max()))
    # second order: a Hessian-vector product through the written-out gradient is autograd's
    vector = [torch.randn_like(t) for t in theta]
    ours = torch.autograd.grad([by_position[j] for j in range(len(theta))], theta, vector, allow_unused=True)
    theirs = torch.autograd.grad(reference, theta, vector, allow_unused=True)
    for a, b in zip(ours, theirs):
        a = torch.zeros_like(theta[0]) if a is None else a  # ReLU's second derivative is 0: unused there
        b = torch.zeros_like(a) if b is None else b
        assert float((a - b).abs().max()) <= GRADIENTS * max(1.0, float(b.abs().max()))


def test_tied_shared_and_frozen_weights():
    torch.manual_seed(0)
    square = nn.Linear(5, 5).double()
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), square, nn.ReLU(), square, nn.Tanh(), nn.Linear(5, 2)).double()
    params = list(model.parameters())
    params[0].requires_grad_(False)  # frozen: stays put, no gradient
    batch = task_data(3, 5, 4, 2, "mse", False, 1)

    def make(model):  # the last layer shared by every task (not adapted)
        return SGD(params[:4], lr=0.1)

    for mode in ("second_order", "first_order"):
        written_out = meta_gradients(model, make, F.mse_loss, batch, "written out", mode, 2)
        assert_close(meta_gradients(model, make, F.mse_loss, batch, "task loop", mode, 2), written_out, PARITY)
        assert written_out[1][0] is None


@pytest.mark.parametrize("model, loss_fn, options, why", [
    (nn.Sequential(nn.Linear(4, 5), nn.Mish(), nn.Linear(5, 3)), F.mse_loss, {}, "an activation it does not cover"),
    (nn.Sequential(nn.Linear(4, 3)), F.l1_loss, {}, "a loss it does not cover"),
    (nn.Sequential(nn.Linear(4, 3)), F.mse_loss, {"proximal": 0.5}, "iMAML's proximal term"),
])
def test_what_it_does_not_cover_runs_autograd_and_agrees(model, loss_fn, options, why):
    torch.manual_seed(0)
    model = model.double()
    batch = task_data(2, 5, 4, 3, "mse", False, 0)
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.1), loss_fn, vectorize=True, **options)
    carry = loop.initial_carry(2)
    assert loop._written_out_gradients(carry, batch[0], batch[1], True) is None, why
    loop.meta_loss(*batch).backward()
    vectorised = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    InnerLoop(model, SGD(model.parameters(), lr=0.1), loss_fn, vectorize=False, **options).meta_loss(*batch).backward()
    for a, b in zip(vectorised, model.parameters()):
        assert float((a - b.grad).abs().max()) <= PARITY


def test_targets_of_another_shape_still_get_the_broadcasting_error():
    model = nn.Sequential(nn.Linear(4, 1)).double()
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.1), F.mse_loss, vectorize=True)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="broadcast"):
        loop.meta_loss(x, torch.randn(2, 5, dtype=torch.float64), x, torch.randn(2, 5, 1, dtype=torch.float64))


def test_build_refuses_models_it_does_not_cover():
    from diffopt.unroll.functional import FunctionalModel  # noqa: F401  (the lowering's caller)
    from diffopt.unroll.lowered import lower

    def built(model):
        layout = {id(p): j for j, p in enumerate(model.parameters())}
        lowered, _ = lower(model, lambda p: layout[id(p)], [])
        return ExplicitBackprop.build(lowered)

    assert built(nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 1))) is not None
    assert built(nn.Sequential(nn.Linear(4, 2), nn.Flatten(), nn.Linear(2, 1))) is None  # Flatten not first
    assert built(nn.Sequential(nn.Conv1d(1, 2, 3))) is None
    assert built(nn.Sequential(nn.ReLU())) is None  # no Linear: nothing to write out
