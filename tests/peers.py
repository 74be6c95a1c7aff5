"""The peers' own meta-gradients, computed with their libraries, for the port tests.

Each function follows the structure of the peer's published example (torchopt's
``examples/iMAML/imaml_omniglot.py`` ``InnerNet`` etc.), on the tensors given,
and returns the gradient of the mean query loss with respect to ``model``'s
parameters. ``model`` itself is left untouched (its ``.grad`` included).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def imaml_torchopt_gradient(model: nn.Module, xs, ys, xq, yq, *, steps: int, inner_lr: float, reg: float,
                            cg_iterations: int) -> tuple[torch.Tensor, ...]:
    """torchopt's iMAML: an ``ImplicitMetaGradientModule`` solved by ``steps`` SGD steps on the
    proximal objective, differentiated by ``solve_normal_cg(maxiter=cg_iterations)``."""
    import torchopt
    from torchopt.diff.implicit import ImplicitMetaGradientModule

    class InnerNet(ImplicitMetaGradientModule,
                   linear_solve=torchopt.linear_solve.solve_normal_cg(maxiter=cg_iterations, atol=0, rtol=0)):
        def __init__(self, meta_net):
            super().__init__()
            self.meta_net = meta_net
            self.net = torchopt.module_clone(meta_net, by="deepcopy", detach_buffers=True)
            with torch.no_grad():
                for p1, p2 in zip(self.parameters(), self.meta_parameters()):
                    p1.data.copy_(p2.data)
                    p1.detach_().requires_grad_()

        def forward(self, x):
            return self.net(x)

        def objective(self, x, y):
            loss = F.cross_entropy(self(x), y)
            proximal = sum(0.5 * reg * torch.sum(torch.square(p1 - p2))
                           for p1, p2 in zip(self.parameters(), self.meta_parameters()))
            return loss + proximal

        def solve(self, x, y):
            params = tuple(self.parameters())
            inner_optim = torchopt.SGD(params, lr=inner_lr)
            with torch.enable_grad():
                for _ in range(steps):
                    loss = self.objective(x, y)
                    inner_optim.zero_grad()
                    loss.backward(inputs=params)
                    inner_optim.step()
            return self

    losses = []
    for i in range(xs.shape[0]):
        inner = InnerNet(model).solve(xs[i], ys[i])
        losses.append(F.cross_entropy(inner(xq[i]), yq[i]))
    return torch.autograd.grad(torch.stack(losses).mean(), list(model.parameters()))
