"""Implicit hypergradients (iMAML's proximal inner problem) against the exact ridge solution.

The inner problem of each task is ridge regression pulled towards the shared
initialisation θ; the implicit mode's conjugate-gradient solve gives the
meta-gradient for θ without backpropagating through the 300 inner steps.

    python examples/implicit_ridge.py
"""
from __future__ import annotations

import torch
from torch import nn

from diffopt import optim
from diffopt.testing import ridge
from diffopt.unroll import InnerLoop


def main() -> float:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 20, 4, generator=g, dtype=torch.float64), torch.randn(1, 20, 1, generator=g, dtype=torch.float64)
    xv, yv = torch.randn(1, 10, 4, generator=g, dtype=torch.float64), torch.randn(1, 10, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()
    loop = InnerLoop(model, optim.SGD(model.parameters(), lr=0.1), steps=300, mode="implicit", proximal=2.0)
    (grad,) = torch.autograd.grad(loop.meta_loss(x, y, xv, yv), [model.weight])
    exact = ridge(x[0], y[0], xv[0], yv[0], 2.0, center=model.weight.detach()[0]).wrt_center
    error = float((grad[0] - exact).norm() / exact.norm())
    solve = loop.last_info["solve"]
    print(f"conjugate gradient: {solve.iterations} iterations, residual {solve.relative_residual:.1e}")
    print(f"implicit meta-gradient vs exact ridge hypergradient: relative error {error:.1e}")
    return error


if __name__ == "__main__":
    main()
