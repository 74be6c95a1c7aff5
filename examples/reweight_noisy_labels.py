"""Training on noisy labels with a small clean set: Learning to Reweight and Meta-Weight-Net in an
ordinary training loop (scikit-learn's digits, 40% of the training labels replaced by another class,
10 clean examples per class).

    python examples/reweight_noisy_labels.py                # SGD with momentum 0.9, 20 epochs
    python examples/reweight_noisy_labels.py --momentum 0

The only change to a plain loop is the step: ``rw.step(x, y)`` instead of zero_grad / backward / step.
With momentum 0.9, plain training fits the wrong labels and Meta-Weight-Net keeps its accuracy; Learning
to Reweight's normalised weights concentrate on few examples and, with heavy momentum, training this
small MLP (no normalisation layers) diverges — with ``--momentum 0`` it works
(benchmarks/RESULTS.md, section 6, has the 5-seed figures).
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from torch import nn

from diffopt.hyper import LearningToReweight, MetaWeightNet


def digits(noise: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Clean meta set (10 per class), clean test set (500), training set with ``noise`` symmetric label noise."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    meta = np.concatenate([order[y[order] == c][:10] for c in range(10)])
    rest = rng.permutation(np.setdiff1d(order, meta))
    test, train = rest[:500], rest[500:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-8
    noisy = y[train].copy()
    flip = rng.random(len(train)) < noise
    noisy[flip] = (noisy[flip] + rng.integers(1, 10, flip.sum())) % 10  # one of the 9 other classes
    as_x = lambda a: torch.tensor((x[a] - mean) / std, dtype=torch.float32)  # noqa: E731
    return {"x": as_x(train), "y": torch.tensor(noisy), "wrong": torch.tensor(noisy != y[train]),
            "x_meta": as_x(meta), "y_meta": torch.tensor(y[meta]),
            "x_test": as_x(test), "y_test": torch.tensor(y[test])}


def train(method: str, data: dict[str, torch.Tensor], epochs: int, momentum: float, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss(reduction="none")  # one loss per example
    learner = None
    if method == "L2RW":
        learner = LearningToReweight(model, optimizer, loss_fn=loss_fn, meta_data=(data["x_meta"], data["y_meta"]))
    elif method == "MWN":
        learner = MetaWeightNet(model, optimizer, loss_fn=loss_fn, meta_data=(data["x_meta"], data["y_meta"]))
    order = torch.Generator().manual_seed(seed)
    wrong_weight, right_weight = [], []
    for _ in range(epochs):
        for idx in torch.randperm(len(data["y"]), generator=order).split(64):
            x, y = data["x"][idx], data["y"][idx]
            if learner is None:  # plain training on the noisy labels
                optimizer.zero_grad()
                loss_fn(model(x), y).mean().backward()
                optimizer.step()
            else:
                weights = learner.step(x, y).weights * len(idx)  # 1 = the weight of plain training
                wrong_weight += weights[data["wrong"][idx]].tolist()
                right_weight += weights[~data["wrong"][idx]].tolist()
    with torch.no_grad():
        accuracy = float((model(data["x_test"]).argmax(1) == data["y_test"]).float().mean())
    result = {"accuracy": accuracy}
    if learner is not None:
        result["weight_wrong"] = float(np.mean(wrong_weight)) if wrong_weight else float("nan")  # (--noise 0: none)
        result["weight_right"] = float(np.mean(right_weight)) if right_weight else float("nan")
    return result


def main(epochs: int = 20, noise: float = 0.4, momentum: float = 0.9) -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    data = digits(noise)
    print(f"digits: {len(data['y'])} training labels ({float(data['wrong'].float().mean()):.0%} wrong), "
          f"{len(data['y_meta'])} clean, {len(data['y_test'])} test; {epochs} epochs of SGD, momentum {momentum}")
    results = {}
    for method in ("plain", "L2RW", "MWN"):
        results[method] = train(method, data, epochs, momentum)
        line = f"{method:>5}: test accuracy {results[method]['accuracy']:.3f}"
        if "weight_wrong" in results[method]:
            wrong = results[method]["weight_wrong"]
            line += (f"; mean weight of wrong labels {'(none)' if math.isnan(wrong) else f'{wrong:.2f}'}, of right "
                     f"labels {results[method]['weight_right']:.2f} (plain training: 1 and 1)")
        print(line)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="plain training, L2RW and MWN on digits with noisy labels")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--noise", type=float, default=0.4, help="fraction of training labels flipped, in [0, 1)")
    parser.add_argument("--momentum", type=float, default=0.9)
    args = parser.parse_args()
    if not 0 <= args.noise < 1 or args.epochs < 1:
        parser.error("--noise must be in [0, 1) and --epochs >= 1")
    main(args.epochs, args.noise, args.momentum)
