"""bf16 autocast inner loops on CPU: the meta-gradient's error against float32, and the time.

A 2-layer causal transformer (``nn.TransformerEncoderLayer``, d=128, 4 heads, a linear head)
on a synthetic regression over sequences, 4 tasks of 2 sequences, 2 inner SGD steps.
``InnerLoop(..., autocast=torch.bfloat16)`` against the same loop in float32 (weights and fast
weights float32 in both); the meta-gradient's relative error ``‖g_bf16 − g_fp32‖ / ‖g_fp32‖``
and the median meta-step time of interleaved rounds. Run:

    OMP_NUM_THREADS=1 python benchmarks/mixed_precision.py [--quick]

Results: ``benchmarks/mixed_precision.md``.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import diffopt
from diffopt._measure import interleave, set_threads, summarize
from diffopt.unroll import InnerLoop


class CausalRegressor(nn.Module):
    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.head(self.body(x, mask=mask, is_causal=True))


def meta_gradient(model: nn.Module, batch: tuple[torch.Tensor, ...], mode: str,
                  autocast: torch.dtype | None) -> torch.Tensor:
    loop = InnerLoop(model, diffopt.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, steps=2, mode=mode,
                     vectorize=False, autocast=autocast)
    grads = torch.autograd.grad(loop.meta_loss(*batch), list(model.parameters()))
    return torch.cat([g.flatten() for g in grads])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    set_threads(1)
    torch.manual_seed(0)
    d, length = (32, 16) if args.quick else (128, 128)
    model = CausalRegressor(d, 2)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 2, length, d, generator=g), torch.randn(4, 2, length, 1, generator=g),
             torch.randn(4, 2, length, d, generator=g), torch.randn(4, 2, length, 1, generator=g))
    print(f"d={d}, L={length}, 2 layers, 4 tasks x 2 sequences, 2 inner steps\n")
    print("| mode | meta-gradient relative error (bf16 vs fp32) | fp32 ms | bf16 ms | bf16/fp32 time |")
    print("|---|---|---|---|---|")
    for mode in ("second_order", "first_order"):
        reference = meta_gradient(model, batch, mode, None)
        low = meta_gradient(model, batch, mode, torch.bfloat16)
        error = float((low - reference).norm() / reference.norm())
        times = interleave({"fp32": lambda: meta_gradient(model, batch, mode, None),
                            "bf16": lambda: meta_gradient(model, batch, mode, torch.bfloat16)},
                           repeats=3 if args.quick else 7, warmup=1)
        fp32, bf16 = (summarize(times[k])["median"] * 1e3 for k in ("fp32", "bf16"))
        print(f"| {mode} | {error:.2e} | {fp32:.1f} | {bf16:.1f} | {bf16 / fp32:.2f} |")


if __name__ == "__main__":
    main()
