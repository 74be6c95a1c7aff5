"""learn2learn's ``examples/vision/maml_omniglot.py``, ported to diffopt: random stand-in images.

The import line changes (``import diffopt.ports.learn2learn as l2l``); ``fast_adapt``, the
loop over ``meta_batch_size`` tasks with one ``backward()`` each, and the gradient scaling by
``1 / meta_batch_size`` are the original's. learn2learn's ``OmniglotFC`` (fully connected
blocks with BatchNorm) is written out here as :func:`omniglot_fc`, and random 28×28 images
stand in for ``l2l.vision.benchmarks.get_tasksets('omniglot')``.

    python examples/ports/learn2learn_maml_omniglot.py --iterations 3
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn, optim

import diffopt.ports.learn2learn as l2l


def omniglot_fc(input_size: int, output_size: int, sizes: tuple[int, ...] = (256, 128, 64, 64)) -> nn.Module:
    """The shape of learn2learn's ``OmniglotFC``: Linear → BatchNorm1d → ReLU blocks, then a linear head."""
    layers: list[nn.Module] = [nn.Flatten()]
    for n_in, n_out in zip((input_size, *sizes[:-1]), sizes):
        layers += [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out, momentum=0.999, eps=1e-3, affine=True), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], output_size))
    return nn.Sequential(*layers)


def accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    predictions = predictions.argmax(dim=1).view(targets.shape)
    return (predictions == targets).sum().float() / targets.size(0)


def sample_task(ways: int, shots: int, generator: torch.Generator, dtype: torch.dtype = torch.float32):
    """Stand-in for ``tasksets.train.sample()``: 2·shots images of each of ``ways`` classes."""
    data = torch.randn(2 * shots * ways, 1, 28, 28, generator=generator, dtype=dtype)
    labels = torch.arange(ways).repeat_interleave(2 * shots)
    return data, labels


def fast_adapt(batch, learner, loss, adaptation_steps: int, shots: int, ways: int):
    data, labels = batch
    adaptation_indices = np.zeros(data.size(0), dtype=bool)
    adaptation_indices[np.arange(shots * ways) * 2] = True
    evaluation_indices = torch.from_numpy(~adaptation_indices)
    adaptation_indices = torch.from_numpy(adaptation_indices)
    adaptation_data, adaptation_labels = data[adaptation_indices], labels[adaptation_indices]
    evaluation_data, evaluation_labels = data[evaluation_indices], labels[evaluation_indices]
    for _ in range(adaptation_steps):
        train_error = loss(learner(adaptation_data), adaptation_labels)
        learner.adapt(train_error)
    predictions = learner(evaluation_data)
    valid_error = loss(predictions, evaluation_labels)
    return valid_error, accuracy(predictions, evaluation_labels)


def accumulate_meta_gradient(maml, tasks, adaptation_steps: int, shots: int, ways: int) -> float:
    """The original's inner loop over the meta-batch: a backward per task, then the 1/B scaling."""
    loss = nn.CrossEntropyLoss(reduction="mean")
    meta_train_error = 0.0
    for batch in tasks:
        learner = maml.clone()
        evaluation_error, _ = fast_adapt(batch, learner, loss, adaptation_steps, shots, ways)
        evaluation_error.backward()
        meta_train_error += evaluation_error.item()
    for p in maml.parameters():
        p.grad.data.mul_(1.0 / len(tasks))
    return meta_train_error / len(tasks)


def main(iterations: int = 3, ways: int = 5, shots: int = 1, meta_lr: float = 0.003, fast_lr: float = 0.5,
         meta_batch_size: int = 4, adaptation_steps: int = 1, seed: int = 42) -> list[float]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = omniglot_fc(28 ** 2, ways, sizes=(64, 32))
    maml = l2l.algorithms.MAML(model, lr=fast_lr, first_order=False)
    opt = optim.Adam(maml.parameters(), meta_lr)
    errors = []
    for iteration in range(iterations):
        opt.zero_grad()
        tasks = [sample_task(ways, shots, generator) for _ in range(meta_batch_size)]
        errors.append(accumulate_meta_gradient(maml, tasks, adaptation_steps, shots, ways))
        print("Iteration", iteration, "Meta Train Error", errors[-1])
        opt.step()
    return errors


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3)
    main(parser.parse_args().iterations)
