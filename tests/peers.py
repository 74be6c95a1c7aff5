"""The peers' own meta-gradients, computed with their libraries, for the port tests.

Each function follows the structure of the peer's published example (higher's
``examples/maml-omniglot.py``, torchopt's ``examples/few-shot/maml_omniglot.py``,
``examples/iMAML/imaml_omniglot.py`` and ``examples/L2R/l2r.py``) on the tensors given, and
returns what the port must reproduce, without touching ``.grad``. learn2learn does not
install on Python 3.11, so :func:`learn2learn_reference` writes its ``maml_update`` /
``meta_sgd_update`` out by hand.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def learn2learn_reference(model: nn.Module, tasks, lr, steps: int, first_order: bool = False, lrs=None,
                          frozen=(), loss_fn=F.mse_loss) -> torch.Tensor:
    """learn2learn's maml_update / meta_sgd_update, written out: per task, clone θ, take
    ``steps`` steps p ← p − α·g (g with a graph unless first order), mean query loss."""
    names = [n for n, _ in model.named_parameters()]
    theta = [p for _, p in model.named_parameters()]
    losses = []
    for xs, ys, xq, yq in tasks:
        params = [p.clone() for p in theta]
        rates = [r.clone() for r in lrs] if lrs is not None else None
        for _ in range(steps):
            loss = loss_fn(torch.func.functional_call(model, dict(zip(names, params)), (xs,)), ys)
            wanted = [p for n, p in zip(names, params) if n not in frozen]
            grads = iter(torch.autograd.grad(loss, wanted, create_graph=not first_order, allow_unused=True))
            new = []
            for k, (n, p) in enumerate(zip(names, params)):
                g = None if n in frozen else next(grads)
                rate = rates[k] if rates is not None else lr
                new.append(p if g is None else p - rate * g)
            params = new
        losses.append(loss_fn(torch.func.functional_call(model, dict(zip(names, params)), (xq,)), yq))
    return torch.stack(losses).mean()


def higher_maml_gradient(net: nn.Module, batch, n_inner_iter: int, inner_lr: float) -> list[torch.Tensor]:
    """higher's maml-omniglot ``train`` loop body on a copy of ``net``: the query losses' gradient,
    summed over tasks (one backward per task inside ``innerloop_ctx``)."""
    import higher

    net = copy.deepcopy(net)
    x_spt, y_spt, x_qry, y_qry = batch
    inner_opt = torch.optim.SGD(net.parameters(), lr=inner_lr)
    for i in range(x_spt.size(0)):
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(n_inner_iter):
                diffopt.step(F.cross_entropy(fnet(x_spt[i]), y_spt[i]))
            F.cross_entropy(fnet(x_qry[i]), y_qry[i]).backward()
    return [p.grad for p in net.parameters()]


def torchopt_maml_gradient(net: nn.Module, batch, n_inner_iter: int, inner_lr: float) -> tuple[torch.Tensor, ...]:
    """torchopt's few-shot ``train`` loop body on a copy of ``net``: ``MetaSGD`` steps in place,
    state saved and recovered around each task, the mean query loss differentiated once."""
    import torchopt

    net = copy.deepcopy(net)
    params = list(net.parameters())
    x_spt, y_spt, x_qry, y_qry = batch
    inner_opt = torchopt.MetaSGD(net, lr=inner_lr)
    net_state_dict = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
    optim_state_dict = torchopt.extract_state_dict(inner_opt, by="reference")
    qry_losses = []
    for i in range(x_spt.size(0)):
        for _ in range(n_inner_iter):
            inner_opt.step(F.cross_entropy(net(x_spt[i]), y_spt[i]))
        qry_losses.append(F.cross_entropy(net(x_qry[i]), y_qry[i]))
        torchopt.recover_state_dict(net, net_state_dict)
        torchopt.recover_state_dict(inner_opt, optim_state_dict)
    return torch.autograd.grad(torch.mean(torch.stack(qry_losses)), params)


def torchopt_l2r_weights(model: nn.Module, lr: float, inner_loss, outer_loss, train_x, train_label, valid_x,
                         valid_label) -> torch.Tensor:
    """torchopt's L2R meta step on a copy of ``model``: ``MetaSGD`` step on the ε-weighted loss,
    ε = relu(−∂L_valid/∂ε), normalised as ``LeNet5.normalise``."""
    import torchopt

    model = copy.deepcopy(model)
    model_optimizer = torchopt.MetaSGD(model, lr=lr)
    meta_weights = torch.zeros(train_x.size(0), dtype=train_x.dtype, requires_grad=True)
    net_state_dict = torchopt.extract_state_dict(model)
    optim_state_dict = torchopt.extract_state_dict(model_optimizer)
    model_optimizer.step(inner_loss(model, meta_weights, train_x, train_label))
    outer = outer_loss(model, valid_x, valid_label)
    weights = torch.nn.ReLU()(-torch.autograd.grad(outer, meta_weights)[0]).detach()
    torchopt.recover_state_dict(model, net_state_dict)
    torchopt.recover_state_dict(model_optimizer, optim_state_dict)
    total = torch.sum(weights)
    total = total + 1 if total == 0 else total
    return weights / total


def imaml_torchopt_gradient(model: nn.Module, xs, ys, xq, yq, *, steps: int, inner_lr: float, reg: float,
                            cg_iterations: int, rtol: float = 0.0) -> tuple[torch.Tensor, ...]:
    """torchopt's iMAML: an ``ImplicitMetaGradientModule`` solved by ``steps`` SGD steps on the
    proximal objective, differentiated by ``solve_normal_cg(maxiter=cg_iterations, atol=0, rtol=rtol)``
    (the example's is ``rtol=1e-5``, torchopt's default)."""
    import torchopt
    from torchopt.diff.implicit import ImplicitMetaGradientModule

    class InnerNet(ImplicitMetaGradientModule,
                   linear_solve=torchopt.linear_solve.solve_normal_cg(maxiter=cg_iterations, atol=0, rtol=rtol)):
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
