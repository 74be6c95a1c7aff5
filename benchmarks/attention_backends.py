"""Why diffopt switches attention to the MATH backend only where a graph is differentiated twice.

A first-order meta-step (the inner gradients are constants, one backward through attention)
on a 2-layer ``nn.TransformerEncoder`` (d=64, 4 heads), timed and its peak tensor memory
measured with attention by the fused kernel (PyTorch's default) and by the MATH backend, in
a task loop and under ``torch.func.vmap`` over the tasks. Run:

    OMP_NUM_THREADS=1 python benchmarks/attention_backends.py [--quick]

Results: ``benchmarks/attention_backends.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffopt._measure import interleave, peak_tensor_bytes, set_threads, summarize


def build(d: int = 64, layers: int = 2) -> nn.Module:
    layer = nn.TransformerEncoderLayer(d, 4, 2 * d, batch_first=True, dropout=0.0)
    return nn.Sequential(nn.TransformerEncoder(layer, layers, enable_nested_tensor=False), nn.Linear(d, 1))


def meta_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, vectorize: bool, math: bool) -> None:
    """One first-order MAML step: an inner SGD step per task, the query loss's gradient."""
    names = [n for n, _ in model.named_parameters()]
    theta = [p for p in model.parameters()]
    tasks = x.shape[0]

    def loss(params: tuple[torch.Tensor, ...], xt: torch.Tensor, yt: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(functional_call(model, dict(zip(names, params)), (xt,)), yt)

    with sdpa_kernel([SDPBackend.MATH]) if math else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fused kernel's missing batching rule
        batched = [p.unsqueeze(0).expand(tasks, *p.shape) for p in theta]
        if vectorize:
            inner = vmap(loss)(tuple(batched), x, y).sum()
        else:
            inner = torch.stack([loss(tuple(p[t] for p in batched), x[t], y[t]) for t in range(tasks)]).sum()
        grads = torch.autograd.grad(inner, batched)
        fast = tuple(p - 0.1 * g.detach() for p, g in zip(batched, grads))
        if vectorize:
            outer = vmap(loss)(fast, x, y).mean()
        else:
            outer = torch.stack([loss(tuple(p[t] for p in fast), x[t], y[t]) for t in range(tasks)]).mean()
        torch.autograd.grad(outer, theta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    set_threads(1)
    torch.manual_seed(0)
    model = build()
    rows = []
    for length in ([64] if args.quick else [128, 512]):
        x = torch.randn(4, 2, length, 64)
        y = torch.randn(4, 2, length, 1)
        for vectorize in (False, True):
            fns = {f"{'MATH' if math else 'fused'}": (lambda math=math: meta_step(model, x, y, vectorize, math))
                   for math in (False, True)}
            times = interleave(fns, repeats=3 if args.quick else 7, warmup=1)
            peaks = {name: peak_tensor_bytes(fn)[1] for name, fn in fns.items()}
            medians = {name: summarize(t)["median"] for name, t in times.items()}
            rows.append((length, "vmap" if vectorize else "task loop", medians["fused"] * 1e3, medians["MATH"] * 1e3,
                         medians["MATH"] / medians["fused"], peaks["fused"] / 2**20, peaks["MATH"] / 2**20,
                         peaks["MATH"] / max(peaks["fused"], 1)))
    print("| L | tasks | fused ms | MATH ms | MATH/fused time | fused MiB | MATH MiB | MATH/fused memory |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.1f} | {r[6]:.1f} | {r[7]:.2f} |")


if __name__ == "__main__":
    main()
