"""Meta-learn a LoRA initialisation for a tiny decoder on a family of bigram languages.

Every task is a language over 16 tokens whose bigram table is a shared structure plus a
task-specific perturbation. The decoder (2 causal transformer layers, d=32) is frozen; only its
LoRA adapters (``diffopt.unroll.add_lora``, rank 4) are adapted in the inner loop, and their
initialisation is meta-learned with second-order MAML. On held-out tasks it prints the query
loss (next-token cross-entropy) before and after adaptation, with 95% confidence intervals,
for the meta-learned initialisation and for LoRA's default one (B = 0). A few minutes of CPU
at the defaults:

    python examples/lora_meta_init.py --iterations 300
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import diffopt
from diffopt.unroll import InnerLoop, add_lora, select_parameters

VOCAB, LENGTH = 16, 16


class TinyDecoder(nn.Module):
    def __init__(self, d: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, d)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[-1])
        return self.head(self.body(self.tokens(ids), mask=mask, is_causal=True))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


class BigramFamily:
    """Bigram tables softmax(3·S + 2·E_task): a shared S, a fresh E per task."""

    def __init__(self, seed: int = 0) -> None:
        self.shared = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed))

    def batch(self, tasks: int, sequences: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        table = torch.softmax(3 * self.shared + 2 * torch.randn(tasks, VOCAB, VOCAB, generator=generator), -1)
        out = []
        for _ in range(2):  # support, query
            seq = torch.empty(tasks, sequences, LENGTH + 1, dtype=torch.long)
            seq[..., 0] = torch.randint(0, VOCAB, (tasks, sequences), generator=generator)
            for i in range(LENGTH):
                probs = table[torch.arange(tasks)[:, None], seq[..., i]].reshape(-1, VOCAB)
                seq[..., i + 1] = torch.multinomial(probs, 1, generator=generator).reshape(tasks, sequences)
            out += [seq[..., :-1], seq[..., 1:]]
        return tuple(out)


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyDecoder()
    for p in model.parameters():
        p.requires_grad_(False)  # the base stays frozen; only the adapters learn
    add_lora(model, ["linear1", "linear2", "head"], rank=4)
    return model


def evaluate(loop: InnerLoop, family: BigramFamily, tasks: int, steps: int) -> dict[str, tuple[float, float]]:
    """Mean query loss over held-out tasks and its 95% CI, unadapted and after ``steps`` steps."""
    sx, sy, qx, qy = family.batch(tasks, 2, torch.Generator().manual_seed(10_000))
    with torch.no_grad():
        curves = loop.query_losses_along(sx, sy, qx, qy, at=[0, steps])
    return {name: (float(row.mean()), 1.96 * float(row.std()) / math.sqrt(tasks))
            for name, row in zip(("unadapted", "adapted"), curves)}


def main(iterations: int = 300, inner_steps: int = 3, meta_batch: int = 8, test_tasks: int = 64,
         seed: int = 0) -> dict[str, dict[str, tuple[float, float]]]:
    family = BigramFamily(seed)
    results = {}
    for name, train in (("LoRA default init (B = 0)", False), ("meta-learned LoRA init", True)):
        model = build(seed)
        adapters = select_parameters(model, "lora")
        loop = InnerLoop(model, diffopt.optim.SGD(adapters, lr=0.5), lm_loss, steps=inner_steps)
        if train:
            outer = torch.optim.Adam(adapters, lr=3e-3)
            g = torch.Generator().manual_seed(seed + 1)
            for i in range(iterations):
                outer.zero_grad()
                loss = loop.meta_loss(*family.batch(meta_batch, 1, g))
                loss.backward()
                outer.step()
                if (i + 1) % max(iterations // 5, 1) == 0:
                    print(f"iteration {i + 1}: meta-loss {loss.item():.3f}")
        results[name] = evaluate(loop, family, test_tasks, inner_steps)
    print(f"\nheld-out tasks ({test_tasks}), query cross-entropy (nats), mean ± 95% CI:")
    for name, summary in results.items():
        (u, cu), (a, ca) = summary["unadapted"], summary["adapted"]
        print(f"  {name:28s} unadapted {u:.3f} ± {cu:.3f}   after {inner_steps} steps {a:.3f} ± {ca:.3f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--inner-steps", type=int, default=3)
    args = parser.parse_args()
    main(args.iterations, args.inner_steps)
