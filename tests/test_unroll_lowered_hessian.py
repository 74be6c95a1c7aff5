"""diffopt.unroll.lowered_hessian: the second-order SGD step of lowered MLPs with its backward written out.

Checked in float64 against independent references: the written-out Hessian-vector products
against autograd's double backward (≤ 1e-12), and the meta-gradients (initial weights and
learnable learning rates) against autograd's second order on the same lowered model and against
the task loop (≤ 1e-10), for every activation, both losses, every form of SGD's hyperparameters
(numbers, learnable scalars, per-element rates, per-parameter lists, per-step schedules, weight
decay, maximise), shared and tied weights; higher derivatives (``create_graph``) through the
step, ``gradcheck``/``gradgradcheck``, and the other modes; what it does not cover falls back.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from diffopt.optim import SGD, Adam
from diffopt.optim._hyper import PerParameter, Schedule
from diffopt.unroll import InnerLoop
from diffopt.unroll.lowered_hessian import ExplicitHessian

from test_unroll_lowered_backprop import ACTIVATIONS, loss_of, mlp, task_data

PARITY = 1e-10
PRODUCTS = 1e-12


def _max_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def graph_nodes(loss: torch.Tensor) -> set[str]:
    """The names of the autograd nodes in ``loss``'s graph."""
    seen, stack, names = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack += [next_node for next_node, _ in node.next_functions]
    return names


def uses_written_out_step(loss: torch.Tensor) -> bool:
    """Whether the meta-loss's graph contains the written-out step."""
    return "SGDStepBackward" in graph_nodes(loss)


LR_FORMS = ["number", "learnable scalar", "per element", "per parameter", "schedule"]


def sgd_factory(form: str, weight_decay: float, maximize: bool, steps: int, adapted=slice(None)):
    """``(make_optimizer, learnable tensors)`` for one form of SGD's learning rate."""
    learnable: list[torch.Tensor] = []

    def make(model: nn.Module) -> SGD:
        params = list(model.parameters())[adapted]
        if form == "number":
            lr = 0.1
        elif form == "learnable scalar":
            lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
            learnable[:] = [lr]
        elif form == "per element":  # Meta-SGD: one rate per weight element, one group per tensor
            rates = [(0.1 + 0.05 * torch.linspace(0, 1, p.numel(), dtype=p.dtype).reshape(p.shape)).requires_grad_()
                     for p in params]
            learnable[:] = rates
            return SGD([{"params": [p], "lr": r} for p, r in zip(params, rates)], lr=0.1,
                       weight_decay=weight_decay, maximize=maximize)
        elif form == "per parameter":
            rates = [torch.tensor(0.05 + 0.02 * k, dtype=torch.float64, requires_grad=True) for k in range(len(params))]
            learnable[:] = rates
            lr = PerParameter(rates)
        else:  # a learnable rate per step
            schedule = torch.linspace(0.12, 0.06, steps, dtype=torch.float64).requires_grad_()
            learnable[:] = [schedule]
            lr = Schedule(schedule)
        return SGD(params, lr=lr, weight_decay=weight_decay, maximize=maximize)

    return make, learnable


def meta_gradients(model, make_optimizer, learnable, loss_fn, batch, path: str, steps: int, mode="second_order"):
    """Meta-loss, meta-gradients of the initial weights and of ``learnable``, and whether the
    written-out step ran, on "written out", "autograd" (the inner gradient written out, its second
    order and the query loss's gradient left to autograd) or "task loop"."""
    model.zero_grad()
    optimizer = make_optimizer(model)
    loop = InnerLoop(model, optimizer, loss_fn, steps=steps, mode=mode, vectorize=path != "task loop")
    if path == "autograd":
        loop._hessian = None
    loss = loop.meta_loss(*batch)
    wrt = [p for p in model.parameters() if p.requires_grad] + list(learnable)
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return float(loss.detach()), grads, uses_written_out_step(loss)


def assert_close(reference, other, tolerance=PARITY):
    assert abs(reference[0] - other[0]) <= tolerance * max(1.0, abs(reference[0]))
    for a, b in zip(reference[1], other[1]):
        assert (a is None) == (b is None)
        if a is not None:
            assert _max_relative(b, a) <= tolerance


@pytest.mark.parametrize("activation", ACTIVATIONS + ["identity"])
@settings(max_examples=8, deadline=None)
@given(hidden=st.lists(st.integers(1, 6), min_size=0, max_size=3), slope=st.floats(0.01, 0.5),
       bias=st.booleans(), flatten=st.booleans(), loss=st.sampled_from(["mse", "cross_entropy", "cross_entropy_ignore"]),
       form=st.sampled_from(LR_FORMS), weight_decay=st.sampled_from([0.0, 0.03]), maximize=st.booleans(),
       steps=st.integers(1, 3), tasks=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_meta_gradients_equal_autograds_second_order_and_the_task_loop(
        activation, hidden, slope, bias, flatten, loss, form, weight_decay, maximize, steps, tasks, seed):
    torch.manual_seed(seed)
    model = mlp([4] + hidden + [3], activation, slope, bias, flatten)
    batch = task_data(tasks, 5, 4, 3, loss, flatten, seed)
    make, learnable = sgd_factory(form, weight_decay, maximize, steps)
    args = (model, make, learnable, loss_of(loss), batch)
    written_out = meta_gradients(*args, "written out", steps)
    assert written_out[2], "the written-out step did not run"
    autograd = meta_gradients(*args, "autograd", steps)
    assert not autograd[2]
    assert_close(autograd, written_out)
    assert_close(meta_gradients(*args, "task loop", steps), written_out)


@pytest.mark.parametrize("activation", ACTIVATIONS)  # every σ'': a wrong second derivative fails here
@settings(max_examples=6, deadline=None)
@given(slope=st.floats(0.01, 0.5), loss=st.sampled_from(["mse", "cross_entropy", "cross_entropy_ignore"]),
       tasks=st.integers(1, 3), shared_last=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_hessian_vector_products_equal_autograds_double_backward(activation, slope, loss, tasks, shared_last, seed):
    torch.manual_seed(seed)
    model = mlp([4, 5, 6, 3], activation, slope, True, False)
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.1), loss_of(loss), vectorize=True)
    hessian = loop._hessian
    sx, sy, _, _ = task_data(tasks, 5, 4, 3, loss, False, seed)
    theta = [p.detach().unsqueeze(0).repeat(tasks, *([1] * p.dim())).requires_grad_() for p in model.parameters()]
    if shared_last:  # the last layer shared by the tasks (2-D), as a weight that is not adapted
        theta[-2:] = [p.detach().clone().requires_grad_() for p in list(model.parameters())[-2:]]
    with torch.no_grad():
        losses, grads, tape = hessian.record(theta, sx, sy, loop.loss_fn)
    reference_losses, _ = loop.task_losses(theta, [], sx, sy, "inner")
    reference = torch.autograd.grad(reference_losses.sum(), theta, create_graph=True)
    assert float((losses - reference_losses.detach()).abs().max()) <= PRODUCTS
    for j, g in enumerate(reference):
        ours = grads[j] if g.dim() == grads[j].dim() else grads[j].sum(0)
        assert _max_relative(ours, g.detach()) <= PRODUCTS
    adapted = range(len(theta) - 2) if shared_last else range(len(theta))
    direction = {j: torch.randn_like(theta[j]) for j in adapted}
    with torch.no_grad():
        ours = hessian.hessian_vector(theta, tape, direction, loop.loss_fn)
    vector = [direction.get(j, torch.zeros_like(t)) for j, t in enumerate(theta)]
    theirs = torch.autograd.grad(reference, theta, vector, allow_unused=True)
    for j, (t, b) in enumerate(zip(theta, theirs)):
        a = ours.get(j)
        a = torch.zeros_like(t) if a is None else (a.sum(0) if a.dim() > t.dim() else a)
        b = torch.zeros_like(t) if b is None else b
        assert _max_relative(a, b) <= PRODUCTS


def test_shared_and_tied_weights():
    """A weight used twice (tied) and a last layer shared by the tasks (not adapted, learnable)."""
    torch.manual_seed(0)
    square = nn.Linear(5, 5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), square, nn.Sigmoid(), square, nn.SiLU(), nn.Linear(5, 2)).double()
    batch = task_data(3, 5, 4, 2, "mse", False, 1)
    for form in ("number", "learnable scalar"):
        make, learnable = sgd_factory(form, 0.0, False, 2, adapted=slice(0, 4))
        args = (model, make, learnable, F.mse_loss, batch)
        written_out = meta_gradients(*args, "written out", 2)
        assert written_out[2]
        assert_close(meta_gradients(*args, "autograd", 2), written_out)
        assert_close(meta_gradients(*args, "task loop", 2), written_out)


def test_higher_derivatives_through_the_step_are_exact():
    """``create_graph=True`` through the written-out step (the backward recomputes the step with a
    graph): gradcheck and gradgradcheck of the meta-loss in a learnable rate and a weight, and the
    Hessian of the meta-loss in the rates equal to autograd's second-order path's."""
    torch.manual_seed(3)
    model = mlp([3, 4, 2], "tanh", 0.1, True, False)
    batch = task_data(2, 4, 3, 2, "mse", False, 3)
    weight = list(model.parameters())[0]

    def meta_loss(lr: torch.Tensor, first_weight: torch.Tensor, written_out: bool = True) -> torch.Tensor:
        loop = InnerLoop(model, SGD(model.parameters(), lr=lr), F.mse_loss, steps=2, vectorize=True)
        if not written_out:
            loop._hessian = None
        theta = [first_weight] + list(model.parameters())[1:]
        loss = loop.rebind(theta).meta_loss(*batch)
        assert uses_written_out_step(loss) == written_out
        return loss

    lr = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    first = weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w: meta_loss(a.squeeze(), w), (lr, first))
    assert torch.autograd.gradgradcheck(lambda a, w: meta_loss(a.squeeze(), w), (lr, first))
    rates = torch.tensor([0.2, 0.3], dtype=torch.float64)
    hessians = [torch.autograd.functional.hessian(
        lambda r: meta_loss(r[0], first * (1 + r[1]), written_out), rates) for written_out in (True, False)]
    assert _max_relative(hessians[0], hessians[1]) <= PARITY


@pytest.mark.parametrize("mode", ["truncated", "checkpointed", "forward"])
def test_the_other_modes_that_unroll_in_reverse_or_forward_agree(mode):
    torch.manual_seed(4)
    model = mlp([4, 6, 3], "gelu", 0.1, True, False)
    batch = task_data(3, 5, 4, 3, "cross_entropy", False, 4)
    lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    options = {"truncated": {"truncate": 2}, "checkpointed": {"segment": 2}, "forward": {"forward_wrt": [lr]}}[mode]
    results = []
    for written_out in (True, False):
        model.zero_grad()
        loop = InnerLoop(model, SGD(model.parameters(), lr=lr), F.cross_entropy, steps=3, mode=mode, vectorize=True,
                         **options)
        if not written_out:
            loop._hessian = None
        loss = loop.meta_loss(*batch)
        wrt = [lr] if mode == "forward" else [lr, *model.parameters()]
        results.append((float(loss.detach()), torch.autograd.grad(loss, wrt)))
    assert_close(results[1], results[0])


@pytest.mark.parametrize("make, why", [
    (lambda m: SGD(m.parameters(), lr=0.1, momentum=0.9), "momentum"),
    (lambda m: SGD(m.parameters(), lr=0.1, clip_grad_norm=1.0), "gradient clipping"),
    (lambda m: SGD(m.parameters(), lr=0.1, weight_decay=torch.tensor(0.1, dtype=torch.float64,
                                                                     requires_grad=True)), "a learnable weight decay"),
    (lambda m: Adam(m.parameters(), lr=0.01), "another update rule"),
])
def test_steps_it_does_not_write_out_use_autograd_and_agree(make, why):
    torch.manual_seed(5)
    model = mlp([4, 5, 3], "relu", 0.1, True, False)
    batch = task_data(2, 5, 4, 3, "mse", False, 5)
    vectorised = meta_gradients(model, make, [], F.mse_loss, batch, "written out", 2)
    assert not vectorised[2], why
    assert_close(meta_gradients(model, make, [], F.mse_loss, batch, "task loop", 2), vectorised)


def test_frozen_weights_and_first_order_do_not_use_it():
    torch.manual_seed(6)
    model = mlp([4, 5, 3], "tanh", 0.1, True, False)
    batch = task_data(2, 5, 4, 3, "mse", False, 6)
    make, _ = sgd_factory("number", 0.0, False, 1)
    assert not meta_gradients(model, make, [], F.mse_loss, batch, "written out", 1, mode="first_order")[2]
    list(model.parameters())[0].requires_grad_(False)
    frozen = meta_gradients(model, make, [], F.mse_loss, batch, "written out", 1)
    assert not frozen[2]
    assert_close(meta_gradients(model, make, [], F.mse_loss, batch, "task loop", 1), frozen)


def test_every_activation_that_lowers_has_its_second_derivative_and_every_lowered_mlp_a_hessian():
    from diffopt.unroll.lowered_backprop import DERIVATIVES
    piecewise_linear = {nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout}
    for kind, make in DERIVATIVES.items():
        layer = kind(0.0) if kind is nn.Dropout else kind()
        assert (make(layer)[2] is None) == (kind in piecewise_linear), kind
    model = mlp([4, 5, 3], "relu", 0.1, True, False)
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.1), F.mse_loss, vectorize=True)
    assert isinstance(loop._hessian, ExplicitHessian)
    assert ExplicitHessian.build(None) is None


@pytest.mark.parametrize("mode", ["second_order", "first_order"])
def test_the_query_loss_is_written_out_too_and_only_where_it_applies(mode):
    """The meta-loss's query losses go through ``TaskLosses`` (their gradient computed with them);
    a query loss it does not cover (``l1``) and evaluation without a graph do not."""
    torch.manual_seed(7)
    model = mlp([4, 5, 3], "tanh", 0.1, True, False)
    sx, sy, qx, qy = task_data(2, 5, 4, 3, "mse", False, 7)
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.1), F.mse_loss, steps=1, mode=mode, vectorize=True)
    assert "TaskLossesBackward" in graph_nodes(loop.meta_loss(sx, sy, qx, qy))
    other = loop.meta_loss(sx, sy, qx, qy, loss_fn=F.l1_loss)
    assert "TaskLossesBackward" not in graph_nodes(other)
    model.zero_grad()
    other.backward()
    by_loop = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    InnerLoop(model, SGD(model.parameters(), lr=0.1), F.mse_loss, steps=1, mode=mode,
              vectorize=False).meta_loss(sx, sy, qx, qy, loss_fn=F.l1_loss).backward()
    for a, p in zip(by_loop, model.parameters()):
        assert _max_relative(a, p.grad) <= PARITY
    with torch.no_grad():
        assert loop.meta_loss(sx, sy, qx, qy).grad_fn is None


# forward-mode AD loads jit decompositions, which warn on torch 2.13
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_dual_numbers_take_the_autograd_path():
    """Under ``torch.autograd.forward_ad`` (dual numbers through the whole meta-loss) the engine
    does not use the written-out Functions, which have no ``jvp``: the tangent is the derivative."""
    import torch.autograd.forward_ad as fwAD
    torch.manual_seed(8)
    model = mlp([3, 4, 2], "tanh", 0.1, True, False)
    batch = task_data(2, 4, 3, 2, "mse", False, 8)
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss = InnerLoop(model, SGD(model.parameters(), lr=lr), F.mse_loss, steps=2, vectorize=True).meta_loss(*batch)
    assert uses_written_out_step(loss)
    (expected,) = torch.autograd.grad(loss, lr)
    with fwAD.dual_level():
        dual = fwAD.make_dual(lr.detach(), torch.tensor(1.0, dtype=torch.float64))
        loop = InnerLoop(model, SGD(model.parameters(), lr=dual), F.mse_loss, steps=2, vectorize=True)
        tangent = fwAD.unpack_dual(loop.meta_loss(*batch)).tangent.detach()
    assert abs(float(tangent) - float(expected)) <= PARITY * max(1.0, abs(float(expected)))


def reference_and_written_out(model, make, batch, wrt_of, steps=1, mode="second_order", check_finite=True,
                              reduce=None):
    """Gradients of ``wrt_of(model)`` on the task loop and the vectorised (written-out) path."""
    out = []
    for vectorize in (False, True):
        loop = InnerLoop(model, make(model), F.mse_loss if batch[1].is_floating_point() else F.cross_entropy,
                         steps=steps, mode=mode, vectorize=vectorize, check_finite=check_finite)
        losses = loop.query_losses(loop.adapt(batch[0], batch[1]), batch[2], batch[3])
        loss = losses.mean() if reduce is None else reduce(losses)
        out.append((float(loss.detach()), torch.autograd.grad(loss, wrt_of(model), allow_unused=True)))
    return out


@pytest.mark.parametrize("mode", ["second_order", "first_order"])
def test_targets_that_require_grad_get_their_gradient(mode):
    """Targets that require grad (a learned label, a generated target) are differentiated: the
    written-out Functions stand aside for them."""
    torch.manual_seed(9)
    model = mlp([4, 5, 3], "tanh", 0.1, True, False)
    sx, sy, qx, qy = task_data(2, 5, 4, 3, "mse", False, 9)
    sy, qy = sy.clone().requires_grad_(), qy.clone().requires_grad_()
    reference, ours = reference_and_written_out(model, lambda m: SGD(m.parameters(), lr=0.1), (sx, sy, qx, qy),
                                                lambda m: [sy, qy, *m.parameters()], mode=mode)
    assert ours[1][1] is not None  # the query targets
    assert (ours[1][0] is not None) == (mode == "second_order")  # first order: inner gradients are constants
    assert_close(reference, ours)


@pytest.mark.parametrize("later_lr", ["equal 0-dim tensor", "learnable equal 0-dim tensor", "per element"])
def test_groups_mixing_a_number_and_a_tensor_learning_rate(later_lr):
    """A plain-number lr on the first group and a tensor on another (equal in value or not):
    meta-gradients, and the cross derivative ∂²L/∂W∂lr under create_graph, equal autograd's."""
    torch.manual_seed(10)
    model = mlp([4, 5, 3], "tanh", 0.1, True, False)
    batch = task_data(2, 5, 4, 3, "mse", False, 10)
    params = list(model.parameters())
    rate = {"equal 0-dim tensor": torch.tensor(0.1, dtype=torch.float64),
            "learnable equal 0-dim tensor": torch.tensor(0.1, dtype=torch.float64, requires_grad=True),
            "per element": torch.full_like(params[2], 0.1)}[later_lr]

    def make(m):
        p = list(m.parameters())
        return SGD([{"params": p[:2], "lr": 0.1}, {"params": p[2:3], "lr": rate}, {"params": p[3:], "lr": 0.1}],
                   lr=0.1)

    learnable = [rate] if rate.requires_grad else []
    written_out = meta_gradients(model, make, learnable, F.mse_loss, batch, "written out", 2)
    assert written_out[2]
    assert_close(meta_gradients(model, make, learnable, F.mse_loss, batch, "autograd", 2), written_out)
    assert_close(meta_gradients(model, make, learnable, F.mse_loss, batch, "task loop", 2), written_out)
    if rate.requires_grad:
        cross = []
        for hessian_on in (True, False):
            loop = InnerLoop(model, make(model), F.mse_loss, steps=2, vectorize=True)
            if not hessian_on:
                loop._hessian = None
            (g,) = torch.autograd.grad(loop.meta_loss(*batch), params[0], create_graph=True)
            cross.append(torch.autograd.grad(g.sum(), rate)[0])
        assert _max_relative(cross[0], cross[1]) <= PARITY


def test_a_task_whose_cross_entropy_targets_are_all_ignored_gets_zero_gradient():
    """torch's cross-entropy gives such a task a NaN loss and a zero gradient: a query task masked
    out of the meta-loss leaves the others' meta-gradients finite, and a support task with no
    counted target is not adapted (check_finite=False), as on the task loop."""
    torch.manual_seed(11)
    model = mlp([4, 5, 3], "tanh", 0.1, True, False)
    sx, sy, qx, qy = task_data(3, 5, 4, 3, "cross_entropy", False, 11)
    qy[1] = -100
    reference, ours = reference_and_written_out(model, lambda m: SGD(m.parameters(), lr=0.1), (sx, sy, qx, qy),
                                                lambda m: list(m.parameters()),
                                                reduce=lambda losses: losses[~losses.isnan()].mean())
    assert all(bool(torch.isfinite(g).all()) for g in ours[1])
    assert_close(reference, ours)
    qy[1] = 0
    sy[2] = -100
    reference, ours = reference_and_written_out(model, lambda m: SGD(m.parameters(), lr=0.1), (sx, sy, qx, qy),
                                                lambda m: list(m.parameters()), steps=2, check_finite=False)
    assert all(bool(torch.isfinite(g).all()) for g in ours[1])
    assert_close(reference, ours)


def test_an_sgd_subclass_that_changes_the_update_is_not_bypassed():
    class HalfSteps(SGD):
        def update(self, params, grads, states, step):
            new, states = super().update(params, grads, states, step)
            return [p + 0.5 * (n - p) for p, n in zip(params, new)], states

    torch.manual_seed(12)
    model = mlp([4, 5, 3], "tanh", 0.1, True, False)
    batch = task_data(2, 5, 4, 3, "mse", False, 12)
    make = lambda m: HalfSteps(m.parameters(), lr=0.1)  # noqa: E731
    vectorised = meta_gradients(model, make, [], F.mse_loss, batch, "written out", 2)
    assert not vectorised[2]
    assert_close(meta_gradients(model, make, [], F.mse_loss, batch, "task loop", 2), vectorised)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
@settings(max_examples=6, deadline=None)
@given(loss=st.sampled_from(["mse", "cross_entropy", "cross_entropy_ignore"]), flatten=st.booleans(),
       mode=st.sampled_from(["second_order", "first_order"]), steps=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_inputs_that_require_grad_anil_features(activation, loss, flatten, mode, steps, seed):
    """Support and query inputs computed by a meta-learned body (ANIL): the body's meta-gradient
    reaches it through the written-out step's mixed derivative ∂⟨∇_θ ℓ, u⟩/∂x and the query losses'
    input gradients; equal to autograd's and the task loop's."""
    torch.manual_seed(seed)
    body = nn.Linear(4, 4).double()
    head = mlp([4, 5, 3], activation, 0.1, True, flatten)
    sx, sy, qx, qy = task_data(3, 5, 4, 3, loss, False, seed)
    lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    results = []
    for path in ("written out", "autograd", "task loop"):
        loop = InnerLoop(head, SGD(head.parameters(), lr=lr), loss_of(loss), steps=steps, mode=mode,
                         vectorize=path != "task loop")
        if path == "autograd":
            loop._hessian = None
        features = [body(x).view(*x.shape[:2], 2, 2) if flatten else body(x) for x in (sx, qx)]
        meta = loop.meta_loss(features[0], sy, features[1], qy)
        if path == "written out":
            nodes = graph_nodes(meta)
            assert "TaskLossesBackward" in nodes and (("SGDStepBackward" in nodes) == (mode == "second_order"))
        wrt = [*body.parameters(), *head.parameters(), lr]
        results.append((float(meta.detach()), torch.autograd.grad(meta, wrt)))
    assert_close(results[1], results[0])
    assert_close(results[2], results[0])


def test_inputs_that_require_grad_higher_derivatives_and_what_falls_back():
    """Double backward through the written-out step with inputs that require grad equals autograd's;
    a head that does not start with a Linear leaves such inputs to autograd."""
    torch.manual_seed(13)
    body = nn.Linear(4, 4).double()
    batch = task_data(2, 5, 4, 3, "mse", False, 13)
    scale = torch.tensor([1.1, 0.2], dtype=torch.float64)

    def meta_loss(r: torch.Tensor, head: nn.Module, written_out: bool) -> torch.Tensor:
        loop = InnerLoop(head, SGD(head.parameters(), lr=r[1]), F.mse_loss, steps=2, vectorize=True)
        if not written_out:
            loop._hessian = None
        return loop.meta_loss(body(batch[0]) * r[0], batch[1], body(batch[2]) * r[0], batch[3])

    head = mlp([4, 5, 3], "tanh", 0.1, True, False)
    hessians = [torch.autograd.functional.hessian(lambda r: meta_loss(r, head, w), scale) for w in (True, False)]
    assert _max_relative(hessians[0], hessians[1]) <= PARITY
    starts_with_activation = nn.Sequential(nn.Tanh(), nn.Linear(4, 3)).double()
    assert not uses_written_out_step(meta_loss(scale, starts_with_activation, True))


def test_anil_takes_the_written_out_path_and_agrees():
    from diffopt.algorithms import ANIL
    torch.manual_seed(14)
    body = nn.Sequential(nn.Linear(4, 6), nn.ReLU()).double()
    head = nn.Linear(6, 3).double()
    learner = ANIL(body, head, F.cross_entropy, inner_lr=0.3, inner_steps=2)
    batch = task_data(3, 5, 4, 3, "cross_entropy", False, 14)
    loss = learner.meta_loss(*batch)
    assert uses_written_out_step(loss)
    ours = torch.autograd.grad(loss, list(learner.parameters()))
    learner.loop._hessian = None
    theirs = torch.autograd.grad(learner.meta_loss(*batch), list(learner.parameters()))
    for a, b in zip(ours, theirs):
        assert _max_relative(a, b) <= PARITY
