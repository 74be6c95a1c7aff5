"""Adapt a part, keep the rest (issue 14): peft LoRA adapters on GPT-2, the built-in
``add_lora``, and ``select_parameters`` ("head", "norms", "lora", name patterns), float64.

The fast weights are the adapters (or the selection); the rest is shared by the tasks —
frozen, or meta-learned when it requires grad. References: a hand-written per-task loop
adapting only those tensors (attention by MATH) to 1e-10, central finite differences over
the adapters' initialisation to 1e-6 relative, and the task loop for ``vectorize=True``.
"""
from __future__ import annotations


import peft  # in the test extra (pyproject.toml): CI runs these tests, never skips them
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import diffopt
from diffopt.unroll import InnerLoop, LoRALinear, add_lora, select_parameters
from test_unroll import assert_matches_finite_differences

VOCAB, HIDDEN, LENGTH, TASKS, BATCH, STEPS, LR = 24, 16, 8, 2, 2, 2, 0.5


def gpt2_with_lora() -> nn.Module:
    """A one-layer GPT-2 (random weights) with peft LoRA (rank 2) on the attention's c_attn,
    both adapter matrices random so that the first inner step already moves everything."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=2 * LENGTH, n_embd=HIDDEN, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    lora = peft.LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0, init_lora_weights=False,
                           fan_in_fan_out=True)
    return peft.get_peft_model(transformers.GPT2LMHeadModel(config), lora).double()


def encoder_with_lora() -> nn.Module:
    """An encoder layer and a head, with diffopt's own LoRA on the feed-forward layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(HIDDEN, 2, 2 * HIDDEN, dropout=0.0, batch_first=True),
                          nn.Linear(HIDDEN, 1)).double()
    assert add_lora(model, ["linear1", "linear2"], rank=2, init="random") == ["0.linear1", "0.linear2"]
    return model


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def token_data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randint(0, VOCAB, (TASKS, BATCH, LENGTH), generator=g) for _ in range(4))


def vector_data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(TASKS, BATCH, LENGTH, HIDDEN, generator=g, dtype=torch.double) for _ in range(2)]
    y = [torch.randn(TASKS, BATCH, LENGTH, 1, generator=g, dtype=torch.double) for _ in range(2)]
    return x[0], y[0], x[1], y[1]


def predictions(model: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    out = functional_call(model, weights, (x,), {"use_cache": False} if isinstance(model, peft.PeftModel) else {})
    return out.logits if hasattr(out, "logits") else out


def reference(model: nn.Module, adapted: list[nn.Parameter], loss_fn, batch) -> list[torch.Tensor | None]:
    """Per task: SGD on the ``adapted`` tensors only (second order), the query loss; the gradient
    of the mean query loss for every parameter that requires grad (None for the frozen)."""
    sx, sy, qx, qy = batch
    named = list(model.named_parameters())
    adapted_ids = {id(p) for p in adapted}
    wanted = [p for _, p in named if p.requires_grad]
    with sdpa_kernel([SDPBackend.MATH]):
        losses = []
        for t in range(TASKS):
            weights = {n: p for n, p in named}
            for _ in range(STEPS):
                names = [n for n, p in named if id(p) in adapted_ids]
                loss = loss_fn(predictions(model, weights, sx[t]), sy[t])
                grads = torch.autograd.grad(loss, [weights[n] for n in names], create_graph=True)
                weights.update({n: weights[n] - LR * g for n, g in zip(names, grads)})
            losses.append(loss_fn(predictions(model, weights, qx[t]), qy[t]))
        grads = iter(torch.autograd.grad(torch.stack(losses).mean(), wanted))
    return [next(grads) if p.requires_grad else None for _, p in named]


def engine(model: nn.Module, adapted: list[nn.Parameter], loss_fn, batch, vectorize: bool = False):
    loop = InnerLoop(model, diffopt.optim.SGD(adapted, lr=LR), loss_fn, steps=STEPS, vectorize=vectorize)
    loss = loop.meta_loss(*batch)
    wanted = [p for p in model.parameters() if p.requires_grad]
    grads = iter(torch.autograd.grad(loss, wanted))
    return loop, [next(grads) if p.requires_grad else None for p in model.parameters()]


def assert_close(a: list[torch.Tensor | None], b: list[torch.Tensor | None], tol: float = 1e-10) -> None:
    assert [x is None for x in a] == [y is None for y in b]
    assert max(float((x - y).abs().max()) for x, y in zip(a, b) if x is not None) <= tol


@pytest.mark.parametrize("base", ["frozen", "meta-learned"])
def test_peft_lora_on_gpt2_meta_learns_the_adapters_initialisation(base: str) -> None:
    model, batch = gpt2_with_lora(), token_data()
    adapters = select_parameters(model, "lora")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if "lora_" in n]  # peft froze the base
    if base == "meta-learned":
        for p in model.parameters():
            p.requires_grad_(True)
    loop, gradient = engine(model, adapters, lm_loss, batch)
    assert loop.backend == "functional_call" and "peft module" in loop.backend_reason
    assert_close(gradient, reference(model, adapters, lm_loss, batch))
    assert_close(engine(model, adapters, lm_loss, batch, vectorize=True)[1], gradient)
    positions = [j for j, (n, _) in enumerate(model.named_parameters()) if "lora_" in n]
    assert all(gradient[j] is not None and gradient[j].abs().sum() > 0 for j in positions)
    if base == "frozen":
        assert sum(g is not None for g in gradient) == len(adapters)
        assert_matches_finite_differences(loop, batch, adapters, [gradient[j] for j in positions], seed=5)


def test_builtin_lora_equals_the_hand_written_loop_and_finite_differences() -> None:
    model, batch = encoder_with_lora(), vector_data()
    assert isinstance(model[0].linear1, LoRALinear) and not model[0].linear1.base.weight.requires_grad
    adapters = select_parameters(model, "lora")
    assert len(adapters) == 4
    loop, gradient = engine(model, adapters, F.mse_loss, batch)
    assert_close(gradient, reference(model, adapters, F.mse_loss, batch))
    assert_close(engine(model, adapters, F.mse_loss, batch, vectorize=True)[1], gradient)
    # the shared, non-frozen weights (attention, norms, head) are meta-learned too
    assert gradient[[n for n, _ in model.named_parameters()].index("1.weight")] is not None
    adapter_gradients = [g for (n, _), g in zip(model.named_parameters(), gradient) if "lora_" in n]
    assert_matches_finite_differences(loop, batch, adapters, adapter_gradients, seed=5)


def test_lora_starts_equal_to_its_base_layer() -> None:
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    wrapped = LoRALinear(base, rank=2)
    x = torch.randn(4, 5)
    assert torch.equal(wrapped(x), base(x))
    with pytest.raises(ValueError, match="no nn.Linear .* matches"):
        add_lora(nn.Sequential(nn.Linear(2, 2)), ["q_proj"])


def names_of(model: nn.Module, which) -> list[str]:
    chosen = {id(p) for p in select_parameters(model, which)}
    return [n for n, p in model.named_parameters() if id(p) in chosen]


def test_selections_name_the_expected_parameters() -> None:
    gpt2 = gpt2_with_lora()
    assert names_of(gpt2, "head") == ["base_model.model.transformer.wte.weight"]  # lm_head is tied to wte
    assert all(n.endswith(("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "ln_f.weight", "ln_f.bias"))
               for n in names_of(gpt2, "norms"))
    assert len(names_of(gpt2, "norms")) == 6
    assert names_of(gpt2, ["*c_fc*"]) == ["base_model.model.transformer.h.0.mlp.c_fc.weight",
                                          "base_model.model.transformer.h.0.mlp.c_fc.bias"]
    plain = encoder_with_lora()
    assert names_of(plain, "head") == ["1.weight", "1.bias"]
    assert names_of(plain, "norms") == ["0.norm1.weight", "0.norm1.bias", "0.norm2.weight", "0.norm2.bias"]
    with pytest.raises(ValueError, match="not one of"):
        select_parameters(plain, "heads")
    with pytest.raises(ValueError, match="matched no parameter"):
        select_parameters(plain, ["*nothing*"])


@pytest.mark.parametrize("which", ["head", "norms", ["0.self_attn.*"]])
def test_adapting_a_selection_equals_the_hand_written_loop(which) -> None:
    model, batch = encoder_with_lora(), vector_data()
    chosen = select_parameters(model, which)
    assert_close(engine(model, chosen, F.mse_loss, batch)[1], reference(model, chosen, F.mse_loss, batch))


def test_add_lora_refuses_what_a_wrapper_would_break_and_names_the_alternatives() -> None:
    """nn.MultiheadAttention reads its out_proj's weight directly (a LoRA wrapper would break the next
    forward): refused before the model is changed. GPT-2's Conv1D is named with peft as the way; a
    tied weight frozen as a LoRA base is warned about."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    before = [n for n, _ in layer.named_modules()]
    for targets in (["out_proj"], ["self_attn.*"], ["*"]):
        with pytest.raises(ValueError, match=r"self_attn.out_proj is nn.MultiheadAttention's output projection"):
            add_lora(layer, targets)
    assert [n for n, _ in layer.named_modules()] == before
    layer(torch.randn(1, 3, 8))  # still runs
    transformers.logging.set_verbosity_error()
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1,
                                                                n_head=2, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn is transformers' Conv1D .* peft"):
        add_lora(gpt2, ["c_attn"])
    with pytest.warns(UserWarning, match=r"lm_head.weight is tied to transformer.wte.weight"):
        add_lora(gpt2, ["lm_head"])
