"""Hugging Face decoders as inner-loop clients (issue 14): GPT-2, LLaMA and Qwen2 built from tiny
configs with random weights (no download), float64, every mode, vectorize True and False.

References: a hand-written per-task MAML loop (``torch.func.functional_call``, attention by
the MATH backend) to 1e-10, central finite differences to 1e-6 relative, the task loop for
``vectorize=True``. The loss is the user's, on the decoder's logits.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
import transformers  # in the test extra (pyproject.toml): CI runs these tests, never skips them
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import diffopt
from diffopt.unroll import CG, ES, Checkpointed, Forward, Implicit, InnerLoop, Truncated
from test_unroll import assert_matches_finite_differences

VOCAB, HIDDEN, LENGTH, TASKS, BATCH, STEPS, LR = 24, 16, 8, 2, 2, 2, 0.5


def decoder(family: str) -> nn.Module:
    """A one-layer decoder of ``family`` with random weights, in float64."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2 * LENGTH}
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=2 * LENGTH, n_embd=HIDDEN, n_layer=1, n_head=2,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    elif family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    return model.double()


FAMILIES = ["gpt2", "llama", "qwen2"]


def rms_norms_in_float64(model: nn.Module) -> None:
    """LLaMA's and Qwen2's RMSNorm compute in float32 whatever the model's dtype
    (``hidden_states.to(torch.float32)``): its rounding (~1e-7) is beyond what a finite
    difference can see through. For the finite-difference check only, the same formula,
    ``w * h / sqrt(mean(h²) + eps)``, in the input's dtype; the check against the hand-written
    loop runs on the unmodified model."""
    def forward(self: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(forward, module)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The user's loss on the decoder's logits: next-token cross-entropy."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, VOCAB, (TASKS, BATCH, LENGTH), generator=g) for _ in range(4))


def loop_for(model: nn.Module, mode: object = "second_order", vectorize: bool = False, **options: object) -> InnerLoop:
    return InnerLoop(model, diffopt.optim.SGD(model.parameters(), lr=LR), lm_loss, steps=STEPS, mode=mode,
                     vectorize=vectorize, **options)


def engine_gradient(loop: InnerLoop, batch: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loop.meta_loss(*batch), loop.theta))


def reference_gradient(model: nn.Module, batch: tuple[torch.Tensor, ...],
                       first_order: bool = False) -> list[torch.Tensor]:
    """MAML by hand: per task, functional_call with explicit weights, attention by MATH."""
    sx, sy, qx, qy = batch
    names = [n for n, _ in model.named_parameters()]
    theta = list(model.parameters())

    def loss(weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return lm_loss(functional_call(model, dict(zip(names, weights)), (x,), {"use_cache": False}).logits, y)

    with sdpa_kernel([SDPBackend.MATH]):
        losses = []
        for t in range(TASKS):
            weights = list(theta)
            for _ in range(STEPS):
                grads = torch.autograd.grad(loss(weights, sx[t], sy[t]), weights, create_graph=not first_order)
                weights = [w - LR * g for w, g in zip(weights, grads)]
            losses.append(loss(weights, qx[t], qy[t]))
        return list(torch.autograd.grad(torch.stack(losses).mean(), theta))


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("family", FAMILIES)
def test_second_order_meta_gradient_of_a_decoder(family: str) -> None:
    model, batch = decoder(family), data()
    loop = loop_for(model)
    assert loop.backend == "functional_call" and "transformers module" in loop.backend_reason
    gradient = engine_gradient(loop, batch)
    assert max_difference(gradient, reference_gradient(model, batch)) <= 1e-10
    assert max_difference(engine_gradient(loop_for(model, vectorize=True), batch), gradient) <= 1e-10

    rms_norms_in_float64(model)
    loop = loop_for(model)
    gradient = engine_gradient(loop, batch)
    assert_matches_finite_differences(loop, batch, loop.theta, gradient, seed=3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("vectorize", [False, True])
def test_every_mode_on_a_decoder(family: str, vectorize: bool) -> None:
    """First order against the hand-written loop; checkpointed, truncated to K and forward mode
    against second order; implicit (CG) and ES run and give finite meta-gradients (they are
    checked against references on attention models in test_unroll_attention.py)."""
    model, batch = decoder(family), data()
    full = engine_gradient(loop_for(model, vectorize=vectorize), batch)
    first = engine_gradient(loop_for(model, "first_order", vectorize), batch)
    assert max_difference(first, reference_gradient(model, batch, first_order=True)) <= 1e-10
    for mode in (Checkpointed(1), Truncated(STEPS)):
        assert max_difference(engine_gradient(loop_for(model, mode, vectorize), batch), full) <= 1e-10
    lr = torch.tensor(LR, dtype=torch.double, requires_grad=True)

    def lr_gradient(mode: object) -> torch.Tensor:
        loop = InnerLoop(model, diffopt.optim.SGD(model.parameters(), lr=lr), lm_loss, steps=STEPS, mode=mode,
                         vectorize=vectorize)
        return torch.autograd.grad(loop.meta_loss(*batch), lr)[0]

    # Forward mode takes its JVPs by a double VJP, whose float32 RMSNorm rounding (LLaMA, Qwen2)
    # differs from reverse mode's at 1e-8: compare the two modes on float64 norms.
    rms_norms_in_float64(model)
    assert abs(float(lr_gradient(Forward()) - lr_gradient("second_order"))) <= 1e-10
    implicit = engine_gradient(loop_for(model, Implicit(CG(20)), vectorize, proximal=10.0), batch)
    es = engine_gradient(loop_for(model, ES(samples=2, sigma=1e-3, generator=torch.Generator().manual_seed(0)),
                                  vectorize), batch)
    assert all(torch.isfinite(g).all() for g in implicit + es)


def test_gradient_checkpointing_is_refused_with_the_fix() -> None:
    """A model that recomputes its activations in the backward would recompute them with its own
    weights, not the fast ones (silently wrong from the second inner step on): refused, naming
    gradient_checkpointing_disable() and the engine's own checkpointed mode; after disabling, the
    meta-gradient equals the hand-written loop's."""
    model = decoder("gpt2")
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match=r"InnerLoop: transformer recomputes its activations in the backward .*"
                                         r"gradient_checkpointing_disable\(\) first; .*mode='checkpointed'"):
        loop_for(model)
    with pytest.raises(ValueError, match=r"innerloop: transformer recomputes its activations"):
        with diffopt.innerloop(model, torch.optim.SGD(model.parameters(), lr=LR)):
            pass
    model.gradient_checkpointing_disable()
    batch = data()
    loop = loop_for(model)
    assert max_difference(engine_gradient(loop, batch), reference_gradient(model, batch)) < 1e-10
    # switched on after the loop is built: refused at every entry point (first order had been 4e-2 off)
    adapted = loop.adapt_without_graph(*batch[:2])
    model.gradient_checkpointing_enable()
    for call in (lambda: loop.meta_loss(*batch), lambda: loop.adapt(*batch[:2]),
                 lambda: loop.predict(adapted, batch[2])):
        with pytest.raises(ValueError, match=r"InnerLoop\.\w+: transformer recomputes its activations"):
            call()


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Left-padded next-token data, packed for PaddedSequences: per task two sequences of 3 and 8
    tokens (support) and 5 and 8 (query), padded on the left to 8; a padded input has target -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in ((3, 8), (5, 8)):
        tokens = torch.randint(0, VOCAB, (TASKS, BATCH, LENGTH + 1), generator=g)
        mask = torch.stack([torch.arange(LENGTH + 1) >= LENGTH + 1 - n - 1 for n in lengths]).long()
        mask = mask.expand(TASKS, -1, -1)
        tokens = tokens * mask  # pad id 0
        ids, next_ids = tokens[..., :-1], tokens[..., 1:]
        out += [diffopt.unroll.PaddedSequences.pack(ids, mask[..., :-1]), torch.where(mask[..., :-1] > 0, next_ids, -100)]
    return tuple(out)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padded_sequences_equal_the_hand_written_loop_and_their_unpadded_selves(family: str) -> None:
    """Through PaddedSequences the engine's meta-gradient equals a hand-written loop that calls the model
    with input_ids, attention_mask and position_ids; and a left-padded sequence gives what it gives
    unpadded (one sequence per task: the padded positions are masked as keys and ignored as targets)."""
    model = decoder(family)
    wrapped = diffopt.unroll.PaddedSequences(model)
    sx, sy, qx, qy = padded_batch()
    loop = InnerLoop(wrapped, diffopt.optim.SGD(wrapped.parameters(), lr=LR), lm_loss, steps=STEPS)
    ours = list(torch.autograd.grad(loop.meta_loss(sx, sy, qx, qy), list(model.parameters())))

    names = [n for n, _ in model.named_parameters()]
    theta = list(model.parameters())

    def loss(weights, packed, y):
        ids, mask = packed.unbind(-2)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = functional_call(model, dict(zip(names, weights)), (), {"input_ids": ids, "attention_mask": mask,
                                                                      "position_ids": positions, "use_cache": False})
        return lm_loss(out.logits, y)

    with sdpa_kernel([SDPBackend.MATH]):
        losses = []
        for t in range(TASKS):
            weights = list(theta)
            for _ in range(STEPS):
                grads = torch.autograd.grad(loss(weights, sx[t], sy[t]), weights, create_graph=True)
                weights = [w - LR * g for w, g in zip(weights, grads)]
            losses.append(loss(weights, qx[t], qy[t]))
        reference = torch.autograd.grad(torch.stack(losses).mean(), theta)
    assert max_difference(ours, list(reference)) <= 1e-10

    first = [t[:, :1] for t in (sx, sy, qx, qy)]  # the short sequences alone, one per task
    padded = InnerLoop(wrapped, diffopt.optim.SGD(wrapped.parameters(), lr=LR), lm_loss, steps=STEPS)
    padded_gradient = torch.autograd.grad(padded.meta_loss(*first), list(model.parameters()))
    keep = [first[0][0, 0, 1] > 0, first[2][0, 0, 1] > 0]  # the unpadded positions (equal in every task)
    unpadded = (first[0][:, :, 0][..., keep[0]], first[1][..., keep[0]], first[2][:, :, 0][..., keep[1]],
                first[3][..., keep[1]])
    plain = InnerLoop(model, diffopt.optim.SGD(model.parameters(), lr=LR), lm_loss, steps=STEPS)
    plain_gradient = torch.autograd.grad(plain.meta_loss(*unpadded), list(model.parameters()))
    assert max_difference(list(padded_gradient), list(plain_gradient)) <= 1e-10


def test_padded_sequences_refuse_unpacked_inputs() -> None:
    wrapped = diffopt.unroll.PaddedSequences(decoder("gpt2"))
    with pytest.raises(ValueError, match=r"expected integer inputs of shape \(\.\.\., 2, length\)"):
        wrapped(torch.randint(0, VOCAB, (3, LENGTH)))
    with pytest.raises(ValueError, match="must have the same shape"):
        diffopt.unroll.PaddedSequences.pack(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4))
    # an additive mask (0 / finfo.min) had been packed as 0 / int64-min: an IndexError deep in the embedding,
    # or (positions=False) a silently inverted mask; any value but 0 and 1 is refused, naming the conversion
    additive = torch.zeros(2, 3).masked_fill(torch.tensor([[False, True, True], [True, True, True]]).logical_not(),
                                             torch.finfo(torch.float32).min)
    with pytest.raises(ValueError, match=r"mask must hold 1 for a token and 0 for padding .* \(mask == 0\)\.long\(\)"):
        diffopt.unroll.PaddedSequences.pack(torch.zeros(2, 3, dtype=torch.long), additive)
    with pytest.raises(ValueError, match=r"found \[2\]"):
        diffopt.unroll.PaddedSequences.pack(torch.zeros(2, 3, dtype=torch.long), torch.full((2, 3), 2))
    packed = diffopt.unroll.PaddedSequences.pack(torch.zeros(2, 3, dtype=torch.long), additive == 0)  # bool: fine
    assert packed[:, 1].tolist() == [[0, 1, 1], [1, 1, 1]]


def test_a_base_model_without_logits_and_higher_on_a_sliced_layer_list_are_named() -> None:
    """Two errors that had come from deep inside: a Hugging Face base model (no .logits) made torch.stack
    fail on its output object; backend='higher' on LLaMA failed in higher's MonkeyPatched ('root')."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=2 * HIDDEN)).eval()
    ids = torch.randint(0, VOCAB, (TASKS, BATCH, LENGTH))
    loop = InnerLoop(bert, diffopt.optim.SGD(bert.parameters(), lr=LR), lambda o, y: o.mean(), steps=1,
                     vectorize=False)
    with pytest.raises(TypeError, match=r"returned a BaseModelOutput\w* without logits \(fields \['last_hidden_state'"):
        loop.meta_loss(ids, ids, ids, ids)
    llama = decoder("llama")
    loop = InnerLoop(llama, diffopt.optim.SGD(llama.parameters(), lr=LR), lm_loss, steps=1, backend="higher")
    with pytest.raises(TypeError, match=r"backend='higher' cannot run LlamaForCausalLM.*backend='auto' or "
                                        r"'functional_call'"):
        loop.meta_loss(*data())


def test_padded_sequences_under_vmap_names_the_mask_code() -> None:
    """vectorize=True on PaddedSequences fails with any mask (Hugging Face reads the mask's values); the
    error had blamed 'a layer of the model'."""
    wrapped = diffopt.unroll.PaddedSequences(decoder("gpt2"))
    support, support_y, query, query_y = padded_batch()
    loop = InnerLoop(wrapped, diffopt.optim.SGD(wrapped.parameters(), lr=LR), lm_loss, steps=1, vectorize=True)
    with pytest.raises(RuntimeError, match=r"vectorize=True failed: the wrapped model's attention-mask code"):
        loop.meta_loss(support, support_y, query, query_y)
