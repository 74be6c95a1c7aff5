"""torchopt's ``examples/iMAML/imaml_omniglot.py``, ported to diffopt: random stand-in images.

torchopt's version subclasses ``ImplicitMetaGradientModule`` with a proximal ``objective``, a
hand-written ``solve`` (``n_inner_iter`` SGD steps on it) and
``linear_solve=solve_normal_cg(maxiter=5, atol=0)``, and keeps one ``InnerNet`` per task.
In diffopt all of that is one object: :class:`diffopt.algorithms.iMAML` with the proximal
weight ``regularization=λ``, ``inner_steps`` SGD steps, and the same linear solver by name,
``solver="normal_cg"`` (CG on the normal equations; ``"cg"`` is faster and as accurate when
the inner Hessian plus λI is positive definite). ``meta_loss`` is the mean query loss over
the tasks, as the original's ``torch.mean(torch.stack(qry_losses))``.

    python examples/ports/torchopt_imaml_omniglot.py --iterations 3
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from diffopt.algorithms import iMAML


def make_net(n_way: int, channels: int = 64) -> nn.Module:
    def block(c_in: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, channels, 3),
                nn.BatchNorm2d(channels, momentum=1.0, affine=True, track_running_stats=False),
                nn.ReLU(inplace=False), nn.MaxPool2d(2, 2)]

    return nn.Sequential(*block(1), *block(channels), *block(channels), nn.Flatten(), nn.Linear(channels, n_way))


def random_batch(task_num: int, n_way: int, k_spt: int, k_qry: int, generator: torch.Generator,
                 dtype: torch.dtype = torch.float32):
    """Stand-in for ``OmniglotNShot.next()``."""
    def part(k: int):
        x = torch.randn(task_num, n_way * k, 1, 28, 28, generator=generator, dtype=dtype)
        return x, torch.arange(n_way).repeat_interleave(k).expand(task_num, -1).contiguous()

    return (*part(k_spt), *part(k_qry))


def make_learner(net: nn.Module, inner_steps: int = 5, reg_param: float = 2.0, inner_lr: float = 1e-1,
                 cg_iterations: int = 5, cg_tol: float = 1e-5) -> iMAML:
    """torchopt's ``InnerNet``: SGD(lr=0.1) on cross-entropy + λ/2‖φ − θ‖², normal-equation CG with
    torchopt's 5 iterations (its ``cg`` stops at ``rtol=1e-5`` of the normal equations' right-hand side,
    ``NormalCG`` at ``tol`` of the original system's; with 5 iterations neither stops early)."""
    return iMAML(net, F.cross_entropy, inner_lr=inner_lr, inner_steps=inner_steps, regularization=reg_param,
                 solver="normal_cg", solver_iterations=cg_iterations, solver_tol=cg_tol)


def train_step(learner: iMAML, batch, meta_opt: torch.optim.Optimizer) -> float:
    meta_opt.zero_grad()
    qry_losses = learner.meta_loss(*batch)
    qry_losses.backward()
    meta_opt.step()
    return qry_losses.item()


def main(iterations: int = 3, n_way: int = 5, k_spt: int = 1, k_qry: int = 3, task_num: int = 4,
         channels: int = 16, seed: int = 1) -> list[float]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = make_net(n_way, channels)
    learner = make_learner(net)
    meta_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for it in range(iterations):
        losses.append(train_step(learner, random_batch(task_num, n_way, k_spt, k_qry, generator), meta_opt))
        print(f"[iteration {it}] train loss: {losses[-1]:.3f} (solver: {learner.loop.last_info.get('solver')})")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3)
    main(parser.parse_args().iterations)
