"""Tune Adam's learning rate online while an MLP trains on scikit-learn's handwritten digits.

The run starts from a learning rate 10x too low (3e-4). Every 20 training steps,
``diffopt.hyper.OnlineTuner`` differentiates the validation loss through the last 5 steps with
respect to log(lr) and takes one Adam step on it; the training itself is plain Adam with whatever
lr the tuner last set. Printed: the lr and validation loss as training goes, then the test loss
against the same run at the fixed starting lr.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import diffopt


def load(seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = torch.tensor(x, dtype=torch.float32)[order], torch.tensor(y)[order]
    x = (x - x[:1000].mean(0)) / x[:1000].std(0).clamp_min(1e-3)
    return (x[:1000], y[:1000]), (x[1000:1300], y[1000:1300]), (x[1300:], y[1300:])


def run(steps: int = 600, every: int = 20, window: int = 5, start_lr: float = 3e-4, seed: int = 0) -> dict:
    start = time.perf_counter()
    (x, y), (xv, yv), (xt, yt) = load(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    names = [name for name, _ in model.named_parameters()]
    initial = [p.detach().clone() for p in model.parameters()]

    def loss(params: list[torch.Tensor], inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, params)), (inputs,)), labels)

    generator = torch.Generator().manual_seed(seed)
    batches = [(x[i], y[i]) for i in (torch.randint(0, 1000, (64,), generator=generator) for _ in range(steps))]

    # --- the user code: an optimizer, a tuner around it, and the loop --------------------------
    opt = diffopt.optim.Adam(model.parameters(), lr=start_lr)
    tuner = diffopt.hyper.OnlineTuner(opt, lambda params, batch: loss(params, *batch),
                                      lambda params: loss(params, xv, yv), "lr", every=every, window=window,
                                      meta_lr=0.3)
    for batch in batches:
        params = tuner.step(batch)
    # ---------------------------------------------------------------------------------------------

    print(f"Online tuning of Adam's lr on the digits ({steps} steps, a hypergradient every {every} through "
          f"the last {window})\n\n  {'step':>5}  {'lr':>9}  {'validation loss':>15}")
    for record in tuner.history[:: max(1, len(tuner.history) // 8)]:
        print(f"  {record['step']:>5}  {record['values']['lr']:>9.3g}  {record['validation_loss']:>15.4f}")
    with torch.no_grad():
        tuned_test = float(loss(params, xt, yt))
    fixed = [p.clone().requires_grad_() for p in initial]
    plain = torch.optim.Adam(fixed, lr=start_lr)
    for batch in batches:
        plain.zero_grad()
        loss(fixed, *batch).backward()
        plain.step()
    with torch.no_grad():
        fixed_test = float(loss(fixed, xt, yt))
    lr = tuner.values()["lr"]
    print(f"\n  test loss: fixed lr {start_lr:g} -> {fixed_test:.4f}; tuned (final lr {lr:.3g}) -> {tuned_test:.4f}"
          f"  ({time.perf_counter() - start:.1f} s)")
    return {"fixed_test": fixed_test, "tuned_test": tuned_test, "final_lr": lr, "history": tuner.history}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--window", type=int, default=5)
    args = parser.parse_args()
    run(args.steps, args.every, args.window)
