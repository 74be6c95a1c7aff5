"""Second-order meta-steps of a 4-layer decoder on per-task bigram languages (issue 14).

Each task is a random bigram language over 32 tokens (its own transition matrix); the
support and query sets are sequences sampled from it, and the loss is next-token
cross-entropy. The model: token and position embeddings, 4 causal
``nn.TransformerEncoderLayer`` (d=128, 4 heads, feed-forward 512), a linear head. One
second-order meta-step (2 tasks, 1 sequence each, 1 inner SGD step):

* ``diffopt second_order`` and ``diffopt checkpointed`` — ``InnerLoop`` (task loop; the
  engine runs the inner forwards with MATH attention and the query forward fused);
* ``diffopt second_order, blockwise attention`` — ``InnerLoop(attention="blockwise")``: the
  fused forward and a backward recomputed in blocks of 64 query rows (:mod:`diffopt.unroll.blockwise`);
* ``plain PyTorch (MATH)`` — the hand-written task loop with every forward under
  ``sdpa_kernel(SDPBackend.MATH)``, the baseline the issue names.

Time: median of interleaved rounds; memory: peak tensor bytes (profiler).

A second table: the inner loop of a GPT-2-small-shaped model (``transformers``, d=768, 12 heads,
2 layers, random weights, vocabulary cut to 8192 to keep the machine's memory) adapting every
weight against adapting peft LoRA adapters (rank 8 on ``c_attn``, base frozen). Run:

    OMP_NUM_THREADS=1 python benchmarks/transformer_meta.py [--quick]

Results: ``benchmarks/transformer_meta.md``.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import diffopt
from diffopt._measure import interleave, peak_tensor_bytes, set_threads, summarize
from diffopt.unroll import Checkpointed, InnerLoop, select_parameters

VOCAB, LR = 32, 0.1


class Decoder(nn.Module):
    def __init__(self, d: int, layers: int, length: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, d)
        self.positions = nn.Parameter(0.02 * torch.randn(length, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[-1]
        mask = nn.Transformer.generate_square_subsequent_mask(n)
        return self.head(self.body(self.tokens(ids) + self.positions[:n], mask=mask, is_causal=True))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def bigram_tasks(tasks: int, sequences: int, length: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Support and query (inputs, next tokens) from one random bigram language per task."""
    g = torch.Generator().manual_seed(seed)
    transitions = torch.softmax(3 * torch.randn(tasks, VOCAB, VOCAB, generator=g), -1)
    out = []
    for _ in range(2):
        seq = torch.empty(tasks, sequences, length + 1, dtype=torch.long)
        seq[..., 0] = torch.randint(0, VOCAB, (tasks, sequences), generator=g)
        for i in range(length):
            probs = transitions[torch.arange(tasks)[:, None], seq[..., i]]
            seq[..., i + 1] = torch.multinomial(probs.reshape(-1, VOCAB), 1, generator=g).reshape(tasks, sequences)
        out += [seq[..., :-1], seq[..., 1:]]
    return tuple(out)


def plain_step(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> None:
    """MAML by hand, attention by MATH everywhere."""
    sx, sy, qx, qy = batch
    names = [n for n, _ in model.named_parameters()]
    theta = list(model.parameters())
    with sdpa_kernel([SDPBackend.MATH]):
        losses = []
        for t in range(sx.shape[0]):
            grads = torch.autograd.grad(lm_loss(functional_call(model, dict(zip(names, theta)), (sx[t],)), sy[t]),
                                        theta, create_graph=True)
            fast = [p - LR * g for p, g in zip(theta, grads)]
            losses.append(lm_loss(functional_call(model, dict(zip(names, fast)), (qx[t],)), qy[t]))
        torch.autograd.grad(torch.stack(losses).mean(), theta)


def engine_step(loop: InnerLoop, batch: tuple[torch.Tensor, ...]) -> None:
    torch.autograd.grad(loop.meta_loss(*batch), loop.theta)


def lora_table(quick: bool) -> None:
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    d, heads, vocab, length = (64, 4, 256, 16) if quick else (768, 12, 8192, 128)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=length, n_embd=d, n_layer=2, n_head=heads,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))

    g = torch.Generator().manual_seed(0)
    batch = tuple(torch.randint(0, vocab, (2, 1, length), generator=g) for _ in range(4))
    torch.manual_seed(0)
    full = transformers.GPT2LMHeadModel(config)
    torch.manual_seed(0)
    lora = peft.get_peft_model(transformers.GPT2LMHeadModel(config),
                               peft.LoraConfig(r=8, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True))
    loops = {
        "full fine-tuning": InnerLoop(full, diffopt.optim.SGD(full.parameters(), lr=LR), loss, steps=1),
        "LoRA r=8 (c_attn)": InnerLoop(lora, diffopt.optim.SGD(select_parameters(lora, "lora"), lr=LR), loss,
                                       steps=1),
    }
    steps = {name: (lambda loop=loop: torch.autograd.grad(loop.meta_loss(*batch),
                                                          [p for p in loop.theta if p.requires_grad]))
             for name, loop in loops.items()}
    times = interleave(steps, repeats=3, warmup=1)
    peaks = {name: peak_tensor_bytes(fn)[1] for name, fn in steps.items()}
    print(f"\nGPT-2-shaped inner loop: d={d}, {heads} heads, 2 layers, vocabulary {vocab}, L={length}; "
          "2 tasks, 1 inner step, second order\n")
    print("| adapted | adapted parameters | ms | peak MiB | peak / full |")
    print("|---|---|---|---|---|")
    for name, loop in loops.items():
        adapted = sum(loop.theta[j].numel() for j in loop.positions)
        print(f"| {name} | {adapted:,} | {summarize(times[name])['median'] * 1e3:.0f} | {peaks[name] / 2**20:.1f} | "
              f"{peaks[name] / peaks['full fine-tuning']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA table")
    args = parser.parse_args()
    set_threads(1)
    d, layers, lengths = (32, 2, [16]) if args.quick else (128, 4, [128, 512])
    print(f"decoder: {layers} layers, d={d}, 4 heads; 2 tasks x 1 sequence, 1 inner step, second order\n")
    print("| L | implementation | ms | ratio to plain | peak MiB | ratio to plain |")
    print("|---|---|---|---|---|---|")
    for length in lengths:
        torch.manual_seed(0)
        model = Decoder(d, layers, length)
        batch = bigram_tasks(2, 1, length)
        sgd = diffopt.optim.SGD(model.parameters(), lr=LR)
        second = InnerLoop(model, sgd, lm_loss, steps=1, vectorize=False)
        checkpointed = InnerLoop(model, sgd, lm_loss, steps=1, mode=Checkpointed(1), vectorize=False)
        blockwise = InnerLoop(model, sgd, lm_loss, steps=1, vectorize=False, attention="blockwise")
        steps: dict[str, Callable[[], None]] = {
            "plain PyTorch (MATH)": lambda: plain_step(model, batch),
            "diffopt second_order": lambda: engine_step(second, batch),
            "diffopt checkpointed": lambda: engine_step(checkpointed, batch),
            "diffopt second_order, blockwise attention": lambda: engine_step(blockwise, batch),
        }
        times = interleave(steps, repeats=3 if args.quick else 5, warmup=1)
        peaks = {name: peak_tensor_bytes(fn)[1] for name, fn in steps.items()}
        base_t = summarize(times["plain PyTorch (MATH)"])["median"]
        base_m = peaks["plain PyTorch (MATH)"]
        for name in steps:
            t = summarize(times[name])["median"]
            print(f"| {length} | {name} | {t * 1e3:.0f} | {t / base_t:.2f} | {peaks[name] / 2**20:.1f} | "
                  f"{peaks[name] / base_m:.2f} |")
    if not args.no_lora:
        lora_table(args.quick)


if __name__ == "__main__":
    main()
