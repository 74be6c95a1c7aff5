"""Learn a OneCycle schedule's peak learning rate by hypergradients on a real training run.

A one-hidden-layer MLP is trained on scikit-learn's handwritten digits (8x8 images,
10 classes; 1,200 training and 597 validation images) for 60 mini-batch steps of SGD
with Nesterov momentum, scheduled by ``diffopt.optim.lr_scheduler.OneCycleLR``. The
validation cross-entropy after training is differentiated with respect to the log
of the schedule's peak learning rate (``max_lr``) through all 60 steps, the warm-up
and annealing phases included; the hypergradient is printed beside a central
finite difference, then a few steps of hypergradient descent on log ``max_lr``
lower the validation loss. The warm-up fraction ``pct_start`` is a tensor too and its
derivative is printed (not learned here).

    python examples/learn_onecycle_peak_lr.py [--steps 60] [--tuning-steps 8]
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from diffopt.optim import SGD
from diffopt.optim.lr_scheduler import OneCycleLR

F64 = torch.float64


def load_digits_split(seed: int = 0) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Standardised digits, split 1,200 / 597 with a fixed permutation."""
    from sklearn.datasets import load_digits  # the data ship with scikit-learn: no download

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=F64) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    mean, std = x[:1200].mean(0), x[:1200].std(0).clamp(min=1e-3)
    x = (x - mean) / std
    return (x[:1200], y[:1200]), (x[1200:], y[1200:])


def initial_weights(seed: int = 0, hidden: int = 32) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(hidden, 64, generator=g, dtype=F64) / 8, torch.zeros(hidden, dtype=F64),
            torch.randn(10, hidden, generator=g, dtype=F64) / math.sqrt(hidden), torch.zeros(10, dtype=F64)]


def logits(params: list[Tensor], x: Tensor) -> Tensor:
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def validation_loss(log_max_lr: Tensor, pct_start: Tensor, train: tuple[Tensor, Tensor],
                    valid: tuple[Tensor, Tensor], steps: int = 60, batch: int = 128) -> Tensor:
    """Validation cross-entropy after ``steps`` OneCycle-scheduled SGD steps (fixed mini-batches)."""
    params = [w.requires_grad_() for w in initial_weights()]
    opt = SGD(params, lr=0.01, momentum=0.9, nesterov=True)
    schedule = OneCycleLR(opt, max_lr=log_max_lr.exp(), total_steps=steps, pct_start=pct_start,
                          cycle_momentum=False)
    batches = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(train[1]), (batch,), generator=batches)
        params = opt.step(F.cross_entropy(logits(params, train[0][idx]), train[1][idx]), params=params)
        schedule.step()
    return F.cross_entropy(logits(params, valid[0]), valid[1])


def run(steps: int = 60, tuning_steps: int = 8, meta_lr: float = 2.0, initial_peak: float = 0.02) -> dict[str, float]:
    start = time.perf_counter()
    train, valid = load_digits_split()
    log_max_lr = torch.tensor(math.log(initial_peak), dtype=F64, requires_grad=True)
    pct_start = torch.tensor(0.3, dtype=F64, requires_grad=True)
    print(f"Learn OneCycle's peak lr on digits through {steps} differentiable SGD steps\n")

    loss = validation_loss(log_max_lr, pct_start, train, valid, steps)
    d_log_lr, d_pct = torch.autograd.grad(loss, [log_max_lr, pct_start])
    h = 1e-5
    up = validation_loss(log_max_lr.detach() + h, pct_start.detach(), train, valid, steps)
    down = validation_loss(log_max_lr.detach() - h, pct_start.detach(), train, valid, steps)
    finite_difference = float((up - down).detach() / (2 * h))
    relative = abs(float(d_log_lr) - finite_difference) / max(abs(finite_difference), 1e-300)
    print(f"  d(validation loss)/d(log max_lr) at max_lr = {initial_peak:.4g}")
    print(f"    autograd through the unroll : {float(d_log_lr): .12e}")
    print(f"    central finite difference   : {finite_difference: .12e}")
    print(f"    relative difference         : {relative:.2e}")
    print(f"  d(validation loss)/d(pct_start) = {float(d_pct): .6e}\n")

    print(f"  {'iteration':>9}  {'max_lr':>10}  {'validation CE':>14}")
    first = float(loss.detach())
    for iteration in range(tuning_steps):
        loss = validation_loss(log_max_lr, pct_start.detach(), train, valid, steps)
        (grad,) = torch.autograd.grad(loss, log_max_lr)
        print(f"  {iteration:>9}  {math.exp(log_max_lr.item()):>10.4g}  {float(loss.detach()):>14.6f}")
        with torch.no_grad():
            log_max_lr -= meta_lr * grad.clamp(-0.25, 0.25)
    final_peak = math.exp(log_max_lr.item())
    final = float(validation_loss(log_max_lr.detach(), pct_start.detach(), train, valid, steps).detach())
    print(f"  {'final':>9}  {final_peak:>10.4g}  {final:>14.6f}")
    print(f"\n  validation cross-entropy {first:.4f} -> {final:.4f}, peak lr {initial_peak:.3g} -> {final_peak:.3g}"
          f" ({time.perf_counter() - start:.1f} s)")
    return {"hypergradient": float(d_log_lr), "finite_difference": finite_difference, "relative_error": relative,
            "d_pct_start": float(d_pct), "initial_loss": first, "final_loss": final, "initial_peak": initial_peak,
            "final_peak": final_peak}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="inner SGD steps to differentiate through")
    parser.add_argument("--tuning-steps", type=int, default=8, help="hypergradient steps on log max_lr")
    args = parser.parse_args()
    run(steps=args.steps, tuning_steps=args.tuning_steps)
