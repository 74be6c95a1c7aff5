"""The inner-loop engine (diffopt.unroll) against independent references.

Everything here is float64. References, each written without the engine:

* central finite differences (fourth order) of the meta-loss along random
  directions of the model's parameters and along every tensor hyperparameter;
  ``torch.autograd.gradcheck`` on a tiny problem;
* a hand-written unrolled loop over tasks (``torch.func.functional_call`` and
  hand-written SGD / momentum / Nesterov / Adam updates), and higher's
  ``innerloop_ctx``;
* the first-order formula (gradients detached, updates differentiable);
* the truncated and checkpointed modes against second order.

Implicit and forward modes are in ``test_unroll_implicit_forward.py``, ES/PES in
``test_unroll_zero_order.py``, vectorised-versus-sequential parity and the
BatchNorm policies in ``test_unroll_vectorize.py``, bad input and memory in
``test_unroll_errors.py``. The shared models and references live in this file.

Errors are recorded with ``strategies.record`` (``DIFFOPT_ERROR_REPORT=1`` prints the worst).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import higher
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call

import diffopt
from diffopt.optim import SGD, Adam
from diffopt.unroll import InnerLoop
from strategies import examples, parity_error, record

F64 = torch.float64
EXACT = 1e-12      # mathematically identical computations (different operation order)
FD_TOL = 1e-6      # relative error against finite differences
QUICK = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def single_threaded():
    """One intra-op thread for these tiny tensors: on a shared 2-core machine a second thread
    only spins (it doubled the CPU time); restored after the module."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# =============================================================================================
# Models (all float64, built deterministically from a seed)
# =============================================================================================

class MLP(nn.Module):
    def __init__(self, d_in: int = 2, hidden: int = 4, d_out: int = 1) -> None:
        super().__init__()
        self.body = nn.Linear(d_in, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))


class TiedNet(nn.Module):
    """A module used twice, a weight shared by two modules, and a weight read directly.

    ``tie.weight is embed.weight``; ``mid`` is called twice; ``tie.weight`` is also read as
    a matrix in ``forward`` before ``tie`` is called (weight tying as in language models),
    which higher alone does not refresh.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4, bias=False)
        self.mid = nn.Linear(4, 4)
        self.tie = nn.Linear(3, 4, bias=False)
        self.tie.weight = self.embed.weight
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x))
        h = torch.tanh(self.mid(torch.tanh(self.mid(h))))
        back = torch.tanh(h @ self.tie.weight)        # direct read of the tied weight
        return self.head(torch.tanh(self.tie(back)))


class BufferNet(nn.Module):
    """Non-trainable state in buffers (a fixed scale and shift)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 4)
        self.head = nn.Linear(4, 1)
        self.register_buffer("scale", torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=F64))
        self.register_buffer("shift", torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x) * self.scale + self.shift))


class FrozenNet(nn.Module):
    """An MLP whose first weight is frozen (``requires_grad=False``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 4)
        self.head = nn.Linear(4, 1)
        self.body.weight.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 6)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(torch.tanh(self.body(x))))


class ConvBN(nn.Module):
    """Conv -> BatchNorm -> tanh -> linear, on 1x4x4 images."""

    def __init__(self, track_running_stats: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)  # (a bias before BatchNorm has no effect)
        self.bn = nn.BatchNorm2d(2, track_running_stats=track_running_stats)
        self.fc = nn.Linear(2 * 4 * 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, 3, batch_first=True)
        self.head = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


#: name -> (constructor, per-example input shape, names of the adapted parameters or None for all)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], list[str] | None]] = {
    "mlp": (MLP, (2,), None),
    "tied": (TiedNet, (3,), None),
    "buffers": (BufferNet, (2,), None),
    "frozen": (FrozenNet, (2,), None),
    "anil": (MLP, (2,), ["head.weight", "head.bias"]),   # inner optimizer over the head only
    "dropout": (DropoutNet, (2,), None),
    "convbn": (ConvBN, (1, 4, 4), None),
    "lstm": (LSTMNet, (4, 2), None),
}
DETERMINISTIC = ["mlp", "tied", "buffers", "frozen", "anil", "convbn"]


def build(name: str, seed: int = 0) -> nn.Module:
    make = MODELS[name][0]
    torch.manual_seed(seed)
    model = make().to(F64)
    with torch.no_grad():  # move the parameters off zero-ish values so that every term matters
        for p in model.parameters():
            p.mul_(1.5)
    return model


def tasks(model_name: str, n_tasks: int, seed: int, support: int = 5, query: int = 6) -> tuple[Tensor, ...]:
    """(support_x, support_y, query_x, query_y) with a leading task dimension."""
    shape = MODELS[model_name][1]
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(n_tasks, support, *shape, generator=g, dtype=F64)
    qx = torch.randn(n_tasks, query, *shape, generator=g, dtype=F64)
    sy = torch.randn(n_tasks, support, 1, generator=g, dtype=F64)
    qy = torch.randn(n_tasks, query, 1, generator=g, dtype=F64)
    return sx, sy, qx, qy


def adapted_params(model: nn.Module, model_name: str) -> list[Tensor]:
    names = MODELS[model_name][2]
    named = dict(model.named_parameters())
    return list(named.values()) if names is None else [named[n] for n in names]


# =============================================================================================
# Inner optimizers with tensor hyperparameters, and their hand-written update rules
# =============================================================================================

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")


def hyper(value: float) -> Tensor:
    return torch.tensor(value, dtype=F64, requires_grad=True)


def make_optimizer(kind: str, params: Sequence[Tensor], lr: float = 0.1, momentum: float = 0.6,
                   betas: tuple[float, float] = (0.8, 0.9), eps: float = 1e-6,
                   **options: Any) -> tuple[Any, dict[str, Tensor]]:
    """A diffopt optimizer whose hyperparameters are leaf tensors that require grad."""
    if kind == "sgd":
        hp = {"lr": hyper(lr)}
        return SGD(params, lr=hp["lr"], **options), hp
    if kind in ("momentum", "nesterov"):
        hp = {"lr": hyper(lr), "momentum": hyper(momentum)}
        return SGD(params, lr=hp["lr"], momentum=hp["momentum"], nesterov=kind == "nesterov", **options), hp
    if kind == "adam":
        hp = {"lr": hyper(lr / 3), "beta1": hyper(betas[0]), "beta2": hyper(betas[1])}
        return Adam(params, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=eps, **options), hp
    raise ValueError(kind)


def reference_update(kind: str, p: Tensor, g: Tensor, state: dict[str, Any], hp: dict[str, Tensor],
                     eps: float = 1e-6) -> Tensor:
    """One step of the textbook update (torch.optim's formulas), written out."""
    lr = hp["lr"]
    if kind == "sgd":
        return p - lr * g
    if kind in ("momentum", "nesterov"):
        buf = g if "buf" not in state else hp["momentum"] * state["buf"] + g
        state["buf"] = buf
        return p - lr * (g + hp["momentum"] * buf if kind == "nesterov" else buf)
    b1, b2 = hp["beta1"], hp["beta2"]
    t = state.get("t", 0) + 1
    m = (1 - b1) * g if t == 1 else b1 * state["m"] + (1 - b1) * g
    v = (1 - b2) * g * g if t == 1 else b2 * state["v"] + (1 - b2) * g * g
    state.update(t=t, m=m, v=v)
    return p - lr / (1 - b1**t) * m / (torch.sqrt(v) / torch.sqrt(1 - b2**t) + eps)


def reference_meta_loss(model: nn.Module, model_name: str, kind: str, hp: dict[str, Tensor], steps: int,
                        data: Sequence[Tensor], first_order: bool = False, train: bool = True,
                        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.mse_loss) -> Tensor:
    """The meta-loss by a plain Python loop over tasks with functional_call (no engine, no vmap).

    ``first_order``: inner gradients computed without a graph (constants); the
    updates stay differentiable. ``train``: module mode (BatchNorm batch statistics
    when True, running statistics when False).
    """
    sx, sy, qx, qy = data
    theta = dict(model.named_parameters())
    names = MODELS[model_name][2] or list(theta)
    trainable = [n for n in names if theta[n].requires_grad]
    model.train(train)
    total = 0.0
    for t in range(sx.shape[0]):
        fast = dict(theta)
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        states: dict[str, dict[str, Any]] = {n: {} for n in trainable}
        for _ in range(steps):
            loss = loss_fn(functional_call(model, {**fast, **buffers}, (sx[t],)), sy[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in trainable], create_graph=not first_order)
            for n, g in zip(trainable, grads):
                fast[n] = reference_update(kind, fast[n], g, states[n], hp)
        total = total + loss_fn(functional_call(model, {**fast, **buffers}, (qx[t],)), qy[t])
    model.train(True)
    return total / sx.shape[0]


# =============================================================================================
# Running the engine and comparing
# =============================================================================================

def wrt_of(model: nn.Module, hp: dict[str, Tensor] | None = None) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad] + list((hp or {}).values())


def grads_of(loss: Tensor, wrt: Sequence[Tensor]) -> list[Tensor]:
    """Gradients, with zeros where the loss does not depend on a tensor."""
    gs = torch.autograd.grad(loss, list(wrt), allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(gs, wrt)]


def engine_meta_grads(model: nn.Module, optimizer: Any, steps: int, data: Sequence[Tensor], wrt: Sequence[Tensor],
                      **loop_options: Any) -> tuple[Tensor, list[Tensor], InnerLoop]:
    loop = InnerLoop(model, optimizer, steps=steps, **loop_options)
    loss = loop.meta_loss(*data)
    return loss.detach(), grads_of(loss, wrt), loop


def max_error(ours: Sequence[Tensor], reference: Sequence[Tensor]) -> float:
    """Worst ``|ours - ref| / max(1, |ref|)`` over a list of tensors."""
    assert len(ours) == len(reference)
    return max(parity_error(a, b) for a, b in zip(ours, reference))


def snapshot(model: nn.Module) -> list[Tensor]:
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def assert_unchanged(model: nn.Module, before: Sequence[Tensor]) -> None:
    now = list(model.parameters()) + list(model.buffers())
    for a, b in zip(now, before):
        assert torch.equal(a.detach(), b), "the engine modified the model's parameters or buffers"


def fd4(f: Callable[[float], float], h: float) -> float:
    """Fourth-order central difference of ``f`` at 0."""
    return (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * h)


def finite_difference(f: Callable[[float], float],
                      steps: Sequence[float] = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7),
                      agree: float = 1e-9) -> float:
    """``f'(0)`` by fourth-order differences at shrinking steps, stopping when two consecutive
    estimates agree to ``agree`` (relative). Adam's first step is ``g/(|g| + eps)`` per element,
    whose curvature lives on the scale of the smallest |g|, so no single step fits every draw;
    returns the later estimate of the closest consecutive pair. (Measured: with tied weights,
    Adam, seed 45 the central difference still moves at h = 1e-6 — -0.27338 — and settles at
    h = 1e-7 on -0.2734694, 5e-9 from autograd; float64 round-off there is about 1e-9.)"""
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


def directional_error(fd: float, analytic: float, scale: float) -> float:
    """``|fd - analytic|`` relative to ``|analytic|``, or to 1% of ``scale`` = ‖∇‖‖d‖ when the
    random direction happens to be nearly orthogonal to the gradient."""
    return abs(fd - analytic) / max(abs(analytic), 1e-2 * scale)


def assert_matches_finite_differences(loop: InnerLoop, batch: Sequence[Tensor], tensors: Sequence[Tensor],
                                      gradient: Sequence[Tensor], seed: int, tol: float = 1e-6) -> None:
    """The meta-gradient ``gradient`` of ``loop.meta_loss(*batch)`` w.r.t. ``tensors`` against central
    differences along one random direction (the tensors are moved in place and restored)."""
    g = torch.Generator().manual_seed(seed)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in tensors]
    saved = [p.detach().clone() for p in tensors]

    def meta_loss_at(step: float) -> float:
        with torch.no_grad():
            for p, s, d in zip(tensors, saved, direction):
                p.copy_(s + step * d)
            value = float(loop.meta_loss(*batch))
            for p, s in zip(tensors, saved):
                p.copy_(s)
        return value

    analytic = float(sum((gr * d).sum() for gr, d in zip(gradient, direction)))
    scale = math.sqrt(sum(float((gr * gr).sum()) for gr in gradient) * sum(float((d * d).sum()) for d in direction))
    assert directional_error(finite_difference(meta_loss_at), analytic, scale) <= tol


# =============================================================================================
# Second order
# =============================================================================================

@settings(QUICK, max_examples=examples(10))
@given(model_name=st.sampled_from(["mlp", "tied", "buffers", "frozen", "anil"]),
       kind=st.sampled_from(OPTIMIZERS), steps=st.integers(1, 3), n_tasks=st.integers(1, 3),
       vectorize=st.booleans(), seed=st.integers(0, 2**16))
def test_second_order_matches_finite_differences(model_name, kind, steps, n_tasks, vectorize, seed):
    """(Adam with eps = 1e-3 here: its step g/(|g| + eps) bends on the scale of eps where a
    gradient element is near zero, below what a finite difference can resolve; the small-eps
    regime is checked exactly against the hand-written loop.)"""
    model = build(model_name, seed)
    optimizer, hp = make_optimizer(kind, adapted_params(model, model_name), eps=1e-3)
    data = tasks(model_name, n_tasks, seed + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    loop = InnerLoop(model, optimizer, steps=steps, vectorize=vectorize)
    loss = loop.meta_loss(*data)
    grads = grads_of(loss, params + list(hp.values()))

    def meta_loss_at(tensors: Sequence[Tensor], direction: Sequence[Tensor]) -> Callable[[float], float]:
        saved = [t.detach().clone() for t in tensors]

        def f(step: float) -> float:
            with torch.no_grad():
                for t, s, d in zip(tensors, saved, direction):
                    t.copy_(s + step * d)
                value = float(loop.meta_loss(*data))
                for t, s in zip(tensors, saved):
                    t.copy_(s)
            return value
        return f

    g = torch.Generator().manual_seed(seed)
    for trial in range(2):  # random directions in parameter space
        direction = [torch.randn(p.shape, generator=g, dtype=F64) for p in params]
        analytic = float(sum((gp * d).sum() for gp, d in zip(grads, direction)))
        scale = math.sqrt(sum(float((gp * gp).sum()) for gp in grads[: len(params)])) * math.sqrt(
            sum(float((d * d).sum()) for d in direction))
        fd = finite_difference(meta_loss_at(params, direction))
        error = record("FD second_order", "theta", directional_error(fd, analytic, scale))
        assert error <= FD_TOL, f"direction {trial}: FD {fd!r} vs autograd {analytic!r}"
    for (name, h), gh in zip(hp.items(), grads[len(params):]):  # every tensor hyperparameter
        fd = finite_difference(meta_loss_at([h], [torch.ones((), dtype=F64)]))
        # relative, with a floor of 1e-4 for gradients that vanish (momentum in a single step,
        # Adam's beta1 at its first step): then the absolute error must be below 1e-10
        error = record("FD second_order", name, directional_error(fd, float(gh), 1e-2))
        assert error <= FD_TOL, f"{name}: FD {fd!r} vs autograd {float(gh)!r}"


@pytest.mark.parametrize("vectorize", [False, True])
def test_second_order_gradcheck(vectorize):
    """torch.autograd.gradcheck on a tiny problem: θ, lr and momentum together."""
    model = build("mlp", 3)
    lr, momentum = hyper(0.3), hyper(0.5)
    loop = InnerLoop(model, SGD(model.parameters(), lr=lr, momentum=momentum), steps=2, vectorize=vectorize)
    data = tasks("mlp", 2, 4, support=3, query=3)
    inputs = tuple(model.parameters()) + (lr, momentum)
    assert torch.autograd.gradcheck(lambda *_: loop.meta_loss(*data), inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@settings(QUICK, max_examples=examples(12))
@given(model_name=st.sampled_from(DETERMINISTIC), kind=st.sampled_from(OPTIMIZERS), steps=st.integers(1, 4),
       n_tasks=st.integers(1, 3), vectorize=st.booleans(), seed=st.integers(0, 2**16))
def test_second_order_equals_hand_written_loop(model_name, kind, steps, n_tasks, vectorize, seed):
    """Meta-loss and meta-gradient (θ and hyperparameters) equal a plain functional_call loop."""
    model = build(model_name, seed)
    optimizer, hp = make_optimizer(kind, adapted_params(model, model_name))
    data = tasks(model_name, n_tasks, seed + 1)
    wrt = wrt_of(model, hp)
    loss, grads, _ = engine_meta_grads(model, optimizer, steps, data, wrt, vectorize=vectorize)
    reference = reference_meta_loss(model, model_name, kind, hp, steps, data)
    error = record("second_order vs loop", model_name,
                   max_error([loss] + grads, [reference] + grads_of(reference, wrt)))
    assert error <= EXACT


@pytest.mark.parametrize("momentum", [0.0, 0.7])
@pytest.mark.parametrize("vectorize", [False, True])
def test_second_order_equals_higher(momentum, vectorize):
    """The same meta-gradient as higher.innerloop_ctx with torch.optim.SGD, task by task."""
    model = build("mlp", 5)
    data = tasks("mlp", 3, 6)
    steps, lr = 3, 0.2
    loop = InnerLoop(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), steps=steps,
                     vectorize=vectorize)
    ours = grads_of(loop.meta_loss(*data), list(model.parameters()))

    sx, sy, qx, qy = data
    inner = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    total = 0.0
    for t in range(sx.shape[0]):
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt_):
            for _ in range(steps):
                diffopt_.step(F.mse_loss(fmodel(sx[t]), sy[t]))
            total = total + F.mse_loss(fmodel(qx[t]), qy[t])
    reference = grads_of(total / sx.shape[0], list(model.parameters()))
    assert record("second_order vs higher", "sgd", max_error(ours, reference)) <= EXACT


@pytest.mark.parametrize("vectorize", [False, True])
def test_tied_weight_read_directly_is_the_fast_weight(vectorize):
    """Regression: higher writes a submodule's fast weights only when the submodule is called,
    so ``h @ self.embed.weight`` read a stale tensor (no meta-gradient through that use)."""
    model = build("tied", 13)
    data = tasks("tied", 2, 14)
    optimizer, hp = make_optimizer("sgd", list(model.parameters()))
    wrt = wrt_of(model, hp)
    loop = InnerLoop(model, optimizer, steps=2, vectorize=vectorize)
    ours = grads_of(loop.meta_loss(*data), wrt)
    reference = grads_of(reference_meta_loss(model, "tied", "sgd", hp, 2, data), wrt)
    assert max_error(ours, reference) <= EXACT
    adapted = loop.adapt(*data[:2])
    names = [n for n, _ in model.named_parameters()]
    for t in range(2):
        expected = functional_call(model, dict(zip(names, adapted.task(t))), (data[2][t],))
        assert max_error([loop.predict(adapted, data[2])[t]], [expected]) <= EXACT


class ZeroGradientNet(nn.Module):
    """An MLP whose third input column is always zero (that weight column's inner gradient is
    exactly zero) and with a parameter the forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 1)
        self.unused = nn.Parameter(torch.ones(2))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x, torch.zeros_like(x[..., :1])], dim=-1)
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("mode", ["second_order", "checkpointed", "forward", "implicit"])
def test_adam_second_order_is_finite_where_the_gradient_is_zero(mode):
    """The sqrt-at-zero trap: Adam's second moment is exactly zero for a zero gradient, and
    d sqrt(v)/dv = inf there gave NaN meta-gradients in higher. Both paths agree."""
    results = []
    for vectorize in (False, True):
        torch.manual_seed(15)
        model = ZeroGradientNet().to(F64)
        optimizer, hp = make_optimizer("adam", list(model.parameters()))
        wrt = wrt_of(model, hp)
        loop = InnerLoop(model, optimizer, steps=3, mode=mode, vectorize=vectorize, proximal=1.0,
                         forward_wrt=list(hp.values()))
        grads = grads_of(loop.meta_loss(*tasks("mlp", 2, 16)), wrt)
        assert all(bool(torch.isfinite(g).all()) for g in grads), mode
        results.append(grads)
    assert max_error(*results) <= EXACT
    if mode == "second_order":  # the zero-gradient column receives only the query gradient: zero too
        body_weight = [n for n, _ in model.named_parameters()].index("body.weight")
        assert float(results[0][body_weight][:, 2].abs().max()) == 0.0


@settings(QUICK, max_examples=examples(4))
@given(kind=st.sampled_from(OPTIMIZERS), vectorize=st.booleans(), seed=st.integers(0, 2**16))
def test_tasks_are_independent(kind, vectorize, seed):
    """A meta-batch gives every task what it would get alone (also with a global-norm clip,
    which must be taken per task)."""
    model = build("mlp", seed)
    data = tasks("mlp", 3, seed + 1)
    for options in ({}, {"clip_grad_norm": 0.05}, {"clip_grad_value": 0.02}):
        optimizer, _ = make_optimizer(kind, list(model.parameters()), **options)
        loop = InnerLoop(model, optimizer, steps=2, vectorize=vectorize)
        together = loop.query_losses(loop.adapt(*data[:2]), *data[2:])
        alone = torch.cat([loop.query_losses(loop.adapt(*(d[t:t + 1] for d in data[:2])),
                                             *(d[t:t + 1] for d in data[2:])) for t in range(3)])
        assert record("task independence", "query losses", max_error([together], [alone])) <= EXACT, options


def test_second_order_accepts_torch_optim_on_a_subset():
    """A torch.optim optimizer over the head only (ANIL) equals the diffopt one."""
    model = build("anil", 2)
    data = tasks("anil", 2, 3)
    wrt = list(model.parameters())
    a = engine_meta_grads(model, torch.optim.SGD(model.head.parameters(), lr=0.1, momentum=0.5), 3, data, wrt)[1]
    b = engine_meta_grads(model, SGD(model.head.parameters(), lr=0.1, momentum=0.5), 3, data, wrt)[1]
    assert max_error(a, b) == 0.0
    adapted = InnerLoop(model, SGD(model.head.parameters(), lr=0.1), steps=1).adapt(*data[:2])
    assert adapted.adapted == [False, False, True, True]
    assert adapted.params[0] is model.body.weight and adapted.params[2].shape == (2, 1, 4)


# =============================================================================================
# First order
# =============================================================================================

@settings(QUICK, max_examples=examples(8))
@given(model_name=st.sampled_from(["mlp", "tied", "anil", "frozen"]), kind=st.sampled_from(OPTIMIZERS),
       steps=st.integers(1, 4), n_tasks=st.integers(1, 3), vectorize=st.booleans(), seed=st.integers(0, 2**16))
def test_first_order_matches_formula(model_name, kind, steps, n_tasks, vectorize, seed):
    """Inner gradients are constants, the updates differentiable: θ gets the query gradient at
    the adapted weights (SGD) and the hyperparameters get their gradient through every update."""
    model = build(model_name, seed)
    optimizer, hp = make_optimizer(kind, adapted_params(model, model_name))
    data = tasks(model_name, n_tasks, seed + 1)
    wrt = wrt_of(model, hp)
    loss, grads, _ = engine_meta_grads(model, optimizer, steps, data, wrt, mode="first_order", vectorize=vectorize)
    reference = reference_meta_loss(model, model_name, kind, hp, steps, data, first_order=True)
    error = record("first_order vs formula", model_name,
                   max_error([loss] + grads, [reference] + grads_of(reference, wrt)))
    assert error <= EXACT
    assert float(grads[len(wrt) - len(hp)].abs()) > 0, "the learning rate got no gradient"


def test_first_order_theta_gradient_is_query_gradient_at_adapted_weights():
    model = build("mlp", 1)
    data = tasks("mlp", 2, 2)
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.1), steps=3, mode="first_order")
    grads = grads_of(loop.meta_loss(*data), list(model.parameters()))
    adapted = InnerLoop(model, SGD(model.parameters(), lr=0.1), steps=3).adapt(*data[:2])
    phi = [p.detach().requires_grad_() for p in adapted.params]
    q = InnerLoop(model, SGD(model.parameters(), lr=0.1), steps=3).query_losses(
        diffopt.unroll.Adapted(phi, adapted.adapted, adapted.buffers, {}), *data[2:]).mean()
    expected = [g.sum(0) for g in torch.autograd.grad(q, phi)]
    assert max_error(grads, expected) <= EXACT


# =============================================================================================
# Truncated
# =============================================================================================

@settings(QUICK, max_examples=examples(6))
@given(model_name=st.sampled_from(["mlp", "tied", "anil"]), kind=st.sampled_from(OPTIMIZERS),
       steps=st.integers(1, 4), vectorize=st.booleans(), seed=st.integers(0, 2**16))
def test_truncated_full_window_equals_second_order(model_name, kind, steps, vectorize, seed):
    model = build(model_name, seed)
    data = tasks(model_name, 2, seed + 1)
    results = []
    for mode, options in (("second_order", {}), ("truncated", {"truncate": steps})):
        optimizer, hp = make_optimizer(kind, adapted_params(model, model_name))
        wrt = wrt_of(model, hp)
        loss, grads, _ = engine_meta_grads(model, optimizer, steps, data, wrt, mode=mode, vectorize=vectorize,
                                           **options)
        results.append([loss] + grads)
    assert record("truncated(K) vs second_order", model_name, max_error(*results)) <= EXACT


@pytest.mark.parametrize("vectorize", [False, True])
def test_truncated_zero_window_is_identity_jacobian(vectorize):
    """k = 0: dφ_K/dθ is taken as the identity, so θ's gradient is the first-order one (SGD)."""
    model = build("mlp", 7)
    data = tasks("mlp", 3, 8)
    params = list(model.parameters())
    truncated = engine_meta_grads(model, SGD(params, lr=0.2), 4, data, params, mode="truncated", truncate=0,
                                  vectorize=vectorize)[1]
    first = engine_meta_grads(model, SGD(params, lr=0.2), 4, data, params, mode="first_order",
                              vectorize=vectorize)[1]
    assert record("truncated(0) vs first_order", "theta", max_error(truncated, first)) <= EXACT


@pytest.mark.parametrize("window", [1, 2, 3])
def test_truncated_window_matches_stop_gradient_reference(window):
    """K − k steps without a graph, reconnected as θ + stopgrad(φ − θ), then k differentiable steps."""
    model, steps = build("mlp", 9), 4
    data = tasks("mlp", 2, 10)
    optimizer, hp = make_optimizer("momentum", list(model.parameters()))
    wrt = wrt_of(model, hp)
    _, grads, _ = engine_meta_grads(model, optimizer, steps, data, wrt, mode="truncated", truncate=window)

    sx, sy, qx, qy = data
    theta = dict(model.named_parameters())
    total = 0.0
    for t in range(2):
        fast, state = dict(theta), {n: {} for n in theta}
        for k in range(steps):
            if k == steps - window:  # reconnect
                fast = {n: theta[n] + (fast[n] - theta[n]).detach() for n in theta}
                state = {n: {key: v.detach() for key, v in s.items()} for n, s in state.items()}
            graph = k >= steps - window
            if not graph:
                fast = {n: v.detach().requires_grad_() for n, v in fast.items()}
            loss = F.mse_loss(functional_call(model, fast, (sx[t],)), sy[t])
            gs = torch.autograd.grad(loss, list(fast.values()), create_graph=graph)
            for n, g in zip(list(fast), gs):
                fast[n] = reference_update("momentum", fast[n], g, state[n], hp)
                if not graph:
                    fast[n] = fast[n].detach()
                    state[n] = {key: v.detach() for key, v in state[n].items()}
        total = total + F.mse_loss(functional_call(model, fast, (qx[t],)), qy[t])
    reference = grads_of(total / 2, wrt)
    assert record("truncated(k) vs stopgrad loop", str(window), max_error(grads, reference)) <= EXACT


# =============================================================================================
# Checkpointed
# =============================================================================================

@pytest.mark.parametrize("vectorize", [False, True])
def test_inputs_that_require_grad_get_the_second_order_gradient(vectorize):
    """Features from an encoder outside the loop (ANIL): the encoder's meta-gradient through the
    inner steps is the same in second order, truncated(K) and checkpointed modes."""
    sx, sy, qx, qy = tasks("mlp", 2, 17)
    encoder = torch.tensor([[0.8, -0.5], [0.4, 1.2]], dtype=F64, requires_grad=True)
    results = []
    for mode, options in (("second_order", {}), ("truncated", {"truncate": 3}), ("checkpointed", {"segment": 2})):
        model = build("anil", 18)
        optimizer, hp = make_optimizer("momentum", list(model.head.parameters()))
        loop = InnerLoop(model, optimizer, steps=3, mode=mode, vectorize=vectorize, **options)
        loss = loop.meta_loss(torch.tanh(sx @ encoder), sy, torch.tanh(qx @ encoder), qy)
        results.append(grads_of(loss, [encoder] + wrt_of(model, hp)))
    for mode, result in zip(("truncated", "checkpointed"), results[1:]):
        assert record(f"{mode} vs second_order", "inputs", max_error(result, results[0])) <= EXACT


CHECKPOINT_CASES = [
    # (model, optimizer, batchnorm policy, K, segment lengths)
    ("mlp", "momentum", "transductive", 5, [1, 2, 3, 5, None]),
    ("mlp", "adam", "transductive", 5, [1, 2, 3, 5, None]),
    ("tied", "nesterov", "transductive", 4, [1, 3]),
    ("convbn", "momentum", "transductive", 3, [2]),
    ("convbn", "adam", "per_task", 3, [1, 2]),
    ("convbn", "sgd", "frozen", 3, [2]),
    ("dropout", "adam", "transductive", 4, [1, 3, 4]),
]


@pytest.mark.parametrize("model_name,kind,batchnorm,steps,segments", CHECKPOINT_CASES)
@pytest.mark.parametrize("vectorize", [False, True])
def test_checkpointed_equals_second_order(model_name, kind, batchnorm, steps, segments, vectorize):
    """Segment recomputation reproduces second order exactly: optimizer state (momentum, Adam's
    moments and step) carried across segments, per-task BatchNorm statistics, and Dropout masks
    (the RNG state is restored for the recomputation)."""
    model = build(model_name, 11)
    data = tasks(model_name, 2, 12, support=4, query=4)

    def run(mode: str, **options: Any) -> list[Tensor]:
        optimizer, hp = make_optimizer(kind, adapted_params(model, model_name))
        wrt = wrt_of(model, hp)
        torch.manual_seed(1234)
        loss, grads, loop = engine_meta_grads(model, optimizer, steps, data, wrt, mode=mode, vectorize=vectorize,
                                              batchnorm=batchnorm, **options)
        return [loss] + grads

    before = snapshot(model)
    reference = run("second_order")
    for segment in segments:
        error = record("checkpointed vs second_order", f"{model_name}/{segment}",
                       max_error(run("checkpointed", segment=segment), reference))
        assert error <= EXACT, f"segment={segment}"
    assert_unchanged(model, before)
