"""diffopt's optimizers in your own loop: higher's monkeypatched model, a torch.optim
optimizer converted with its state, and meta-gradients for the initial weights and a
learnable learning rate.

    python examples/custom_training_loop.py
"""
from __future__ import annotations

import torch
from torch import nn

import diffopt


def main(steps: int = 5) -> dict[str, torch.Tensor]:
    """Returns the two validation losses and their meta-gradients (for the tests)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    x_train, y_train = torch.randn(32, 3), torch.randn(32, 1)
    x_valid, y_valid = torch.randn(32, 3), torch.randn(32, 1)

    # Warm up with plain torch.optim, then continue differentiably from the same state.
    warm = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        warm.zero_grad()
        nn.functional.mse_loss(model(x_train), y_train).backward()
        warm.step()

    warm.zero_grad()  # so that .grad below holds the meta-gradient alone, not the last warm-up gradient too
    with diffopt.innerloop(model, warm) as (fmodel, dopt):
        for _ in range(steps):
            dopt.step(nn.functional.mse_loss(fmodel(x_train), y_train))
        validation = nn.functional.mse_loss(fmodel(x_valid), y_valid)
    validation.backward()  # gradients of the validation loss w.r.t. the weights before the unroll
    print(f"validation loss after {steps} differentiable Adam steps: {validation.item():.4f}")
    print(f"meta-gradient norm for the first layer: {model[0].weight.grad.norm():.4e}")

    # A learnable learning rate, per element of a weight, with a diffopt optimizer directly.
    lr = torch.full_like(model[2].weight, 1e-2, requires_grad=True)
    opt = diffopt.optim.SGD([model[2].weight], lr=lr, momentum=0.9)
    params = [model[2].weight]
    for _ in range(steps):
        out = model[1](model[0](x_train)) @ params[0].T + model[2].bias
        params = opt.step(nn.functional.mse_loss(out, y_train))
    loss = nn.functional.mse_loss(model[1](model[0](x_valid)) @ params[0].T + model[2].bias, y_valid)
    (lr_grad,) = torch.autograd.grad(loss, lr)
    print(f"d(validation)/d(lr) per element, shape {tuple(lr_grad.shape)}: {lr_grad.flatten()[:4].tolist()}")
    return {"validation": validation.detach(), "weight_grad": model[0].weight.grad.clone(),
            "lr_validation": loss.detach(), "lr_grad": lr_grad}


if __name__ == "__main__":
    main()
