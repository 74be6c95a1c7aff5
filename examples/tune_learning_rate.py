"""Tune Adam's learning rate by differentiating a validation loss through training.

A small MLP is trained for 50 Adam steps on a noisy regression task. The
validation loss after training is differentiated with respect to the (log)
learning rate through all 50 steps; the hypergradient is printed beside a
central finite-difference check, then a few steps of hypergradient descent on
the log learning rate lower the validation loss.
"""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from diffopt.optim import Adam


def make_problem(seed: int = 0) -> tuple[nn.Module, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        x = torch.rand(n, 1, generator=generator, dtype=torch.float64) * 10 - 5
        return x, torch.sin(x) + 0.1 * torch.randn(n, 1, generator=generator, dtype=torch.float64)

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1)).double()
    return model, sample(64), sample(256)


def validation_loss(model: nn.Module, log_lr: Tensor, train: tuple[Tensor, Tensor],
                    valid: tuple[Tensor, Tensor], steps: int = 50) -> Tensor:
    """Validation MSE after ``steps`` Adam steps from the model's weights, as a function of log lr."""
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    opt = Adam(params, lr=log_lr.exp())

    def predict(ps: list[Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    for _ in range(steps):
        params = opt.step(((predict(params, train[0]) - train[1]) ** 2).mean())
    return ((predict(params, valid[0]) - valid[1]) ** 2).mean()


def run(steps: int = 50, tuning_steps: int = 12, meta_lr: float = 4.0) -> dict[str, float]:
    start = time.perf_counter()
    model, train, valid = make_problem()
    log_lr = torch.tensor(math.log(1e-3), dtype=torch.float64, requires_grad=True)
    print(f"Tune Adam's learning rate through {steps} differentiable steps\n")

    loss = validation_loss(model, log_lr, train, valid, steps)
    (hypergradient,) = torch.autograd.grad(loss, log_lr)
    h = 1e-5
    up = validation_loss(model, log_lr.detach() + h, train, valid, steps)
    down = validation_loss(model, log_lr.detach() - h, train, valid, steps)
    finite_difference = float((up - down).detach() / (2 * h))
    relative = abs(float(hypergradient) - finite_difference) / max(abs(finite_difference), 1e-300)
    print(f"  d(validation loss)/d(log lr) at lr = {math.exp(log_lr.item()):.4g}")
    print(f"    autograd through the unroll : {float(hypergradient): .12e}")
    print(f"    central finite difference   : {finite_difference: .12e}")
    print(f"    relative difference         : {relative:.2e}\n")

    print(f"  {'iteration':>9}  {'lr':>10}  {'validation MSE':>14}")
    first = float(loss.detach())
    for iteration in range(tuning_steps):
        loss = validation_loss(model, log_lr, train, valid, steps)
        (grad,) = torch.autograd.grad(loss, log_lr)
        print(f"  {iteration:>9}  {math.exp(log_lr.item()):>10.4g}  {float(loss.detach()):>14.6f}")
        with torch.no_grad():
            log_lr -= meta_lr * grad.clamp(-0.1, 0.1)
    final = float(validation_loss(model, log_lr, train, valid, steps).detach())
    print(f"  {'final':>9}  {math.exp(log_lr.item()):>10.4g}  {final:>14.6f}")
    print(f"\n  validation MSE {first:.4f} -> {final:.4f} by hypergradient descent on the learning rate"
          f" ({time.perf_counter() - start:.1f} s)")
    return {"hypergradient": float(hypergradient), "finite_difference": finite_difference,
            "relative_error": relative, "initial_loss": first, "final_loss": final}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50, help="inner Adam steps to differentiate through")
    parser.add_argument("--tuning-steps", type=int, default=12, help="hypergradient steps on log lr")
    args = parser.parse_args()
    if args.steps < 1 or args.tuning_steps < 1:
        parser.error("--steps and --tuning-steps must be >= 1 (the hypergradient flows through the inner steps)")
    run(steps=args.steps, tuning_steps=args.tuning_steps)
