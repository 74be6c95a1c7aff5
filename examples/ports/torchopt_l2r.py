"""torchopt's ``examples/L2R/l2r.py`` (learning to reweight, Ren et al. 2018), ported to diffopt.

Each training batch gets per-example weights ε (zeros that require grad); one differentiable
SGD step on the ε-weighted loss gives θ'(ε); the validation loss at θ'(ε) is differentiated
with respect to ε; the weights are ``relu(-grad)``, normalised to sum to 1; and the real
model takes an Adam step on the reweighted loss. torchopt's ``MetaSGD(model, lr)`` steps the
model in place and restores it with ``extract_state_dict`` / ``recover_state_dict``; the
port's ``diffopt.innerloop(model, SGD(...))`` adapts a patched copy and leaves the model
alone, so there is nothing to restore. The LeNet-5 and its losses are the original's
(``helpers/model.py``); random images with imbalanced 0/1 labels stand in for MNIST.

    python examples/ports/torchopt_l2r.py --iterations 5
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import diffopt


class LeNet5(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 1), nn.Sigmoid(),
        )
        self.criterion = nn.BCELoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).squeeze(dim=-1)


def inner_loss(net: nn.Module, meta_weights: torch.Tensor, train_x: torch.Tensor, train_y: torch.Tensor):
    """The original's ``LeNet5.inner_loss``: the ε-weighted binary cross-entropy, summed."""
    result = net(train_x)
    loss = -(train_y * torch.log(result + 1e-10) + (1 - train_y) * torch.log(1 - result + 1e-10))
    return torch.sum(meta_weights * loss)


def outer_loss(net: nn.Module, valid_x: torch.Tensor, valid_y: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy(net(valid_x), valid_y)


def example_weights(model: nn.Module, lr: float, train_x, train_label, valid_x, valid_label) -> torch.Tensor:
    """ε = relu(−∂L_valid(θ − lr·∇θ L_ε(θ)) / ∂ε) at ε = 0, normalised (the original's meta step)."""
    meta_weights = torch.zeros(train_x.size(0), dtype=train_x.dtype, requires_grad=True)
    with diffopt.innerloop(model, diffopt.optim.SGD(model.parameters(), lr=lr)) as (fmodel, inner):
        inner.step(inner_loss(fmodel, meta_weights, train_x, train_label))
        loss = outer_loss(fmodel, valid_x, valid_label)
    weights = torch.relu(-torch.autograd.grad(loss, meta_weights)[0])
    total = weights.sum()
    return weights / (total + 1 if total == 0 else total)


def imbalanced_batch(size: int, pos_ratio: float, generator: torch.Generator, dtype: torch.dtype = torch.float32):
    """Random 1×28×28 images; label 1 with probability ``pos_ratio``, shifted so that it is learnable."""
    y = (torch.rand(size, generator=generator) < pos_ratio).to(dtype)
    x = torch.randn(size, 1, 28, 28, generator=generator, dtype=dtype) + y.view(-1, 1, 1, 1)
    return x, y


def main(iterations: int = 5, batch_size: int = 32, lr: float = 1e-3, pos_ratio: float = 0.1,
         seed: int = 1) -> list[float]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = LeNet5()
    real_model_optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    valid_x, valid_label = imbalanced_batch(batch_size, 0.5, generator)  # a small balanced validation set
    losses = []
    for step in range(iterations):
        train_x, train_label = imbalanced_batch(batch_size, pos_ratio, generator)
        weights = example_weights(model, lr, train_x, train_label, valid_x, valid_label)
        loss = inner_loss(model, weights, train_x, train_label)
        real_model_optimizer.zero_grad()
        loss.backward()
        real_model_optimizer.step()
        losses.append(loss.item())
        print(f"step {step}: weighted train loss {loss.item():.4f}, "
              f"validation loss {outer_loss(model, valid_x, valid_label).item():.4f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5)
    main(parser.parse_args().iterations)
