"""Second order through attention (issue 14): every attention form, every mode, float64.

References: a hand-written per-task MAML loop under the MATH backend (≤1e-10), central
finite differences of the meta-loss along a random direction (≤1e-6 relative), and the
task loop for ``vectorize=True``. The fused kernel must stay where no second-order graph is
needed, and an op without a double backward is refused naming the module and the op.
"""
from __future__ import annotations

import contextlib
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import diffopt
from diffopt.errors import SecondOrderUnavailable
from diffopt.unroll import blockwise
from diffopt.unroll import CG, Checkpointed, Forward, Implicit, InnerLoop, Truncated, double_differentiable
from test_unroll import assert_matches_finite_differences

D, HEADS, LENGTH, TASKS, BATCH, STEPS, LR = 8, 2, 6, 2, 2, 2, 0.3
FLASH = "ScaledDotProductFlashAttentionForCpuBackward0"


class SDPA(nn.Module):
    """Self-attention through ``F.scaled_dot_product_attention`` in one of its forms."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        kv_heads = 1 if form.startswith("gqa") else HEADS
        self.q = nn.Linear(D, D)
        self.kv = nn.Linear(D, 2 * kv_heads * D // HEADS)
        self.kv_heads = kv_heads
        g = torch.Generator().manual_seed(1)
        self.register_buffer("bool_mask", (torch.rand(LENGTH, LENGTH, generator=g) > 0.4) | torch.eye(LENGTH).bool())
        self.register_buffer("additive_mask", torch.randn(LENGTH, LENGTH, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, HEADS, -1).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2 * self.kv_heads, -1).transpose(1, 2).chunk(2, dim=1)
        options = {}
        if self.form == "causal":
            options["is_causal"] = True
        elif self.form == "bool_mask":
            options["attn_mask"] = self.bool_mask
        elif self.form == "additive_mask":
            options["attn_mask"] = self.additive_mask
        elif self.form == "gqa":
            options["enable_gqa"] = True
        elif self.form == "gqa_repeat":
            k, v = k.repeat_interleave(HEADS, dim=1), v.repeat_interleave(HEADS, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, **options)
        return out.transpose(1, 2).reshape(b, n, D)


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(D, HEADS, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.attention(x, x, x, attn_mask=mask, need_weights=False)[0]


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(D, HEADS, 2 * D, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.layer(x, x.flip(1), tgt_mask=mask, tgt_is_causal=True)


def body(form: str) -> nn.Module:
    if form == "mha":
        return MHA()
    if form == "encoder":
        return nn.TransformerEncoderLayer(D, HEADS, 2 * D, dropout=0.0, batch_first=True)
    if form == "decoder":
        return Decoder()
    return SDPA(form)


FORMS = ["plain", "causal", "bool_mask", "additive_mask", "gqa", "gqa_repeat", "mha", "encoder", "decoder"]


def model_for(form: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(body(form), nn.Linear(D, 1)).double()


def data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shape = (TASKS, BATCH, LENGTH)
    return tuple(torch.randn(*shape, n, generator=g, dtype=torch.double) for n in (D, 1, D, 1))


def loop_for(model: nn.Module, mode: object = "second_order", vectorize: bool = False, **options: object) -> InnerLoop:
    return InnerLoop(model, diffopt.optim.SGD(model.parameters(), lr=LR), F.mse_loss, steps=STEPS, mode=mode,
                     vectorize=vectorize, **options)


def engine_gradient(loop: InnerLoop, batch: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loop.meta_loss(*batch), loop.theta))


def reference_gradient(model: nn.Module, batch: tuple[torch.Tensor, ...],
                       first_order: bool = False) -> list[torch.Tensor]:
    """MAML written by hand, task by task, attention by the MATH backend."""
    sx, sy, qx, qy = batch
    names = [n for n, _ in model.named_parameters()]
    theta = list(model.parameters())
    with sdpa_kernel([SDPBackend.MATH]):
        losses = []
        for t in range(TASKS):
            weights = list(theta)
            for _ in range(STEPS):
                loss = F.mse_loss(functional_call(model, dict(zip(names, weights)), (sx[t],)), sy[t])
                grads = torch.autograd.grad(loss, weights, create_graph=not first_order)
                weights = [w - LR * g for w, g in zip(weights, grads)]
            losses.append(F.mse_loss(functional_call(model, dict(zip(names, weights)), (qx[t],)), qy[t]))
        return list(torch.autograd.grad(torch.stack(losses).mean(), theta))


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("form", FORMS)
def test_second_order_matches_the_hand_written_loop_and_finite_differences(form: str) -> None:
    model, batch = model_for(form), data()
    loop = loop_for(model)
    gradient = engine_gradient(loop, batch)
    assert max_difference(gradient, reference_gradient(model, batch)) <= 1e-10
    assert_matches_finite_differences(loop, batch, loop.theta, gradient, seed=2)


@pytest.mark.parametrize("form", ["causal", "gqa", "mha", "encoder", "decoder"])
def test_vectorize_equals_the_task_loop_and_batches_attention(form: str) -> None:
    model, batch = model_for(form), data()
    for mode in ("second_order", "first_order"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batched = engine_gradient(loop_for(model, mode, vectorize=True), batch)
        assert not [w for w in caught if "batching rule" in str(w.message)], [str(w.message) for w in caught]
        assert max_difference(batched, engine_gradient(loop_for(model, mode), batch)) <= 1e-10


def test_first_order_matches_the_hand_written_loop() -> None:
    model, batch = model_for("encoder"), data()
    assert max_difference(engine_gradient(loop_for(model, "first_order"), batch),
                          reference_gradient(model, batch, first_order=True)) <= 1e-10


@pytest.mark.parametrize("form", ["causal", "encoder"])
def test_every_graph_recording_mode_runs_through_attention(form: str) -> None:
    """Checkpointed recomputation, truncation to K and forward-mode JVPs equal second order;
    implicit differentiation's Hessian-vector products equal a dense-Hessian solve."""
    model, batch = model_for(form), data()
    full = engine_gradient(loop_for(model), batch)
    for mode in (Checkpointed(1), Truncated(STEPS)):
        assert max_difference(engine_gradient(loop_for(model, mode), batch), full) <= 1e-10
    lr = torch.tensor(LR, dtype=torch.double, requires_grad=True)

    def lr_gradient(mode: object) -> torch.Tensor:
        loop = InnerLoop(model, diffopt.optim.SGD(model.parameters(), lr=lr), F.mse_loss, steps=STEPS, mode=mode,
                         vectorize=False)
        return torch.autograd.grad(loop.meta_loss(*batch), lr)[0]

    assert abs(float(lr_gradient(Forward()) - lr_gradient("second_order"))) <= 1e-10
    for vectorize in (False, True):
        loop = loop_for(model, Implicit(CG(300, tol=1e-14)), vectorize=vectorize, proximal=PROXIMAL)
        assert max_difference(engine_gradient(loop, batch), implicit_reference(model, loop, batch)) <= 1e-10


PROXIMAL = 10.0


def implicit_reference(model: nn.Module, loop: InnerLoop, batch: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """iMAML's hypergradient with dense Hessians: mean over tasks of λ (H_t + λI)^{-1} ∇φ L_query,t
    at the engine's inner solution φ_t (Rajeswaran et al. 2019, eq. 6), attention by MATH."""
    sx, sy, qx, qy = batch
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    solution = loop.adapt_without_graph(sx, sy)

    def unflat(vector: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: v.view(s) for n, v, s in zip(names, vector.split(sizes), shapes)}

    total = torch.zeros_like(theta)
    with sdpa_kernel([SDPBackend.MATH]):
        for t in range(TASKS):
            phi = torch.cat([p[t].detach().flatten() for p in solution.params])

            def inner(vector: torch.Tensor, t: int = t) -> torch.Tensor:
                loss = F.mse_loss(functional_call(model, unflat(vector), (sx[t],)), sy[t])
                return loss + 0.5 * PROXIMAL * ((vector - theta) ** 2).sum()

            hessian = torch.autograd.functional.hessian(inner, phi)
            query = phi.clone().requires_grad_()
            v = torch.autograd.grad(F.mse_loss(functional_call(model, unflat(query), (qx[t],)), qy[t]), query)[0]
            total += PROXIMAL * torch.linalg.solve(hessian, v) / TASKS
    return [g.view(s) for g, s in zip(total.split(sizes), shapes)]


def graph_nodes(tensor: torch.Tensor) -> set[str]:
    names, seen, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(f for f, _ in node.next_functions)
    return names


def test_the_fused_kernel_stays_where_no_second_order_graph_is_recorded() -> None:
    model, batch = model_for("encoder"), data()
    first = graph_nodes(loop_for(model, "first_order").meta_loss(*batch))
    assert FLASH in first  # inner steps and query: fused
    second = graph_nodes(loop_for(model, "second_order").meta_loss(*batch))
    assert FLASH in second  # the query forward is differentiated once: fused
    assert "torch::autograd::NotImplemented" not in second  # the inner forwards: MATH


def test_innerloop_differentiates_twice_through_attention() -> None:
    model, batch = model_for("encoder"), data()
    sx, sy, qx, qy = batch
    losses = []
    for t in range(TASKS):
        with diffopt.innerloop(model, torch.optim.SGD(model.parameters(), lr=LR)) as (fmodel, dopt):
            for _ in range(STEPS):
                dopt.step(F.mse_loss(fmodel(sx[t]), sy[t]))
            losses.append(F.mse_loss(fmodel(qx[t]), qy[t]))
    gradient = torch.autograd.grad(torch.stack(losses).mean(), list(model.parameters()))
    assert max_difference(list(gradient), reference_gradient(model, batch)) <= 1e-10


def test_a_hand_written_loop_over_diffopt_optim_with_double_differentiable() -> None:
    """Outside the engine the user's forwards are the user's: ``double_differentiable()`` around
    them makes ``diffopt.optim``'s differentiable steps work through attention."""
    model, batch = model_for("encoder"), data()
    sx, sy, qx, qy = batch
    names = [n for n, _ in model.named_parameters()]
    losses = []
    for t in range(TASKS):
        optimizer = diffopt.optim.SGD(model.parameters(), lr=LR)
        weights = list(model.parameters())
        for _ in range(STEPS):
            with double_differentiable():
                loss = F.mse_loss(functional_call(model, dict(zip(names, weights)), (sx[t],)), sy[t])
            weights = optimizer.step(loss, params=weights)
        losses.append(F.mse_loss(functional_call(model, dict(zip(names, weights)), (qx[t],)), qy[t]))
    gradient = torch.autograd.grad(torch.stack(losses).mean(), list(model.parameters()))
    assert max_difference(list(gradient), reference_gradient(model, batch)) <= 1e-10


class Distances(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("centres", torch.randn(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(self.proj(x), self.centres).sum(-1, keepdim=True)


@pytest.mark.parametrize("vectorize", [False, True])
def test_an_op_without_double_backward_is_named_with_its_module(vectorize: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Distances(), nn.Linear(1, 1))
    x, y = torch.randn(2, 5, 4), torch.randn(2, 5, 1)
    loop = InnerLoop(model, diffopt.optim.SGD(model.parameters(), lr=0.1), steps=1, vectorize=vectorize)
    with pytest.raises(SecondOrderUnavailable, match=r"0 \(Distances\) uses aten::cdist.*mode='first_order'"):
        loop.meta_loss(x, y, x, y)
    first = InnerLoop(model, diffopt.optim.SGD(model.parameters(), lr=0.1), steps=1, mode="first_order",
                      vectorize=vectorize)
    first.meta_loss(x, y, x, y).backward()  # the suggested fix works


def test_attention_dropout_under_a_fixed_seed_is_recomputed_exactly() -> None:
    """With dropout in the attention and the feed-forward, checkpointed recomputation draws the
    same masks (the RNG state is restored and the segment's forward uses the recomputation's
    attention kernel), so it equals second order exactly, for every segment length."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(D, HEADS, 2 * D, dropout=0.2, batch_first=True),
                          nn.Linear(D, 1)).double()
    batch = data()

    def gradient(mode: object, seed: int = 5) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        loop = InnerLoop(model, diffopt.optim.SGD(model.parameters(), lr=LR), F.mse_loss, steps=3, mode=mode,
                         vectorize=False)
        return engine_gradient(loop, batch)

    full = gradient("second_order")
    for segment in (1, 2):
        assert max_difference(gradient(Checkpointed(segment)), full) == 0.0
    assert max_difference(gradient("second_order", seed=6), full) > 1e-3  # the masks matter: another seed differs


# -- attention="blockwise": the fused forward, a backward recomputed in blocks of rows ----------
@pytest.mark.parametrize("form", FORMS)
def test_blockwise_attention_equals_the_math_reference(form: str) -> None:
    """Blocks of 4 query rows (LENGTH = 6: a full and a partial block) so the block sums are exercised."""
    model, batch = model_for(form), data()
    loop = loop_for(model, attention="blockwise")
    with mock.patch.object(blockwise, "BLOCK", 4):
        gradient = engine_gradient(loop, batch)
    assert max_difference(gradient, reference_gradient(model, batch)) <= 1e-10


def test_blockwise_attention_in_every_graph_recording_mode() -> None:
    """Checkpointed recomputation, forward-mode JVPs (a third derivative through the blocks),
    implicit HVPs and vmap (which falls back to MATH) equal the MATH results."""
    model, batch = model_for("encoder"), data()
    math_gradient = engine_gradient(loop_for(model), batch)
    for mode, vectorize in ((Checkpointed(1), False), ("second_order", True)):
        assert max_difference(engine_gradient(loop_for(model, mode, vectorize, attention="blockwise"), batch),
                              math_gradient) <= 1e-10
    lr = torch.tensor(LR, dtype=torch.double, requires_grad=True)

    def lr_gradient(attention: str) -> torch.Tensor:
        loop = InnerLoop(model, diffopt.optim.SGD(model.parameters(), lr=lr), F.mse_loss, steps=STEPS,
                         mode=Forward(), vectorize=False, attention=attention)
        return torch.autograd.grad(loop.meta_loss(*batch), lr)[0]

    assert abs(float(lr_gradient("blockwise") - lr_gradient("math"))) <= 1e-10
    implicit = [engine_gradient(loop_for(model, Implicit(CG(300, tol=1e-14)), proximal=PROXIMAL, attention=a), batch)
                for a in ("math", "blockwise")]
    assert max_difference(*implicit) <= 1e-10


def test_blockwise_attention_keeps_no_attention_matrix_for_the_meta_gradient() -> None:
    """What the second-order graph holds: with MATH, softmax nodes (the L x L probabilities);
    with blockwise attention, none — only the blockwise backward's node."""
    model, batch = model_for("causal"), data()
    nodes = graph_nodes(loop_for(model, attention="blockwise").meta_loss(*batch))
    assert "_AttentionBackwardBackward" in nodes and "SafeSoftmaxBackward0" not in nodes
    assert "SafeSoftmaxBackward0" in graph_nodes(loop_for(model).meta_loss(*batch))


def test_attention_option_is_checked() -> None:
    with pytest.raises(ValueError, match="attention='flash': choose 'math'"):
        loop_for(model_for("causal"), attention="flash")


def _second_order_terms(attend, q, k, v, mask, forward_context=contextlib.nullcontext):
    """Attention's output, first derivatives and a second derivative (the meta-gradient's path); the
    forward alone runs inside ``forward_context()``, as the engine's forwards under autocast."""
    with forward_context():
        out = attend(q, k, v, attn_mask=mask)
    cotangent = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    first = torch.autograd.grad(out, (q, k, v), cotangent, create_graph=True)
    second = torch.autograd.grad(sum((f * f).sum() for f in first), (q, k, v))
    return (out, *first, *second)


def test_blockwise_attention_gives_a_fully_masked_row_zeros_like_math() -> None:
    """A query row that may attend to nothing (left padding) is 0 in the fused and MATH kernels;
    blockwise's recomputed backward had 0/0 = NaN there."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    mask[0] = False  # the first query attends to nothing
    with sdpa_kernel([SDPBackend.MATH]):
        expected = _second_order_terms(F.scaled_dot_product_attention, q, k, v, mask)
    got = _second_order_terms(lambda *a, **kw: blockwise.blockwise_attention(*a, **kw, block=2), q, k, v, mask)
    for a, b in zip(got, expected):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_blockwise_attention_under_autocast_takes_mixed_input_dtypes_like_math() -> None:
    """Under bf16 autocast, Q and K in float32 (LLaMA's RoPE upcasts) and V in bf16: MATH runs, and so
    does blockwise, whose backward (outside autocast) recomputes in the forward's precision."""
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 2, 6, 8, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 6, 8, generator=g).bfloat16().requires_grad_()
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    with sdpa_kernel([SDPBackend.MATH]):
        expected = _second_order_terms(F.scaled_dot_product_attention, q, k, v, mask, autocast)
    got = _second_order_terms(lambda *a, **kw: blockwise.blockwise_attention(*a, **kw, block=4), q, k, v, mask,
                              autocast)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and torch.isfinite(a).all()
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 2e-2  # bf16 keeps 8 bits
