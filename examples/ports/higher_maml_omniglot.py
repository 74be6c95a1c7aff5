"""higher's ``examples/maml-omniglot.py``, ported to diffopt: random stand-in images, small sizes.

The original's structure is kept: a Conv-4-style net with BatchNorm, ``torch.optim.SGD`` as
the inner optimizer, one ``innerloop`` block per task with ``n_inner_iter`` steps, the query
loss's ``backward()`` inside the block (so the meta-gradient is the *sum* over tasks, as in
higher's example), then ``meta_opt.step()``. The port changes three things:

* ``higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False)`` becomes
  ``diffopt.innerloop(net, inner_opt)`` (diffopt's default is already False);
* the differentiable optimizer is bound as ``inner``, not ``diffopt`` (that name would
  shadow the module: ``UnboundLocalError`` at ``diffopt.innerloop`` in the same function);
* ``train_batched`` shows the fast path: :class:`diffopt.algorithms.MAML` runs every task's
  inner loop in one engine call; its ``meta_loss`` is the *mean* over tasks.

    python examples/ports/higher_maml_omniglot.py --iterations 3
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import diffopt
from diffopt.algorithms import MAML


def make_net(n_way: int, channels: int = 64) -> nn.Module:
    """The original's Conv-4 (three conv blocks, BatchNorm with momentum 1) for 1×28×28 images."""
    def block(c_in: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, channels, 3), nn.BatchNorm2d(channels, momentum=1, affine=True),
                nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)]

    return nn.Sequential(*block(1), *block(channels), *block(channels), nn.Flatten(), nn.Linear(channels, n_way))


def random_batch(task_num: int, n_way: int, k_spt: int, k_qry: int, generator: torch.Generator,
                 dtype: torch.dtype = torch.float32):
    """Stand-in for ``OmniglotNShot.next()``: (task_num, n_way·k, 1, 28, 28) images, labels 0..n_way-1."""
    def part(k: int):
        x = torch.randn(task_num, n_way * k, 1, 28, 28, generator=generator, dtype=dtype)
        y = torch.arange(n_way).repeat_interleave(k).expand(task_num, -1).contiguous()
        return x, y

    return (*part(k_spt), *part(k_qry))


def train_step(net: nn.Module, batch, meta_opt: torch.optim.Optimizer, n_inner_iter: int = 5,
               inner_lr: float = 1e-1) -> float:
    """One meta-step, as higher's ``train``: per task, an innerloop block and a backward."""
    x_spt, y_spt, x_qry, y_qry = batch
    task_num = x_spt.size(0)
    inner_opt = torch.optim.SGD(net.parameters(), lr=inner_lr)
    qry_losses = []
    meta_opt.zero_grad()
    for i in range(task_num):
        with diffopt.innerloop(net, inner_opt) as (fnet, inner):
            for _ in range(n_inner_iter):
                spt_loss = F.cross_entropy(fnet(x_spt[i]), y_spt[i])
                inner.step(spt_loss)
            qry_loss = F.cross_entropy(fnet(x_qry[i]), y_qry[i])
            qry_losses.append(qry_loss.detach())
            qry_loss.backward()
    meta_opt.step()
    return float(sum(qry_losses) / task_num)


def train_step_batched(learner: MAML, batch, meta_opt: torch.optim.Optimizer) -> float:
    """The same meta-step through the engine; ``meta_loss`` averages, so multiply by the number
    of tasks to get higher's summed gradient."""
    meta_opt.zero_grad()
    loss = learner.meta_loss(*batch)
    (loss * batch[0].size(0)).backward()
    meta_opt.step()
    return float(loss.detach())


def main(iterations: int = 3, n_way: int = 5, k_spt: int = 1, k_qry: int = 3, task_num: int = 4,
         channels: int = 16, seed: int = 1) -> list[float]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = make_net(n_way, channels)
    meta_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for it in range(iterations):
        batch = random_batch(task_num, n_way, k_spt, k_qry, generator)
        losses.append(train_step(net, batch, meta_opt))
        print(f"[iteration {it}] train loss (per-task loop): {losses[-1]:.3f}")
    learner = MAML(net, F.cross_entropy, inner_lr=1e-1, inner_steps=5)
    batch = random_batch(task_num, n_way, k_spt, k_qry, generator)
    print(f"batched path ({learner.loop.vectorize_reason}): "
          f"{train_step_batched(learner, batch, meta_opt):.3f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--n_way", type=int, default=5)
    parser.add_argument("--k_spt", type=int, default=1)
    parser.add_argument("--k_qry", type=int, default=3)
    parser.add_argument("--task_num", type=int, default=4)
    args = parser.parse_args()
    main(args.iterations, args.n_way, args.k_spt, args.k_qry, args.task_num)
