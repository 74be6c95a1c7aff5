"""diffopt.innerloop: meta-gradients through a patched model against hand-written unrolled loops.

The references are written out by hand with ``torch.func.functional_call`` (SGD
with momentum and weight decay, Adam), so nothing of diffopt is reused in them.
Agreement is required to ``1e-12 * max(1, |reference|)`` per element, in float64.
"""
from __future__ import annotations

import higher
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torch.func import functional_call

import diffopt
from strategies import F64, examples, record

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-12
FIXTURE_OK = [HealthCheck.function_scoped_fixture]


def close(name: str, ours, reference) -> None:
    assert ours is not None and reference is not None
    error = float(((ours - reference).abs() / reference.abs().clamp(min=1.0)).max())
    record("innerloop vs hand-written", name, error)
    assert error <= TOL, f"{name}: {error:.3e}"


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def make_data(seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randn(n, d, generator=g, dtype=F64) for n, d in ((6, 3), (6, 2), (7, 3), (7, 2))]


def mse(prediction, target):
    return ((prediction - target) ** 2).mean()


# -- hand-written references ---------------------------------------------------------------

def hand_sgd(lr, momentum=0.0, weight_decay=0.0, dampening=0.0, first_order=False):
    def init(params):
        return [None] * len(params)

    def update(params, grads, bufs):
        new_params, new_bufs = [], []
        for p, g, b in zip(params, grads, bufs):
            g = g + weight_decay * p if weight_decay else g
            if momentum:
                b = g if b is None else b * momentum + (1 - dampening) * g
                g = b
            new_params.append(p - lr * g)
            new_bufs.append(b)
        return new_params, new_bufs

    return init, update


def hand_adam(lr, beta1=0.9, beta2=0.999, eps=1e-8):
    def init(params):
        return [(torch.zeros_like(p), torch.zeros_like(p), 0) for p in params]

    def update(params, grads, states):
        new_params, new_states = [], []
        for p, g, (m, v, t) in zip(params, grads, states):
            t += 1
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            m_hat = m / (1 - beta1 ** t)
            v_hat = v / (1 - beta2 ** t)
            new_params.append(p - lr * m_hat / (torch.sqrt(v_hat) + eps))
            new_states.append((m, v, t))
        return new_params, new_states

    return init, update


def hand_unroll(model, data, steps, rule, trained_names=None, first_order=False, start=None):
    """Query loss after ``steps`` inner steps on the support set, written with functional_call."""
    x_s, y_s, x_q, y_q = data
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters()) if start is None else dict(zip(names, start))
    trained = names if trained_names is None else trained_names
    init, update = rule
    state = init([params[n] for n in trained])
    for _ in range(steps):
        loss = mse(functional_call(model, params, (x_s,)), y_s)
        grads = torch.autograd.grad(loss, [params[n] for n in trained], create_graph=not first_order)
        new, state = update([params[n] for n in trained], grads, state)
        params = dict(params, **dict(zip(trained, new)))
    return mse(functional_call(model, params, (x_q,)), y_q)


def innerloop_query_loss(model, optimizer, data, steps, **options):
    x_s, y_s, x_q, y_q = data
    with diffopt.innerloop(model, optimizer, **options) as (fmodel, dopt):
        for _ in range(steps):
            dopt.step(mse(fmodel(x_s), y_s))
        return mse(fmodel(x_q), y_q), fmodel


# -- meta-gradients -------------------------------------------------------------------------

CASES = {
    "SGD": (lambda ps, lr: torch.optim.SGD(ps, lr=lr), lambda lr: hand_sgd(lr)),
    "SGD-momentum-wd": (lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=0.01, dampening=0.1),
                        lambda lr: hand_sgd(lr, momentum=0.9, weight_decay=0.01, dampening=0.1)),
    "Adam": (lambda ps, lr: torch.optim.Adam(ps, lr=lr, betas=(0.8, 0.95)), lambda lr: hand_adam(lr, 0.8, 0.95)),
}
DIFFOPT_CASES = {
    "SGD": lambda ps, lr: diffopt.optim.SGD(ps, lr=lr),
    "SGD-momentum-wd": lambda ps, lr: diffopt.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=0.01, dampening=0.1),
    "Adam": lambda ps, lr: diffopt.optim.Adam(ps, lr=lr, betas=(0.8, 0.95)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["torch.optim", "diffopt"])
@settings(max_examples=examples(2), suppress_health_check=FIXTURE_OK)
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 5), lr=st.floats(0.01, 0.3))
def test_meta_gradient_equals_hand_written_unrolled_loop(case, kind, seed, steps, lr):
    if case == "Adam":
        lr = lr / 10
    model, data = make_model(seed), make_data(seed)
    make = CASES[case][0] if kind == "torch.optim" else DIFFOPT_CASES[case]
    loss, _ = innerloop_query_loss(model, make(model.parameters(), lr), data, steps)
    ours = torch.autograd.grad(loss, list(model.parameters()))
    reference = torch.autograd.grad(hand_unroll(model, data, steps, CASES[case][1](lr)), list(model.parameters()))
    for a, b in zip(ours, reference):
        close(f"{case} ({kind})", a, b)


@settings(max_examples=examples(3), suppress_health_check=FIXTURE_OK)
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 5), lr=st.floats(0.01, 0.3),
       momentum=st.sampled_from([0.0, 0.5, 0.9]))
def test_meta_gradient_equals_higher_for_sgd(seed, steps, lr, momentum):
    """higher's differentiable SGD is right; diffopt agrees with it (copy_initial_weights=False for both)."""
    model, data = make_model(seed), make_data(seed)
    x_s, y_s, x_q, y_q = data
    loss, _ = innerloop_query_loss(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), data, steps)
    ours = torch.autograd.grad(loss, list(model.parameters()))
    inner = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt_higher):
        for _ in range(steps):
            diffopt_higher.step(mse(fmodel(x_s), y_s))
        theirs = torch.autograd.grad(mse(fmodel(x_q), y_q), list(model.parameters()))
    for a, b in zip(ours, theirs):
        close("SGD vs higher", a, b)


@pytest.mark.parametrize("case", ["SGD-momentum-wd", "Adam"])
@settings(max_examples=examples(2), suppress_health_check=FIXTURE_OK)
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 4))
def test_first_order(case, seed, steps):
    """first_order=True equals the hand-written loop with detached inner gradients."""
    lr = 0.1 if case.startswith("SGD") else 0.01
    model, data = make_model(seed), make_data(seed)
    loss, _ = innerloop_query_loss(model, CASES[case][0](model.parameters(), lr), data, steps, first_order=True)
    ours = torch.autograd.grad(loss, list(model.parameters()))
    reference = torch.autograd.grad(hand_unroll(model, data, steps, CASES[case][1](lr), first_order=True),
                                    list(model.parameters()))
    second = torch.autograd.grad(hand_unroll(model, data, steps, CASES[case][1](lr)), list(model.parameters()))
    for a, b in zip(ours, reference):
        close(f"{case} first order", a, b)
    if case.startswith("SGD"):  # (Adam's first steps, g / (|g| + eps), have a tiny second-order term)
        assert max(float((a - b).abs().max()) for a, b in zip(ours, second)) > 1e-6  # a different gradient


def test_first_order_with_a_diffopt_optimizer_applies_to_the_block_only():
    """first_order=True makes the block first order (gradient = the hand-written first-order
    unroll) without setting it on the caller's optimizer (#13 item 7, #15 item 5)."""
    model, data = make_model(0), make_data(0)
    opt = diffopt.optim.SGD(model.parameters(), lr=0.1)
    loss, _ = innerloop_query_loss(model, opt, data, 2, first_order=True)
    assert not opt.first_order
    ours = torch.autograd.grad(loss, list(model.parameters()))
    reference = torch.autograd.grad(hand_unroll(model, data, 2, hand_sgd(0.1), first_order=True),
                                    list(model.parameters()))
    for a, b in zip(ours, reference):
        close("SGD first order (diffopt)", a, b)


def test_copy_initial_weights_gives_no_gradient_to_the_model():
    model, data = make_model(1), make_data(1)
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    loss, fmodel = innerloop_query_loss(model, torch.optim.SGD(model.parameters(), lr=lr), data, 3,
                                        copy_initial_weights=True)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert lr.grad is not None and torch.isfinite(lr.grad) and lr.grad != 0
    # The inner loop itself is the same as without the copy.
    reference = hand_unroll(model, data, 3, hand_sgd(0.1))
    assert abs(float(loss.detach()) - float(reference.detach())) <= 1e-12


@pytest.mark.parametrize("kind", ["torch.optim", "diffopt"])
@settings(max_examples=examples(2), suppress_health_check=FIXTURE_OK)
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 4), lr=st.floats(0.01, 0.3))
def test_tensor_learning_rate_receives_its_gradient(kind, seed, steps, lr):
    model, data = make_model(seed), make_data(seed)
    lr_t = torch.tensor(lr, dtype=F64, requires_grad=True)
    make = torch.optim.SGD if kind == "torch.optim" else diffopt.optim.SGD
    loss, _ = innerloop_query_loss(model, make(model.parameters(), lr=lr_t, momentum=0.5), data, steps)
    ours = torch.autograd.grad(loss, [lr_t, *model.parameters()])
    lr_h = torch.tensor(lr, dtype=F64, requires_grad=True)
    reference = torch.autograd.grad(hand_unroll(model, data, steps, hand_sgd(lr_h, momentum=0.5)),
                                    [lr_h, *model.parameters()])
    for a, b in zip(ours, reference):
        close("tensor lr", a, b)


@pytest.mark.parametrize("frozen", [False, True])
@settings(max_examples=examples(2), suppress_health_check=FIXTURE_OK)
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 4))
def test_optimizer_over_a_subset_of_the_parameters(frozen, seed, steps):
    """Only the first layer is optimized; the last is either trainable outside the inner loop
    (it still gets a meta-gradient through its direct use) or frozen (requires_grad=False)."""
    model, data = make_model(seed), make_data(seed)
    if frozen:
        for p in model[2].parameters():
            p.requires_grad_(False)
    opt = torch.optim.Adam(model[0].parameters(), lr=0.02)
    loss, fmodel = innerloop_query_loss(model, opt, data, steps)
    wanted = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(loss, wanted)
    reference = torch.autograd.grad(
        hand_unroll(model, data, steps, hand_adam(0.02), trained_names=["0.weight", "0.bias"]), wanted)
    for a, b in zip(ours, reference):
        close("subset of parameters", a, b)
    # The last layer's fast weights were never updated.
    for fast, p in zip(list(fmodel.fast_params)[2:], model[2].parameters()):
        assert torch.equal(fast.detach(), p.detach())


class TiedAutoencoder(nn.Module):
    """Embedding and output projection share one weight."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(6, 3)
        self.hidden = nn.Linear(3, 3)
        self.decoder = nn.Linear(3, 6, bias=False)
        self.decoder.weight = self.embedding.weight

    def forward(self, idx):
        return self.decoder(torch.tanh(self.hidden(self.embedding(idx))))


@pytest.mark.parametrize("case", ["SGD-momentum-wd", "Adam"])
@settings(max_examples=examples(2), suppress_health_check=FIXTURE_OK)
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 4))
def test_model_with_tied_weights(case, seed, steps):
    torch.manual_seed(seed)
    model = TiedAutoencoder().double()
    assert len(list(model.parameters())) == 3  # the tied weight counts once
    g = torch.Generator().manual_seed(seed)
    idx_s, idx_q = torch.randint(0, 6, (8,), generator=g), torch.randint(0, 6, (8,), generator=g)
    t_s, t_q = torch.randint(0, 6, (8,), generator=g), torch.randint(0, 6, (8,), generator=g)
    lr = 0.1 if case.startswith("SGD") else 0.01

    with diffopt.innerloop(model, CASES[case][0](model.parameters(), lr)) as (fmodel, dopt):
        for _ in range(steps):
            dopt.step(nn.functional.cross_entropy(fmodel(idx_s), t_s))
        loss = nn.functional.cross_entropy(fmodel(idx_q), t_q)
    ours = torch.autograd.grad(loss, list(model.parameters()))

    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    init, update = CASES[case][1](lr)
    state = init(params)
    for _ in range(steps):
        inner = nn.functional.cross_entropy(functional_call(model, dict(zip(names, params)), (idx_s,)), t_s)
        grads = torch.autograd.grad(inner, params, create_graph=True)
        params, state = update(params, grads, state)
    outer = nn.functional.cross_entropy(functional_call(model, dict(zip(names, params)), (idx_q,)), t_q)
    reference = torch.autograd.grad(outer, list(model.parameters()))
    for a, b in zip(ours, reference):
        close(f"tied weights {case}", a, b)


def test_converted_torch_optimizer_keeps_its_state():
    """An Adam warmed up by torch continues inside the inner loop exactly as torch would."""
    model, data = make_model(2), make_data(2)
    x_s, y_s, _, _ = data
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        mse(model(x_s), y_s).backward()
        opt.step()
    with diffopt.innerloop(model, opt) as (fmodel, dopt):
        assert dopt.optimizer.state[0]["step"] == 3
        for _ in range(4):
            dopt.step(mse(fmodel(x_s), y_s))
        fast = [p.detach().clone() for p in fmodel.fast_params]
    # torch continues on its own (in place) from the same point.
    for _ in range(4):
        opt.zero_grad()
        mse(model(x_s), y_s).backward()
        opt.step()
    for a, b in zip(fast, model.parameters()):
        assert float((a - b.detach()).abs().max()) <= 1e-12


def test_innerloop_errors():
    model = make_model(0)
    stranger = torch.randn(3, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="is not a parameter of the model"):
        with diffopt.innerloop(model, torch.optim.SGD([stranger], lr=0.1)):
            pass
    with pytest.raises(TypeError, match="expected a torch.optim or diffopt optimizer"):
        with diffopt.innerloop(model, "sgd"):
            pass


def test_a_diffopt_optimizer_is_reusable_across_blocks_and_left_untouched():
    """innerloop must not change the caller's optimizer (it used to overwrite its params, set
    first_order=True for good and attach a private attribute), so a second block with the same
    optimizer fails no more and gives the same meta-gradient as the first."""
    model = make_model(3)
    sx, sy, qx, qy = make_data(3)
    opt = diffopt.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params_before, first_order_before = list(opt.params), opt.first_order

    def meta_gradient(first_order: bool) -> list[torch.Tensor]:
        with diffopt.innerloop(model, opt, first_order=first_order) as (fmodel, inner):
            for _ in range(2):
                inner.step(mse(fmodel(sx), sy))
            return list(torch.autograd.grad(mse(fmodel(qx), qy), list(model.parameters())))

    first = meta_gradient(first_order=True)
    assert opt.first_order is first_order_before
    assert all(a is b for a, b in zip(opt.params, params_before)) and opt.step_count == 0
    assert not hasattr(opt, "_fmodel_positions")
    second_order = meta_gradient(first_order=False)
    again = meta_gradient(first_order=False)
    assert all(torch.equal(a, b) for a, b in zip(second_order, again))
    # the first-order block really was first order, the later ones second order
    assert any(not torch.allclose(a, b) for a, b in zip(first, second_order))


# -- #16 item 1: the drop-in costs what the plain loop costs, and computes what it computes ----------

def sinusoid_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)).double()


def small_conv(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).double()


def task_batch(kind: str, tasks: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        x = torch.rand(tasks, 12, 1, generator=g, dtype=F64) * 10 - 5
        return x[:, :6], torch.sin(x[:, :6]), x[:, 6:], torch.sin(x[:, 6:])
    images = torch.randn(tasks, 8, 1, 6, 6, generator=g, dtype=F64)
    labels = torch.randint(0, 2, (tasks, 8), generator=g)
    return images[:, :4], labels[:, :4], images[:, 4:], labels[:, 4:]


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("first_order", [False, True], ids=["SO", "FO"])
@pytest.mark.parametrize("steps", [1, 5])
def test_meta_gradient_is_the_plain_loops(kind, first_order, steps):
    """Per task an innerloop block with torch.optim.SGD and a backward, against the hand-written loop
    (functional_call, autograd.grad, p - lr g, a backward per task): the same to 1e-14 in float64."""
    model = sinusoid_mlp(steps) if kind == "mlp" else small_conv(steps)
    loss_fn = F.mse_loss if kind == "mlp" else F.cross_entropy
    sx, sy, qx, qy = task_batch(kind, 3, steps)
    lr, params = 0.05, list(model.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    for t in range(3):
        with diffopt.innerloop(model, opt, first_order=first_order) as (fmodel, dopt):
            for _ in range(steps):
                dopt.step(loss_fn(fmodel(sx[t]), sy[t]))
            (loss_fn(fmodel(qx[t]), qy[t]) / 3).backward()
    ours = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    names = [n for n, _ in model.named_parameters()]
    for t in range(3):
        fast = list(params)
        for _ in range(steps):
            out = functional_call(model, dict(zip(names, fast)), (sx[t],))
            grads = torch.autograd.grad(loss_fn(out, sy[t]), fast, create_graph=not first_order)
            fast = [p - lr * g for p, g in zip(fast, grads)]
        (loss_fn(functional_call(model, dict(zip(names, fast)), (qx[t],)), qy[t]) / 3).backward()
    for a, p in zip(ours, params):
        error = float(((a - p.grad).abs() / p.grad.abs().clamp(min=1.0)).max())
        record("innerloop vs the plain loop", f"{kind} {'FO' if first_order else 'SO'} K={steps}", error)
        assert error <= 1e-14, error


def test_a_block_after_the_model_or_the_optimizer_changed_sees_the_change():
    """What innerloop keeps between blocks (where the parameters sit, the converted optimizer) follows
    a replaced parameter, a changed learning rate and optimizer state built up by torch."""
    model, data = make_model(5), make_data(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def check(lr: float, start=None) -> None:
        loss, _ = innerloop_query_loss(model, opt, data, 2)
        ours = torch.autograd.grad(loss, list(model.parameters()))
        reference = torch.autograd.grad(
            hand_unroll(model, data, 2, hand_sgd(lr, momentum=0.9) if start is None else start),
            list(model.parameters()))
        for a, b in zip(ours, reference):
            close("after a change", a, b)

    check(0.1)
    model[0].weight = nn.Parameter(torch.randn(4, 3, dtype=F64))  # a new tensor: the old one is not used
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    check(0.1)
    opt.param_groups[0]["lr"] = 0.03
    check(0.03)
    # torch's own step builds momentum buffers: the block continues from them
    x_s, y_s, _, _ = data
    opt.zero_grad()
    mse(model(x_s), y_s).backward()
    opt.step()
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]

    def warm_sgd(lr: float):
        init, update = hand_sgd(lr, momentum=0.9)
        return (lambda params: list(buffers)), update

    check(0.03, start=warm_sgd(0.03))
    with pytest.raises(ValueError, match="parameter 0 .* is not a parameter of the model"):
        with diffopt.innerloop(make_model(6), opt):
            pass


def higher_and_diffopt(model: nn.Module, lr: float):
    """``(library, context)`` for higher's ``innerloop_ctx`` (``copy_initial_weights=False``) and
    ``diffopt.innerloop``, each on a fresh ``torch.optim.SGD(model.parameters(), lr)``."""
    for library in ("higher", "diffopt"):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        yield library, (higher.innerloop_ctx(model, opt, copy_initial_weights=False) if library == "higher"
                        else diffopt.innerloop(model, opt))


def test_fmodel_keeps_its_own_batchnorm_statistics_like_higher():
    """BatchNorm's running statistics change in the block's copy, not in the model (as higher's
    fmodel); fmodel.eval() uses them, and the model's own mode is left alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x_s, y_s, x_q, y_q = make_data(0)
    before = [b.clone() for b in model.buffers()]
    outputs = {}
    for library, context in higher_and_diffopt(model, lr=0.1):
        with context as (fmodel, dopt):
            for _ in range(3):
                dopt.step(mse(fmodel(x_s), y_s))
            fmodel.eval()
            query = fmodel(x_q)
            outputs[library] = (query, torch.autograd.grad(mse(query, y_q), list(model.parameters())))
        assert model.training
        assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    close("batchnorm eval output vs higher", outputs["diffopt"][0].detach(), outputs["higher"][0].detach())
    for a, b in zip(outputs["diffopt"][1], outputs["higher"][1]):
        close("batchnorm meta-gradient vs higher", a, b)


class WithMethod(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.head = nn.Linear(4, 2)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def test_submodules_methods_and_fast_weights_by_name():
    torch.manual_seed(1)
    model = WithMethod().double()
    x_s, y_s, x_q, _ = make_data(1)
    names = [n for n, _ in model.named_parameters()]
    with diffopt.innerloop(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, dopt):
        dopt.step(mse(fmodel(x_s), y_s))
        fast = dict(zip(names, fmodel.fast_params))
        expected = functional_call(model, fast, (x_q,))
        features = torch.tanh(x_q @ fast["body.0.weight"].T + fast["body.0.bias"])
        assert torch.equal(fmodel(x_q), expected)
        assert torch.equal(fmodel.features(x_q), features)
        assert torch.equal(fmodel.body(x_q), features)
        assert torch.equal(fmodel.body[0](x_q), x_q @ fast["body.0.weight"].T + fast["body.0.bias"])
        assert fmodel.head.weight is fast["head.weight"] and fmodel.body[0].bias is fast["body.0.bias"]
        assert dict(fmodel.named_parameters()) == fast
        with pytest.raises(AttributeError, match="read-only.*update_params"):
            fmodel.head.weight = fast["head.weight"]
    # the model's own parameters are back in place
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_parameters_are_put_back_when_the_forward_raises():
    model = make_model(2)
    params = list(model.parameters())
    with diffopt.innerloop(model, torch.optim.SGD(params, lr=0.1)) as (fmodel, dopt):
        dopt.step(mse(fmodel(make_data(2)[0]), make_data(2)[1]))
        with pytest.raises(RuntimeError):
            fmodel(torch.zeros(5, 7, dtype=F64))  # wrong width
    assert all(p is q for p, q in zip(model.parameters(), params))


def test_time_indexed_parameters_and_track_higher_grads():
    model, data = make_model(4), make_data(4)
    x_s, y_s, _, _ = data
    with diffopt.innerloop(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, dopt):
        steps = [dopt.step(mse(fmodel(x_s), y_s)) for _ in range(3)]
        assert all(p is q for p, q in zip(fmodel.parameters(time=0), model.parameters()))
        assert all(p is q for p, q in zip(fmodel.parameters(time=2), steps[1]))
        assert fmodel.init_fast_params == list(model.parameters())
    with diffopt.innerloop(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           track_higher_grads=False) as (fmodel, dopt):
        latest = [dopt.step(mse(fmodel(x_s), y_s)) for _ in range(2)][-1]
        assert list(fmodel.parameters()) == latest
        with pytest.raises(ValueError, match="only the latest fast weights"):
            fmodel.parameters(time=1)


def test_recurrent_model_matches_higher():
    """RNNs read their weights from _flat_weights: the swap refreshes them."""
    torch.manual_seed(3)
    gru = nn.GRU(3, 4, batch_first=True).double()
    g = torch.Generator().manual_seed(3)
    xs, xq = torch.randn(2, 5, 3, generator=g, dtype=F64), torch.randn(2, 5, 3, generator=g, dtype=F64)

    def loss(fmodel, x):
        return fmodel(x)[0].pow(2).mean()

    results = []
    for _, context in higher_and_diffopt(gru, lr=0.3):
        with context as (fmodel, dopt):
            for _ in range(2):
                dopt.step(loss(fmodel, xs))
            results.append(torch.autograd.grad(loss(fmodel, xq), list(gru.parameters())))
    for a, b in zip(*results):
        close("GRU vs higher", b, a)


class Counting(nn.Module):
    """Counts its calls in a buffer registered later, updated in place by the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        if hasattr(self, "calls"):
            self.calls.add_(1)
        return self.linear(x)


def test_a_buffer_registered_between_blocks_is_the_blocks_copy():
    model = Counting().double()
    x, y = make_data(0)[0], make_data(0)[1]
    for registered in (False, True):
        with diffopt.innerloop(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, dopt):
            dopt.step(mse(fmodel(x), y))
            fmodel(x)
        if not registered:
            model.register_buffer("calls", torch.zeros((), dtype=torch.long))
    assert int(model.calls) == 0  # the two calls counted in the block's copy


def test_a_finished_block_is_freed_without_the_cyclic_garbage_collector():
    """fmodel holds every step's fast weights: a reference cycle would keep them (and so one task's
    weights per task) alive until a collection, raising the peak memory of a task loop."""
    import gc
    import weakref

    model, (x, y, _, _) = make_model(0), make_data(0)
    enabled = gc.isenabled()
    gc.disable()
    try:
        with diffopt.innerloop(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, dopt):
            dopt.step(mse(fmodel(x), y))
            fmodel[0](x)  # a submodule view too
            fmodel.eval()
        refs = [weakref.ref(fmodel), weakref.ref(dopt), weakref.ref(dopt.optimizer)]
        del fmodel, dopt
        assert all(r() is None for r in refs)
    finally:
        if enabled:
            gc.enable()


@pytest.mark.parametrize("wrap", [False, True], ids=["torch.optim", "diffopt optimizer"])
def test_track_higher_grads_false_is_highers_evaluation_mode(wrap):
    """higher's track_higher_grads=False: the gradients are taken without a graph and every new
    fast weight is a leaf, so no meta-gradient reaches the model, the fast weights get .grad, and no
    graph grows across steps; the values equal higher's."""
    model, (x_s, y_s, x_q, y_q) = make_model(5), make_data(5)
    results = []
    for library in ("higher", "diffopt"):
        model.zero_grad()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if library == "higher":
            context = higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=False)
        else:
            context = diffopt.innerloop(model, diffopt.optim.from_torch(opt) if wrap else opt,
                                        track_higher_grads=False)
        with context as (fmodel, dopt):
            for _ in range(3):
                dopt.step(mse(fmodel(x_s), y_s))
            fast = list(fmodel.parameters())
            assert all(p.is_leaf and p.requires_grad for p in fast), library
            mse(fmodel(x_q), y_q).backward()
        assert all(p.grad is None for p in model.parameters()), library
        results.append([p.grad for p in fast])
    for a, b in zip(*results):
        close("track_higher_grads=False vs higher", b, a)


def test_step_takes_highers_params_and_grad_callback():
    """higher's diffopt.step(loss, params, grad_callback=f): the step starts from the given fast
    weights, and f sees the gradients of all of them (in model.parameters() order)."""
    model, (x_s, y_s, x_q, y_q) = make_model(6), make_data(6)
    seen = {}

    def callback(grads):
        seen.setdefault(len(seen), [None if g is None else tuple(g.shape) for g in grads])
        return [None if g is None else g.clamp(-0.05, 0.05) * 2 for g in grads]

    results = []
    for library in ("higher", "diffopt"):
        opt = torch.optim.SGD(list(model.parameters())[:2], lr=0.3)  # the first layer only
        context = (higher.innerloop_ctx(model, opt, copy_initial_weights=False) if library == "higher"
                   else diffopt.innerloop(model, opt))
        with context as (fmodel, dopt):
            start = [p * 1.0 for p in model.parameters()]
            dopt.step(mse(fmodel(x_s, params=start), y_s), start, grad_callback=callback)
            dopt.step(mse(fmodel(x_s), y_s), grad_callback=callback)
            results.append(torch.autograd.grad(mse(fmodel(x_q), y_q), list(model.parameters())))
    assert seen[0] == [tuple(p.shape) for p in model.parameters()]
    for a, b in zip(*results):
        close("step(params, grad_callback) vs higher", b, a)
    with diffopt.innerloop(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, dopt):
        with pytest.raises(ValueError, match=r"step\(params=...\): got 1 tensors, the model has 4 parameters"):
            dopt.step(mse(fmodel(x_s), y_s), params=[x_s])
        with pytest.raises(ValueError, match="the callback returned 1 gradients for 4 fast weights"):
            dopt.step(mse(fmodel(x_s), y_s), grad_callback=lambda grads: grads[:1])


def test_device_is_accepted_where_the_model_is_and_refused_elsewhere():
    model, (x_s, y_s, _, _) = make_model(7), make_data(7)
    with diffopt.innerloop(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu") as (fmodel, dopt):
        dopt.step(mse(fmodel(x_s), y_s))
    with pytest.raises(ValueError, match=r"innerloop\(device='meta'\): the model's parameters are on cpu; .*"
                                         r"model.to\(device\)"):
        with diffopt.innerloop(model, torch.optim.SGD(model.parameters(), lr=0.1), device="meta"):
            pass


def test_a_non_finite_inner_loss_is_reported_when_the_block_ends():
    """By default every inner loss is checked once, when the block ends (one synchronisation), naming
    the first bad step; check_finite=True checks each step as it is taken; False checks nothing."""
    model, (x_s, y_s, x_q, y_q) = make_model(8), make_data(8)
    bad = x_s.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(diffopt.optim.NonFiniteError, match=r"the inner loss of step 1 \(0-based\) was nan"):
        with diffopt.innerloop(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, dopt):
            dopt.step(mse(fmodel(x_s), y_s))
            dopt.step(mse(fmodel(bad), y_s))
            dopt.step(mse(fmodel(x_s), y_s))
            mse(fmodel(x_q), y_q).backward()
    with pytest.raises(diffopt.optim.NonFiniteError, match="step 1: the loss is nan"):
        with diffopt.innerloop(model, torch.optim.SGD(model.parameters(), lr=0.1), check_finite=True) as (fmodel, dopt):
            dopt.step(mse(fmodel(x_s), y_s))
            dopt.step(mse(fmodel(bad), y_s))
    with diffopt.innerloop(model, torch.optim.SGD(model.parameters(), lr=0.1), check_finite=False) as (fmodel, dopt):
        assert not torch.isfinite(dopt.step(mse(fmodel(bad), y_s))[0]).all()
    with pytest.raises(KeyError):  # an error inside the block is not replaced by the check
        with diffopt.innerloop(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, dopt):
            dopt.step(mse(fmodel(bad), y_s))
            raise KeyError("the block's own error")


def test_a_tensor_lr_changed_in_place_between_blocks_is_used():
    """torch's schedulers change a tensor lr in place; the optimizer conversion kept across blocks had
    compared it by identity and stepped with the old value (0.1 instead of 0.01)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1, dtype=F64))
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 1, dtype=F64)
    for lr in (0.1, 0.01):
        opt.param_groups[0]["lr"].fill_(lr)
        with diffopt.innerloop(model, opt, copy_initial_weights=False) as (fmodel, dopt):
            grads = torch.autograd.grad(F.mse_loss(model(x), y), list(model.parameters()))
            dopt.step(F.mse_loss(fmodel(x), y))
            for new, old, g in zip(fmodel.parameters(), model.parameters(), grads):
                assert torch.allclose(new, old - lr * g, rtol=0, atol=1e-15), lr


def test_fmodel_submodule_buffers_and_generators_are_the_blocks():
    """fmodel[1].running_mean, fmodel.buffers(), fmodel[2].parameters() and fmodel.children() had given the
    model's own tensors and modules (a generator runs after the call has put them back): an L2 term over
    fmodel[2].parameters() did not depend on the fast weights, and a loop over children() ran the slow
    weights. They equal higher's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    x, y = torch.randn(6, 4, dtype=F64), torch.randn(6, 1, dtype=F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt) as (hmodel, hopt), diffopt.innerloop(model, opt) as (fmodel, dopt):
        for f, o in ((hmodel, hopt), (fmodel, dopt)):
            o.step(F.mse_loss(f(x), y))
        assert torch.equal(fmodel[1].running_mean, hmodel[1].running_mean)
        assert fmodel[1].running_mean.abs().sum() > 0 and model[1].running_mean.abs().sum() == 0
        assert [int(b) for b in fmodel.buffers() if b.dim() == 0] == [1]
        assert all(a is b for a, b in zip(fmodel[2].parameters(), fmodel.fast_params[4:]))
        h = x
        for layer in fmodel.children():
            h = layer(h)
        assert torch.equal(h, fmodel(x))
        penalty = sum(p.pow(2).sum() for p in fmodel[2].parameters())
        assert torch.autograd.grad(penalty, fmodel.fast_params[4])[0].abs().sum() > 0


def test_a_replaced_module_with_buffers_only_gets_a_new_layout():
    """Replacing BatchNorm1d(affine=False) (buffers, no parameters) had kept the cached layout: the next
    block wrote the old module's statistics into the new one's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 1))
    x, y = torch.randn(6, 4), torch.randn(6, 1)
    for block in range(2):
        with diffopt.innerloop(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, dopt):
            dopt.step(F.mse_loss(fmodel(x), y))
        if block == 0:
            model[1] = nn.BatchNorm1d(4, affine=False)
    assert model[1].running_mean.abs().sum() == 0 and int(model[1].num_batches_tracked) == 0


def test_the_device_check_accepts_the_models_own_device_however_it_is_named():
    model = nn.Linear(2, 1)
    with diffopt.innerloop(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu:0"):
        pass
