"""Vectorised (vmap over tasks) against sequential (task loop) in every mode, BatchNorm
policies against hand-written references, and the ``vectorize="auto"`` rule (float64).

Dropout: the engine runs the vectorised forward under ``torch.func.vmap(...,
randomness="different")`` and the task loop draws its masks per step, then per
task; on CPU both consume the global generator identically, so with
``torch.manual_seed`` before each run the two paths see the same masks.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from diffopt.optim import SGD
from diffopt.unroll import InnerLoop, choose_vectorize
from strategies import record
from test_unroll import (
    EXACT, ConvBN, adapted_params, assert_unchanged, build, grads_of, make_optimizer, max_error,
    reference_meta_loss, single_threaded, snapshot, tasks, wrt_of,
)  # noqa: F401 (the fixture)

MODES = ["second_order", "first_order", "truncated", "checkpointed", "implicit", "forward", "es", "pes"]
MODE_OPTIONS: dict[str, dict[str, Any]] = {
    "truncated": {"truncate": 1},
    "checkpointed": {"segment": 1},
    # (a strongly convex inner problem, and CG run to its rounding floor: two solves stopped at a
    # residual of 1e-13 differ by up to cond(H)·1e-13, which is rounding, not vectorisation)
    "implicit": {"proximal": 5.0, "solver_iterations": 40, "solver_tol": 0.0},
    "es": {"es_samples": 2, "es_sigma": 0.1},
    "pes": {"es_samples": 2, "es_sigma": 0.1, "pes_truncation": 1},
}
#: (model, BatchNorm policy, optimizer)
CONFIGS = [
    ("mlp", "transductive", "adam"),
    ("tied", "transductive", "nesterov"),
    ("buffers", "transductive", "momentum"),
    ("frozen", "transductive", "adam"),
    ("anil", "transductive", "momentum"),
    ("dropout", "transductive", "sgd"),
    ("convbn", "transductive", "momentum"),
    ("convbn", "per_task", "adam"),
    ("convbn", "frozen", "sgd"),
]


def run_mode(model: nn.Module, model_name: str, kind: str, mode: str, vectorize: bool, data, batchnorm: str,
             steps: int = 3) -> list[Tensor]:
    optimizer, hp = make_optimizer(kind, adapted_params(model, model_name))
    wrt = wrt_of(model, hp)
    options = dict(MODE_OPTIONS.get(mode, {}))
    if mode in ("es", "pes"):
        options["generator"] = torch.Generator().manual_seed(99)
        if kind == "adam":  # perturbed betas must stay below 1
            options["es_sigma"] = 0.02
    if mode == "forward" and sum(p.numel() for p in model.parameters()) <= 30:
        options["forward_wrt"] = wrt  # model parameters too (one direction per element: small models)
    torch.manual_seed(2024)  # Dropout masks
    loop = InnerLoop(model, optimizer, steps=steps, mode=mode, vectorize=vectorize, batchnorm=batchnorm, **options)
    loss = loop.meta_loss(*data)
    assert loop.last_info["mode"] == mode
    return [loss.detach()] + grads_of(loss, wrt)


@pytest.mark.parametrize("model_name,batchnorm,kind", CONFIGS, ids=["-".join(c) for c in CONFIGS])
@pytest.mark.parametrize("mode", MODES)
def test_vectorized_equals_sequential(mode, model_name, batchnorm, kind):
    model = build(model_name, 50)
    conv = model_name == "convbn"  # (convolutions with double backward are slow on CPU: fewer tasks and steps)
    data = tasks(model_name, 2 if conv else 3, 51)
    before = snapshot(model)
    steps = 2 if conv else 3
    sequential = run_mode(model, model_name, kind, mode, False, data, batchnorm, steps)
    vectorized = run_mode(model, model_name, kind, mode, True, data, batchnorm, steps)
    error = record("vectorized vs sequential", mode, max_error(vectorized, sequential))
    assert error <= EXACT
    assert_unchanged(model, before)
    if mode not in ("first_order", "truncated"):  # (those drop most of the graph by design)
        assert any(float(g.abs().max()) > 0 for g in sequential[1:]), "no meta-gradient at all"


class ConvBN2(nn.Module):
    """Two conv + BatchNorm blocks (the shape of a small Conv-4)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.c2, self.b2 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.b1(self.c1(x)))
        return self.fc(torch.tanh(self.b2(self.c2(h))).flatten(1))


def test_vmap_batchnorm_second_order_trap():
    """Regression test for the known trap: vmap + BatchNorm + second order once gave meta-gradients
    off by 1e-2. The vectorised path must equal a plain functional_call loop."""
    torch.manual_seed(60)
    model = ConvBN2().to(torch.float64)
    g = torch.Generator().manual_seed(61)
    data = tuple(torch.randn(3, 5, *shape, generator=g, dtype=torch.float64)
                 for shape in ((1, 4, 4), (1,), (1, 4, 4), (1,)))
    params = list(model.parameters())
    loop = InnerLoop(model, SGD(params, lr=0.1), steps=2, vectorize=True)
    ours = grads_of(loop.meta_loss(*data), params)
    sx, sy, qx, qy = data
    total = 0.0
    for t in range(3):
        fast = dict(model.named_parameters())
        for _ in range(2):
            loss = F.mse_loss(functional_call(model, fast, (sx[t],)), sy[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - 0.1 * gp for (n, p), gp in zip(fast.items(), grads)}
        total = total + F.mse_loss(functional_call(model, fast, (qx[t],)), qy[t])
    # (functional_call in train mode updated the model's running statistics: irrelevant here)
    reference = grads_of(total / 3, params)
    assert record("vmap BatchNorm trap", "conv-bn x2", max_error(ours, reference)) <= EXACT


# =============================================================================================
# BatchNorm policies
# =============================================================================================

def with_running_stats(seed: int) -> nn.Module:
    """ConvBN whose running statistics are not the defaults (so that using them shows)."""
    model = build("convbn", seed)
    g = torch.Generator().manual_seed(seed)
    model.bn.running_mean.copy_(torch.randn(2, generator=g, dtype=torch.float64))
    model.bn.running_var.copy_(torch.rand(2, generator=g, dtype=torch.float64) + 0.5)
    model.bn.num_batches_tracked.fill_(3)
    return model


@pytest.mark.parametrize("vectorize", [False, True])
def test_batchnorm_per_task_matches_reference(vectorize):
    """Per task: running statistics start from the model's, inner steps normalise with batch
    statistics and update the task's copy; the query uses the adapted statistics (eval mode)."""
    model = with_running_stats(70)
    data = tasks("convbn", 2, 71)
    before = snapshot(model)
    optimizer, hp = make_optimizer("momentum", list(model.parameters()))
    wrt = wrt_of(model, hp)
    loop = InnerLoop(model, optimizer, steps=3, batchnorm="per_task", vectorize=vectorize)
    loss = loop.meta_loss(*data)
    ours = [loss.detach()] + grads_of(loss, wrt)
    adapted = loop.adapt(*data[:2])

    sx, sy, qx, qy = data
    theta = dict(model.named_parameters())
    total, statistics = 0.0, []
    for t in range(2):
        fast = dict(theta)
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        state: dict[str, dict] = {n: {} for n in fast}
        model.train()
        for _ in range(3):
            out = functional_call(model, {**fast, **buffers}, (sx[t],))  # updates `buffers` in place
            grads = torch.autograd.grad(F.mse_loss(out, sy[t]), list(fast.values()), create_graph=True)
            for (n, p), gp in zip(list(fast.items()), grads):
                buf = gp if "buf" not in state[n] else hp["momentum"] * state[n]["buf"] + gp
                state[n]["buf"] = buf
                fast[n] = p - hp["lr"] * buf
        model.eval()
        total = total + F.mse_loss(functional_call(model, {**fast, **buffers}, (qx[t],)), qy[t])
        statistics.append(list(buffers.values()))
        model.train()
    reference = [(total / 2).detach()] + grads_of(total / 2, wrt)
    assert record("per_task BatchNorm vs reference", "meta-gradient", max_error(ours, reference)) <= EXACT
    assert len(adapted.buffers) == 3  # running_mean, running_var, num_batches_tracked, per task
    for k in range(3):
        expected = torch.stack([statistics[t][k] for t in range(2)])
        assert adapted.buffers[k].shape == expected.shape
        assert max_error([adapted.buffers[k].to(torch.float64)], [expected.to(torch.float64)]) <= EXACT
    assert adapted.buffers[2].tolist() == [6, 6]  # 3 + one update per inner step
    assert_unchanged(model, before)
    assert model.training


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("batchnorm", ["transductive", "frozen"])
def test_batchnorm_transductive_and_frozen_match_reference(batchnorm, vectorize):
    """transductive: batch statistics everywhere (module in train mode); frozen: the model's
    running statistics everywhere (eval mode). Neither changes the model's buffers."""
    model = with_running_stats(72)
    data = tasks("convbn", 2, 73)
    before = snapshot(model)
    optimizer, hp = make_optimizer("adam", list(model.parameters()))
    wrt = wrt_of(model, hp)
    loop = InnerLoop(model, optimizer, steps=2, batchnorm=batchnorm, vectorize=vectorize)
    loss = loop.meta_loss(*data)
    ours = [loss.detach()] + grads_of(loss, wrt)
    reference_loss = reference_meta_loss(model, "convbn", "adam", hp, 2, data, train=batchnorm == "transductive")
    reference = [reference_loss.detach()] + grads_of(reference_loss, wrt)
    assert record(f"{batchnorm} BatchNorm vs reference", "meta-gradient", max_error(ours, reference)) <= EXACT
    assert loop.adapt(*data[:2]).buffers == []
    assert_unchanged(model, before)


def test_batchnorm_per_task_differs_from_transductive_under_shift():
    """A query set shifted away from the support: transductive normalisation removes the shift
    with the query's own statistics, per-task running statistics keep it."""
    model = build("convbn", 74)
    sx, sy, qx, qy = tasks("convbn", 2, 75)
    losses = {}
    for policy in ("transductive", "per_task", "frozen"):
        loop = InnerLoop(model, SGD(model.parameters(), lr=0.1), steps=2, batchnorm=policy)
        losses[policy] = loop.query_losses(loop.adapt(sx, sy), qx + 3.0, qy).detach()
    assert float((losses["per_task"] - losses["transductive"]).abs().min()) > 1e-3
    assert float((losses["per_task"] - losses["frozen"]).abs().min()) > 1e-3


def test_batchnorm_policy_validation():
    with pytest.raises(ValueError, match="not a BatchNorm policy.*transductive"):
        InnerLoop(build("convbn"), batchnorm="running")
    with pytest.raises(ValueError, match="track_running_stats=False.*transductive"):
        InnerLoop(ConvBN(track_running_stats=False).to(torch.float64), batchnorm="per_task")


# =============================================================================================
# vectorize="auto"
# =============================================================================================

def test_auto_picks_vmap_for_mlps_and_the_task_loop_for_conv_and_lstm():
    loop = InnerLoop(build("mlp"), vectorize="auto")
    assert loop.vectorize is True and loop.vectorize_reason.startswith("vmap")
    loop = InnerLoop(build("convbn"), vectorize="auto")
    assert loop.vectorize is False and "convolution" in loop.vectorize_reason
    loop = InnerLoop(build("lstm"), vectorize="auto")
    assert loop.vectorize is False and "lstm (LSTM)" in loop.vectorize_reason
    assert choose_vectorize(build("lstm")) == (loop.vectorize, loop.vectorize_reason)
    # the reason is reported with every adaptation
    sx, sy, qx, qy = tasks("lstm", 2, 80)
    loop.meta_loss(sx, sy, qx, qy).backward()  # second order through the LSTM, task by task
    assert loop.last_info["vectorize"] is False and loop.last_info["vectorize_reason"] == loop.vectorize_reason
    assert all(p.grad is not None for p in loop.model.parameters())


def test_vectorize_true_on_an_lstm_names_the_layer():
    model = build("lstm")
    loop = InnerLoop(model, vectorize=True)
    sx, sy, qx, qy = tasks("lstm", 2, 81)
    with pytest.raises(RuntimeError, match=r"lstm \(LSTM\).*vectorize=False"):
        loop.meta_loss(sx, sy, qx, qy)


def test_vectorize_rejects_other_values():
    with pytest.raises(ValueError, match="vectorize must be True, False, 'auto' or 'vmap'"):
        InnerLoop(build("mlp"), vectorize="yes")
