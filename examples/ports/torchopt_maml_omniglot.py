"""torchopt's ``examples/few-shot/maml_omniglot.py``, ported to diffopt: random stand-in images.

torchopt's ``MetaSGD(net, lr)`` steps the module's parameters in place, so the original
saves and restores the net and the optimizer around every task
(``extract_state_dict`` / ``recover_state_dict``). diffopt never writes into the net: each
task runs in its own ``diffopt.innerloop(net, inner_opt)`` block, which adapts a patched
copy, so there is nothing to save or restore. The trap of the shortest port —
``diffopt.optim.SGD(net.parameters(), lr)`` with losses still computed as ``net(x)`` — is an
error that names the fix: the loss must come from the optimizer's current parameters
(which ``innerloop``'s ``fnet`` provides).

Query losses are averaged over tasks and differentiated once, as in the original;
``train_step_batched`` is the engine's path for the same meta-gradient.

    python examples/ports/torchopt_maml_omniglot.py --iterations 3
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import diffopt
from diffopt.algorithms import MAML


def make_net(n_way: int, channels: int = 64) -> nn.Module:
    def block(c_in: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, channels, 3), nn.BatchNorm2d(channels, momentum=1.0, affine=True),
                nn.ReLU(inplace=False), nn.MaxPool2d(2, 2)]

    return nn.Sequential(*block(1), *block(channels), *block(channels), nn.Flatten(), nn.Linear(channels, n_way))


def random_batch(task_num: int, n_way: int, k_spt: int, k_qry: int, generator: torch.Generator,
                 dtype: torch.dtype = torch.float32):
    """Stand-in for ``OmniglotNShot.next()``."""
    def part(k: int):
        x = torch.randn(task_num, n_way * k, 1, 28, 28, generator=generator, dtype=dtype)
        return x, torch.arange(n_way).repeat_interleave(k).expand(task_num, -1).contiguous()

    return (*part(k_spt), *part(k_qry))


def query_loss(net: nn.Module, batch, n_inner_iter: int = 5, inner_lr: float = 1e-1) -> torch.Tensor:
    """The original's task loop: ``n_inner_iter`` SGD steps per task, the mean query loss."""
    x_spt, y_spt, x_qry, y_qry = batch
    inner_opt = diffopt.optim.SGD(net.parameters(), lr=inner_lr)
    qry_losses = []
    for i in range(x_spt.size(0)):
        with diffopt.innerloop(net, inner_opt) as (fnet, inner):
            for _ in range(n_inner_iter):
                spt_loss = F.cross_entropy(fnet(x_spt[i]), y_spt[i])
                inner.step(spt_loss)
            qry_losses.append(F.cross_entropy(fnet(x_qry[i]), y_qry[i]))
    return torch.mean(torch.stack(qry_losses))


def train_step(net: nn.Module, batch, meta_opt: torch.optim.Optimizer) -> float:
    meta_opt.zero_grad()
    loss = query_loss(net, batch)
    loss.backward()
    meta_opt.step()
    return loss.item()


def train_step_batched(learner: MAML, batch, meta_opt: torch.optim.Optimizer) -> float:
    meta_opt.zero_grad()
    loss = learner.meta_loss(*batch)
    loss.backward()
    meta_opt.step()
    return loss.item()


def main(iterations: int = 3, n_way: int = 5, k_spt: int = 1, k_qry: int = 3, task_num: int = 4,
         channels: int = 16, seed: int = 1) -> list[float]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = make_net(n_way, channels)
    meta_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = [train_step(net, random_batch(task_num, n_way, k_spt, k_qry, generator), meta_opt)
              for _ in range(iterations)]
    for it, loss in enumerate(losses):
        print(f"[iteration {it}] train loss: {loss:.3f}")
    learner = MAML(net, F.cross_entropy, inner_lr=1e-1, inner_steps=5)
    batch = random_batch(task_num, n_way, k_spt, k_qry, generator)
    print(f"batched path: {train_step_batched(learner, batch, meta_opt):.3f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3)
    main(parser.parse_args().iterations)
