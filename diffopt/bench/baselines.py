"""The baselines every engine mode is timed against: one meta-step of MAML written four ways.

Each builder takes ``(model, loss_fn, lr, steps, first_order)`` and returns
``step(batch) -> loss`` that runs K inner SGD steps per task from the model's
weights, takes the mean query loss and calls ``backward()`` (the meta-gradient
lands in the model's ``.grad``):

* ``plain loop`` — per task ``torch.func.functional_call`` and
  ``torch.autograd.grad`` (the reference every ratio is divided by);
* ``higher loop`` — per task ``higher.innerloop_ctx`` with ``torch.optim.SGD``;
* ``torch.func vmap`` — ``vmap`` over tasks of K ``torch.func.grad`` steps;
* ``torchopt`` — torchopt's ``MetaSGD`` recipe (second order only).

The task-by-task rows of the engine benchmarks (issue 16), all with a backward per task, as the
peers' MAML examples do (:data:`PEER_ROWS`): ``diffopt.innerloop`` (the drop-in for higher's
``innerloop_ctx``), ``torchopt functional`` (``torchopt.sgd`` with ``update`` / ``apply_updates``)
and ``learn2learn stand-in`` (learn2learn's ``clone`` + ``maml_update`` written out: learn2learn
does not build on Python 3.11).

``benchmarks/engine_sinusoid.py`` times the same functions.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["BASELINE_BUILDERS", "Batch", "PEER_ROWS", "baseline_available", "func_vmap_step", "higher_step",
           "innerloop_step", "learn2learn_standin_step", "peer_row_available", "plain_loop_step",
           "torchopt_functional_step", "torchopt_step"]

Batch = tuple[Tensor, Tensor, Tensor, Tensor]


def _adapted_names(model: nn.Module) -> tuple[list[str], list[bool]]:
    named = list(model.named_parameters())
    return [n for n, _ in named], [p.requires_grad for _, p in named]


def plain_loop_step(model: nn.Module, loss_fn: Callable, lr: float, steps: int, first_order: bool,
                    per_task_backward: bool = False) -> Callable[[Batch], Tensor]:
    """Per task ``functional_call`` + ``autograd.grad`` K times; the mean query loss; one backward
    (``per_task_backward``: a backward per task instead, which frees each task's graph early)."""
    names, trainable = _adapted_names(model)
    theta = list(model.parameters())

    def step(batch: Batch) -> Tensor:
        sx, sy, qx, qy = batch
        tasks = sx.shape[0]
        total: Tensor | float = 0.0
        for t in range(tasks):
            fast = list(theta)
            for _ in range(steps):
                out = torch.func.functional_call(model, dict(zip(names, fast)), (sx[t],))
                live = [p for p, r in zip(fast, trainable) if r]
                grads = iter(torch.autograd.grad(loss_fn(out, sy[t]), live, create_graph=not first_order))
                fast = [p - lr * next(grads) if r else p for p, r in zip(fast, trainable)]
            out = torch.func.functional_call(model, dict(zip(names, fast)), (qx[t],))
            if per_task_backward:
                loss = loss_fn(out, qy[t]) / tasks
                loss.backward()
                total = total + loss.detach()
            else:
                total = total + loss_fn(out, qy[t])
        if per_task_backward:
            return torch.as_tensor(total)
        loss = total / tasks
        loss.backward()
        return loss.detach()

    return step


def higher_step(model: nn.Module, loss_fn: Callable, lr: float, steps: int,
                first_order: bool) -> Callable[[Batch], Tensor]:
    """Per task ``higher.innerloop_ctx`` with ``torch.optim.SGD``, backward per task (higher's MAML
    example); first order detaches the gradients in ``grad_callback`` (higher has no switch)."""
    import higher

    inner = torch.optim.SGD(model.parameters(), lr=lr)
    callback = (lambda grads: [None if g is None else g.detach() for g in grads]) if first_order else None

    def step(batch: Batch) -> Tensor:
        sx, sy, qx, qy = batch
        tasks, total = sx.shape[0], 0.0
        for t in range(tasks):
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(fmodel(sx[t]), sy[t]), grad_callback=callback)
                loss = loss_fn(fmodel(qx[t]), qy[t]) / tasks
                loss.backward()
                total += float(loss.detach())
        return torch.tensor(total)

    return step


def func_vmap_step(model: nn.Module, loss_fn: Callable, lr: float, steps: int,
                   first_order: bool) -> Callable[[Batch], Tensor]:
    """``torch.func.vmap`` over tasks of K ``torch.func.grad`` steps (first order: gradients detached)."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def task_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(torch.func.functional_call(model, (p, buffers), (x,)), y)

    def adapt_and_query(p: dict[str, Tensor], x: Tensor, y: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        for _ in range(steps):
            g = torch.func.grad(task_loss)(p, x, y)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            p = {k: p[k] - lr * g[k] for k in p}
        return task_loss(p, xq, yq)

    batched = torch.func.vmap(adapt_and_query, in_dims=(None, 0, 0, 0, 0))

    def step(batch: Batch) -> Tensor:
        loss = batched(params, *batch).mean()
        loss.backward()
        return loss.detach()

    return step


def torchopt_step(model: nn.Module, loss_fn: Callable, lr: float, steps: int,
                  first_order: bool) -> Callable[[Batch], Tensor]:
    """torchopt's MAML recipe: ``MetaSGD`` steps per task, backward per task, state recovered."""
    import torchopt

    if first_order:
        raise NotImplementedError("torchopt's MetaSGD has no first-order switch")
    inner = torchopt.MetaSGD(model, lr=lr)
    net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
    optim_state = torchopt.extract_state_dict(inner)

    def step(batch: Batch) -> Tensor:
        sx, sy, qx, qy = batch
        tasks, total = sx.shape[0], 0.0
        for t in range(tasks):
            for _ in range(steps):
                inner.step(loss_fn(model(sx[t]), sy[t]))
            loss = loss_fn(model(qx[t]), qy[t]) / tasks
            loss.backward()
            total += float(loss.detach())
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(inner, optim_state)
        return torch.tensor(total)

    return step


# -- task-by-task rows of the engine benchmarks (issue 16) ----------------------------------------
def innerloop_step(model: nn.Module, loss_fn: Callable, lr: float, steps: int,
                   first_order: bool) -> Callable[[Batch], Tensor]:
    """Per task a ``diffopt.innerloop`` block with ``torch.optim.SGD``, backward per task (higher's MAML
    example, ported)."""
    from ..innerloop import innerloop

    inner = torch.optim.SGD(model.parameters(), lr=lr)

    def step(batch: Batch) -> Tensor:
        sx, sy, qx, qy = batch
        tasks = sx.shape[0]
        total: Tensor | float = 0.0
        for t in range(tasks):
            with innerloop(model, inner, first_order=first_order) as (fmodel, dopt):
                for _ in range(steps):
                    dopt.step(loss_fn(fmodel(sx[t]), sy[t]))
                loss = loss_fn(fmodel(qx[t]), qy[t]) / tasks
                loss.backward()
                total = total + loss.detach()
        return torch.as_tensor(total)

    return step


def torchopt_functional_step(model: nn.Module, loss_fn: Callable, lr: float, steps: int,
                             first_order: bool) -> Callable[[Batch], Tensor]:
    """torchopt's functional API per task: ``torchopt.sgd(lr)``'s ``init`` / ``update(inplace=False)`` and
    ``apply_updates(inplace=False)`` on the weights of ``functional_call``, backward per task (first order:
    gradients without a graph)."""
    import torchopt

    names, trainable = _adapted_names(model)
    if not all(trainable):
        raise NotImplementedError("torchopt functional row: every parameter must require grad")
    theta = tuple(model.parameters())
    optimizer = torchopt.sgd(lr=lr)

    def step(batch: Batch) -> Tensor:
        sx, sy, qx, qy = batch
        tasks = sx.shape[0]
        total: Tensor | float = 0.0
        for t in range(tasks):
            params = theta
            state = optimizer.init(params)
            for _ in range(steps):
                out = torch.func.functional_call(model, dict(zip(names, params)), (sx[t],))
                grads = torch.autograd.grad(loss_fn(out, sy[t]), params, create_graph=not first_order)
                updates, state = optimizer.update(grads, state, params=params, inplace=False)
                params = torchopt.apply_updates(params, updates, inplace=False)
            loss = loss_fn(torch.func.functional_call(model, dict(zip(names, params)), (qx[t],)), qy[t]) / tasks
            loss.backward()
            total = total + loss.detach()
        return torch.as_tensor(total)

    return step


def learn2learn_standin_step(model: nn.Module, loss_fn: Callable, lr: float, steps: int,
                             first_order: bool) -> Callable[[Batch], Tensor]:
    """A stand-in for learn2learn's MAML example (learn2learn does not build on Python 3.11): per task
    ``maml.clone()`` (every weight cloned) and ``adapt`` (``autograd.grad`` with ``allow_unused``, then
    ``maml_update``: p − lr·g), written with ``functional_call``; backward per task."""
    names, _ = _adapted_names(model)
    theta = list(model.parameters())

    def step(batch: Batch) -> Tensor:
        sx, sy, qx, qy = batch
        tasks = sx.shape[0]
        total: Tensor | float = 0.0
        for t in range(tasks):
            params = [p.clone() for p in theta]
            for _ in range(steps):
                out = torch.func.functional_call(model, dict(zip(names, params)), (sx[t],))
                grads = torch.autograd.grad(loss_fn(out, sy[t]), params, create_graph=not first_order,
                                            allow_unused=True)
                params = [p if g is None else p - lr * g for p, g in zip(params, grads)]
            loss = loss_fn(torch.func.functional_call(model, dict(zip(names, params)), (qx[t],)), qy[t]) / tasks
            loss.backward()
            total = total + loss.detach()
        return torch.as_tensor(total)

    return step


#: row name -> builder; every row does a backward per task
PEER_ROWS: dict[str, Callable[..., Callable[[Batch], Tensor]]] = {
    "diffopt.innerloop": innerloop_step,
    "higher loop": higher_step,
    "torchopt functional": torchopt_functional_step,
    "learn2learn stand-in": learn2learn_standin_step,
}


def peer_row_available(row: str) -> str | None:
    """None when the row can run here, else why not."""
    module = {"higher loop": "higher", "torchopt functional": "torchopt"}.get(row)
    if module is not None and importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None


BASELINE_BUILDERS = {"plain loop": plain_loop_step, "higher loop": higher_step, "torch.func vmap": func_vmap_step,
                     "torchopt": torchopt_step}


def baseline_available(baseline: str) -> str | None:
    """None when the baseline can run here, else why not."""
    module = {"higher loop": "higher", "torchopt": "torchopt"}.get(baseline)
    if module is None:
        return None
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None
