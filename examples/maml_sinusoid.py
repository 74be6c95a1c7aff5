"""MAML on sinusoid regression with the Python API, in every meta-gradient mode that meta-learns the
initialisation on its own: second order, first order, checkpointed, and the zero-order ES and PES.
(Truncated back-propagation needs ``truncate=k``, implicit differentiation a proximal term (iMAML:
``diffopt.algorithms.iMAML``), and forward mode differentiates hyperparameters only.)

    python examples/maml_sinusoid.py --iterations 2000 --mode second_order
    python examples/maml_sinusoid.py --mode checkpointed --inner-steps 10
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import diffopt
from diffopt.algorithms import MAML
from diffopt.recipes import SinusoidSource, sinusoid_mlp
from diffopt.training import iteration_generator


INITIALISATION_MODES = ("second_order", "first_order", "checkpointed", "es", "pes")


def main(iterations: int, mode: str, inner_steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    learner = MAML(sinusoid_mlp(), F.mse_loss, inner_lr=0.01, inner_steps=inner_steps, mode=mode)
    print(f"inner loop: {learner.loop.vectorize_reason}")
    outer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    tasks = SinusoidSource(meta_batch=25, shots=10)
    for i in range(iterations):
        support_x, support_y, query_x, query_y = tasks.train_batch(iteration_generator(0, i))
        outer.zero_grad()
        loss = learner.meta_loss(support_x, support_y, query_x, query_y)   # differentiable in every mode
        loss.backward()
        outer.step()
        if (i + 1) % max(iterations // 5, 1) == 0:
            print(f"iteration {i + 1}: meta-loss {loss.item():.4f}")
    summary = diffopt.training.evaluate(learner, tasks.test_batches(), steps=(0, 1, 10))["loss"]
    for steps, value in summary.items():
        print(f"test MSE after {steps:>2} step(s): {value['mean']:.3f} ± {value['ci95']:.3f}")
    return {k: v["mean"] for k, v in summary.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--mode", default="second_order", choices=INITIALISATION_MODES)
    parser.add_argument("--inner-steps", type=int, default=1)
    args = parser.parse_args()
    main(args.iterations, args.mode, args.inner_steps)
