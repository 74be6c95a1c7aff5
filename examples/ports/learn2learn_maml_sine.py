"""learn2learn's ``examples/maml_sine.py``, ported to diffopt: random sine tasks stand in for torchmeta's.

The port changes the import line only: ``import learn2learn as l2l`` becomes
``import diffopt.ports.learn2learn as l2l``; ``l2l.algorithms.MAML(model, lr=..., first_order=False,
allow_unused=True)``, ``maml.clone()``, ``learner.adapt(loss)`` and ``learner(x)`` are unchanged.
``train_step_batched`` is the fast path for the same meta-gradient:
:class:`diffopt.algorithms.MAML` adapts every task of the meta-batch in one vectorised unroll
(tensors with a leading task dimension; a single task is ``x[None]``).

    python examples/ports/learn2learn_maml_sine.py --iterations 20
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn, optim

import diffopt.ports.learn2learn as l2l
from diffopt.algorithms import MAML


class SineModel(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.hidden1 = nn.Linear(1, dim)
        self.hidden2 = nn.Linear(dim, dim)
        self.hidden3 = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.hidden1(x))
        x = nn.functional.relu(self.hidden2(x))
        return self.hidden3(x)


def sine_batch(tasks: int, shots: int, generator: torch.Generator, dtype: torch.dtype = torch.float32):
    """Stand-in for torchmeta's ``Sinusoid``: (inputs, targets) of shape (tasks, 2·shots, 1),
    amplitude in [0.1, 5], phase in [0, π], x in [-5, 5]."""
    amplitude = torch.rand(tasks, 1, 1, generator=generator, dtype=dtype) * 4.9 + 0.1
    phase = torch.rand(tasks, 1, 1, generator=generator, dtype=dtype) * torch.pi
    x = torch.rand(tasks, 2 * shots, 1, generator=generator, dtype=dtype) * 10 - 5
    return x, amplitude * torch.sin(x - phase)


def meta_train_loss(maml: l2l.MAML, batch, adapt_steps: int) -> torch.Tensor:
    """The original's loop over the tasks of a batch: clone, adapt, query loss; mean over tasks."""
    lossfn = nn.MSELoss(reduction="mean")
    meta_train_loss = 0.0
    effective_batch_size = batch[0].shape[0]
    for i in range(effective_batch_size):
        learner = maml.clone()
        train_inputs, train_targets = batch[0][i], batch[1][i]
        x_support, y_support = train_inputs[::2], train_targets[::2]
        x_query, y_query = train_inputs[1::2], train_targets[1::2]
        for _ in range(adapt_steps):
            support_loss = lossfn(learner(x_support), y_support)
            learner.adapt(support_loss)
        meta_train_loss += lossfn(learner(x_query), y_query)
    return meta_train_loss / effective_batch_size


def batched_meta_loss(learner: MAML, batch) -> torch.Tensor:
    """The same meta-loss for the whole batch at once (support: even examples, query: odd)."""
    x, y = batch
    return learner.meta_loss(x[:, ::2], y[:, ::2], x[:, 1::2], y[:, 1::2])


def main(iterations: int = 20, shots: int = 10, tasks_per_batch: int = 16, adapt_lr: float = 0.01,
         meta_lr: float = 0.001, adapt_steps: int = 5, hidden_dim: int = 32, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = SineModel(dim=hidden_dim)
    maml = l2l.algorithms.MAML(model, lr=adapt_lr, first_order=False, allow_unused=True)
    opt = optim.Adam(maml.parameters(), meta_lr)
    losses = []
    for it in range(iterations):
        loss = meta_train_loss(maml, sine_batch(tasks_per_batch, shots, generator), adapt_steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if it % max(iterations // 4, 1) == 0:
            print("Iteration:", it, "Meta Train Loss", loss.item())
    fast = MAML(model, F.mse_loss, inner_lr=adapt_lr, inner_steps=adapt_steps)
    print("batched path:", batched_meta_loss(fast, sine_batch(tasks_per_batch, shots, generator)).item())
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20)
    main(parser.parse_args().iterations)
