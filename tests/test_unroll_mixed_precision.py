"""Mixed precision (issue 14): bf16 autocast inner loops on CPU, float32 fast weights.

``InnerLoop(..., autocast=torch.bfloat16)`` runs the forwards and losses under
``torch.autocast``; the fast weights, their updates and the meta-gradient stay float32. The
engine is checked against a hand-written loop under the same autocast (same ops, so agreement
to float32 round-off), the task-batched kernels against the task loop (vmap, which autocast does not
reach, is not taken under autocast), and the meta-gradient against
the float32 one (bf16 keeps 8 significant bits: the error is measured and bounded, see
``benchmarks/mixed_precision.md`` for the figures at d=128, L=128).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import diffopt
from diffopt.unroll import InnerLoop

D, LENGTH, TASKS, BATCH, STEPS, LR = 16, 8, 2, 2, 2, 0.2


def model_and_data() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(D, 2, 2 * D, dropout=0.0, batch_first=True), nn.Linear(D, 1))
    g = torch.Generator().manual_seed(1)
    batch = tuple(torch.randn(TASKS, BATCH, LENGTH, n, generator=g) for n in (D, 1, D, 1))
    return model, batch


def meta_gradient(model: nn.Module, batch, autocast: torch.dtype | None, vectorize: bool = False) -> torch.Tensor:
    loop = InnerLoop(model, diffopt.optim.SGD(model.parameters(), lr=LR), F.mse_loss, steps=STEPS,
                     vectorize=vectorize, autocast=autocast)
    adapted = loop.adapt(*batch[:2])
    assert all(p.dtype == torch.float32 for p in adapted.params)  # fast weights stay float32
    grads = torch.autograd.grad(loop.meta_loss(*batch), list(model.parameters()))
    assert all(g.dtype == torch.float32 for g in grads)
    return torch.cat([g.flatten() for g in grads])


def reference(model: nn.Module, batch) -> torch.Tensor:
    """MAML by hand: forwards and losses under bf16 autocast, float32 SGD updates."""
    sx, sy, qx, qy = batch
    names = [n for n, _ in model.named_parameters()]
    theta = list(model.parameters())

    def loss(weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.mse_loss(functional_call(model, dict(zip(names, weights)), (x,)), y).float()

    losses = []
    for t in range(TASKS):
        weights = list(theta)
        for _ in range(STEPS):
            with sdpa_kernel([SDPBackend.MATH]):
                grads = torch.autograd.grad(loss(weights, sx[t], sy[t]), weights, create_graph=True)
            weights = [w - LR * g for w, g in zip(weights, grads)]
        losses.append(loss(weights, qx[t], qy[t]))
    return torch.cat([g.flatten() for g in torch.autograd.grad(torch.stack(losses).mean(), theta)])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_bf16_autocast_equals_the_hand_written_loop_and_stays_near_float32() -> None:
    model, batch = model_and_data()
    mixed = meta_gradient(model, batch, torch.bfloat16)
    assert relative(mixed, reference(model, batch)) <= 1e-6  # same ops: float32 round-off only
    full = meta_gradient(model, batch, None)
    error = relative(mixed, full)
    # bf16 rounds to 2^-8 relative; measured 1.7e-2 at this size (benchmarks/mixed_precision.md).
    assert 1e-5 < error < 0.1, error
    assert relative(meta_gradient(model, batch, None, vectorize=True), full) <= 1e-5


def test_autocast_takes_a_path_it_reaches() -> None:
    """torch.autocast does not reach operations torch.func.vmap traces: under autocast, 'auto' takes the
    task loop where it would take vmap, an explicit vmap is refused, and the task-batched kernels
    (plain torch operations, which autocast does reach) equal the task loop."""
    model, batch = model_and_data()
    for vectorize in (True, "vmap"):
        with pytest.raises(ValueError, match="torch.autocast does not reach the operations torch.func.vmap traces"):
            InnerLoop(model, diffopt.optim.SGD(model.parameters(), lr=LR), vectorize=vectorize,
                      autocast=torch.bfloat16)
    torch.manual_seed(0)
    normed = nn.Sequential(nn.Linear(D, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 1))  # vmap without autocast
    dtypes = []
    normed[0].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    loop = InnerLoop(normed, diffopt.optim.SGD(normed.parameters(), lr=LR), F.mse_loss, steps=STEPS,
                     autocast=torch.bfloat16)
    assert not loop.vectorize and loop.vectorize_reason.startswith("task loop: autocast=torch.bfloat16")
    loop.meta_loss(*(b[:, 0] for b in batch))
    assert set(dtypes) == {torch.bfloat16}
    assert InnerLoop(normed, diffopt.optim.SGD(normed.parameters(), lr=LR)).vectorize  # (vmap without autocast)
    plain = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 1))
    lowered = meta_gradient(plain, tuple(b[:, 0] for b in batch), torch.bfloat16, vectorize="auto")
    looped = meta_gradient(plain, tuple(b[:, 0] for b in batch), torch.bfloat16, vectorize=False)
    assert relative(lowered, looped) <= 1e-6


def test_autocast_names_the_accepted_dtypes() -> None:
    model, _ = model_and_data()
    with pytest.raises(ValueError, match="autocast must be None, torch.bfloat16 or torch.float16"):
        InnerLoop(model, autocast=torch.float64)
    with pytest.raises(ValueError, match=r"the model's weights are float64, and torch.autocast lowers float32 "
                                         r"operations only.*model.float\(\)"):
        InnerLoop(model.double(), autocast=torch.bfloat16)


def test_a_mixed_dtype_model_keeps_a_float32_meta_loss_under_autocast() -> None:
    """A bfloat16 base with float32 adapters (peft's default): the per-task losses had been cast to the
    first parameter's dtype, bfloat16, so the meta-loss was a bfloat16 number and its mean over three tasks
    was taken in bfloat16 (the meta-gradient scaled by 1.002). They are cast to the widest weight dtype."""
    torch.manual_seed(0)
    base, adapter = nn.Linear(D, D).to(torch.bfloat16), nn.Linear(D, 1)
    base.requires_grad_(False)
    model = nn.Sequential(base, adapter)
    g = torch.Generator().manual_seed(1)
    sx, qx = torch.randn(2, 3, 4, D, generator=g)
    sy, qy = torch.randn(2, 3, 4, 1, generator=g)

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out.float(), target)

    loop = InnerLoop(model, diffopt.optim.SGD(adapter.parameters(), lr=LR), loss, steps=1, autocast=torch.bfloat16)
    meta = loop.meta_loss(sx, sy, qx, qy)
    assert meta.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        per_task = torch.stack([loss(o, t) for o, t in zip(loop.predict(loop.adapt_without_graph(sx, sy), qx), qy)])
    assert float(meta) == float(per_task.float().mean())
