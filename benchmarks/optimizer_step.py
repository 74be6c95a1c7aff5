"""Time per differentiable optimizer step: diffopt vs higher vs torch.optim (issue 2).

Model: an MLP of ``--layers`` Linear layers (default 10, so 20 parameter tensors),
width ``--width``, tanh, float32, batch ``--batch``, mean-squared-error loss,
written functionally so every implementation steps the same list of tensors.

For each optimizer one *trial* starts from the same initial weights, builds the
optimizer (not timed) and takes ``--steps`` steps; two quantities are timed:

``step``
    one ``opt.step(loss)`` call: ``torch.autograd.grad(create_graph=True)`` plus
    the differentiable update (the step used for meta-gradients). The forward
    pass that produces ``loss`` is outside the timer. For torch.optim (not
    differentiable, a reference) it is ``zero_grad(); loss.backward(); step()``.
``unroll``
    the whole trial, forward passes included, followed by ``backward()`` of the
    loss at the final weights to the initial weights, divided by ``--steps``:
    the cost per step of an actual meta-gradient.

The last column counts the operations the dispatcher sees in one steady-state update
(gradient excluded): a ``torch._foreach_*`` operation counts once for the whole list.
``--tensor-lr`` makes the learning rate a learnable 0-dim tensor in the timed trials
(higher: ``override={"lr": [tensor]}``); the parity and operation-count columns always
use the numbers.

Implementations run interleaved (shuffled order every round) in one process;
the table reports medians over trials and the ratio diffopt/higher as the
median (and quartiles) of the per-round ratios. higher has
no NAdam, RAdam, AdamW, Adafactor or Muon (``get_diff_optim`` dispatches on the exact type), so
those are "n/a". A parity column checks diffopt's weights after a trial
against torch.optim's, in float64.

    python benchmarks/optimizer_step.py [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common  # noqa: E402

import diffopt  # noqa: E402

# name -> (torch.optim class name, keyword arguments); the same for every implementation.
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "SGD": ("SGD", {"lr": 0.01, "momentum": 0.9}),
    "Adam": ("Adam", {"lr": 1e-3}),
    "AdamW": ("AdamW", {"lr": 1e-3, "weight_decay": 1e-2}),
    "Adagrad": ("Adagrad", {"lr": 1e-2}),
    "Adadelta": ("Adadelta", {"lr": 1.0}),
    "Adamax": ("Adamax", {"lr": 2e-3}),
    "NAdam": ("NAdam", {"lr": 2e-3}),
    "RAdam": ("RAdam", {"lr": 1e-3}),
    "RMSprop": ("RMSprop", {"lr": 1e-2}),
    "Rprop": ("Rprop", {"lr": 1e-2}),
    "ASGD": ("ASGD", {"lr": 1e-2}),
    "Adafactor": ("Adafactor", {"lr": 1e-2}),
    "Muon": ("Muon", {"lr": 2e-2}),
}
#: Optimizers of weight matrices only: their MLP has no biases (Muon takes 2-D parameters only).
MATRICES_ONLY = frozenset({"Muon"})
IMPLEMENTATIONS = ("diffopt", "higher", "torch.optim")


# -- the problem -----------------------------------------------------------------------
class Problem:
    """Initial weights and data of the functional MLP."""

    def __init__(self, layers: int, width: int, batch: int, seed: int = 0, dtype: torch.dtype = torch.float32,
                 biases: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.params0: list[torch.Tensor] = []
        self.biases = biases
        for _ in range(layers):
            bound = width**-0.5
            self.params0.append((torch.rand(width, width, generator=g, dtype=dtype) * 2 - 1) * bound)
            bias = (torch.rand(width, generator=g, dtype=dtype) * 2 - 1) * bound
            if biases:
                self.params0.append(bias)
        self.x = torch.randn(batch, width, generator=g, dtype=dtype)
        self.y = torch.randn(batch, width, generator=g, dtype=dtype)

    def leaves(self) -> list[torch.Tensor]:
        return [p.clone().requires_grad_() for p in self.params0]

    def loss(self, params: list[torch.Tensor]) -> torch.Tensor:
        h = self.x
        per_layer = 2 if self.biases else 1
        n = len(params) // per_layer
        for i in range(n):
            h = F.linear(h, params[per_layer * i], params[2 * i + 1] if self.biases else None)
            if i < n - 1:
                h = torch.tanh(h)
        return F.mse_loss(h, self.y)


def diff_optimizer_available(name: str) -> bool:
    import higher.optim

    cls = getattr(torch.optim, OPTIMIZERS[name][0])
    return cls in higher.optim._opt_mapping


# -- one trial per implementation -------------------------------------------------------
def make_trial(problem: Problem, name: str, impl: str, steps: int, unroll: bool,
               tensor_lr: bool = False) -> Callable[[], float] | None:
    """A callable running one trial and returning the seconds it measured.

    ``unroll=False``: the sum of the timed step calls / steps. ``unroll=True``: the
    whole unroll plus the meta-backward / steps. ``tensor_lr``: the learning rate is a
    learnable 0-dim tensor (higher: its ``override``), which the meta-backward reaches.
    """
    cls_name, kwargs = OPTIMIZERS[name]
    torch_cls = getattr(torch.optim, cls_name)
    perf = _common.time.perf_counter

    def learning_rate() -> float | torch.Tensor:
        return torch.tensor(kwargs["lr"], requires_grad=True) if tensor_lr else kwargs["lr"]

    if impl == "diffopt":
        dcls = getattr(diffopt.optim, cls_name)

        def trial() -> float:
            leaves = problem.leaves()
            opt = dcls(leaves, **dict(kwargs, lr=learning_rate()))
            params, spent = leaves, 0.0
            start = perf()
            for _ in range(steps):
                loss = problem.loss(params)
                t0 = perf()
                params = opt.step(loss, params)
                spent += perf() - t0
            if unroll:
                problem.loss(params).backward()
                return (perf() - start) / steps
            return spent / steps

        return trial

    if impl == "higher":
        if not diff_optimizer_available(name):
            return None
        import higher.optim

        def trial() -> float:
            leaves = problem.leaves()
            lr = learning_rate()
            hopt = higher.optim.get_diff_optim(torch_cls(leaves, **kwargs), leaves,
                                               override={"lr": [lr]} if tensor_lr else None)
            params, spent = leaves, 0.0
            start = perf()
            for _ in range(steps):
                loss = problem.loss(params)
                t0 = perf()
                params = hopt.step(loss, params=params)
                spent += perf() - t0
            if unroll:
                problem.loss(params).backward()
                return (perf() - start) / steps
            return spent / steps

        return trial

    if impl == "torch.optim":
        if unroll:
            return None

        def trial() -> float:
            leaves = problem.leaves()
            opt = torch_cls(leaves, **kwargs)
            spent = 0.0
            for _ in range(steps):
                loss = problem.loss(leaves)
                t0 = perf()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                spent += perf() - t0
            return spent / steps

        return trial
    raise ValueError(impl)


def parity(args: argparse.Namespace, name: str) -> float:
    """max |diffopt − torch.optim| over the weights after ``args.steps`` steps, in float64."""
    cls_name, kwargs = OPTIMIZERS[name]
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        problem = Problem(args.layers, args.width, args.batch, args.seed, dtype=torch.float64,
                          biases=name not in MATRICES_ONLY)
        leaves = problem.leaves()
        opt = getattr(diffopt.optim, cls_name)(leaves, **kwargs)
        params = leaves
        for _ in range(args.steps):
            params = opt.step(problem.loss(params), params)
        reference = problem.leaves()
        topt = getattr(torch.optim, cls_name)(reference, **kwargs)
        for _ in range(args.steps):
            topt.zero_grad()
            problem.loss(reference).backward()
            topt.step()
        return max(float((a.detach() - b.detach()).abs().max()) for a, b in zip(params, reference))
    finally:
        torch.set_default_dtype(saved)


class _OpCounter(TorchDispatchMode):
    """Counts the tensor operations dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_update_ops(problem: Problem, name: str) -> dict[str, int]:
    """Tensor operations dispatched by one steady-state update (third step, gradient excluded)."""
    cls_name, kwargs = OPTIMIZERS[name]
    counts: dict[str, int] = {}
    leaves = problem.leaves()
    opt = getattr(diffopt.optim, cls_name)(leaves, **kwargs)
    params = opt.step(problem.loss(leaves), leaves)
    params = opt.step(problem.loss(params), params)
    grads = list(torch.autograd.grad(problem.loss(params), params, create_graph=True))
    with _OpCounter() as counter:
        opt.update(params, grads, opt.state, opt.step_count)
    counts["diffopt"] = counter.count
    if diff_optimizer_available(name):
        import higher.optim

        leaves = problem.leaves()
        hopt = higher.optim.get_diff_optim(getattr(torch.optim, cls_name)(leaves, **kwargs), leaves)
        params = hopt.step(problem.loss(leaves), params=leaves)
        params = hopt.step(problem.loss(params), params=params)
        grads = list(torch.autograd.grad(problem.loss(params), params, create_graph=True))
        hopt.param_groups[0]["params"] = list(params)
        with _OpCounter() as counter:
            hopt._update([grads])
        counts["higher"] = counter.count
    return counts


def run(args: argparse.Namespace) -> dict[str, Any]:
    _common.set_threads(args.threads)
    torch.manual_seed(args.seed)
    problems = {biases: Problem(args.layers, args.width, args.batch, args.seed, biases=biases)
                for biases in (True, False)}
    names = args.optimizers or list(OPTIMIZERS)
    results: dict[str, Any] = {}
    for name in names:
        problem = problems[name not in MATRICES_ONLY]
        fns: dict[str, Callable[[], float]] = {}
        for impl in IMPLEMENTATIONS:
            for unroll in (False, True):
                fn = make_trial(problem, name, impl, args.steps, unroll, args.tensor_lr)
                if fn is not None:
                    fns[f"{impl}/{'unroll' if unroll else 'step'}"] = fn
        samples: dict[str, list[float]] = {key: [] for key in fns}
        # Self-timed trials, interleaved in shuffled rounds.
        rng = _common.random.Random(args.seed)
        for _ in range(args.warmup):
            for fn in fns.values():
                fn()
        for _ in range(args.repeats):
            order = list(fns)
            rng.shuffle(order)
            for key in order:
                _common.gc.collect()
                _common.gc.disable()
                try:
                    samples[key].append(fns[key]())
                finally:
                    _common.gc.enable()
        entry: dict[str, Any] = {key: {**_common.summarize(v), "samples": v} for key, v in samples.items()}
        for metric in ("step", "unroll"):
            if f"higher/{metric}" in samples:
                entry[f"diffopt/higher {metric}"] = _common.paired_ratio(samples[f"diffopt/{metric}"],
                                                                        samples[f"higher/{metric}"])
        entry["parity_vs_torch"] = parity(args, name)
        entry["ops_per_update"] = count_update_ops(problem, name)
        results[name] = entry
        if args.verbose:
            print(f"{name}: done", file=sys.stderr)
    return results


def table(results: dict[str, Any]) -> str:
    headers = [
        "optimizer", "diffopt step ms", "higher step ms", "torch.optim step ms (not diff.)",
        "diffopt/higher step", "diffopt unroll ms/step", "higher unroll ms/step", "diffopt/higher unroll",
        "max abs diff vs torch.optim (float64)", "dispatched ops per update, 20 tensors (diffopt / higher)",
    ]
    rows = []
    for name, e in results.items():
        def get(key: str) -> dict[str, float] | None:
            return e.get(key)

        def cell(key: str) -> str:
            s = get(key)
            return "n/a" if s is None else _common.fmt_ms(s)

        def rat(metric: str) -> str:
            q = e.get(f"diffopt/higher {metric}")
            return "n/a" if q is None else f"{q['median']:.2f}x ({q['q1']:.2f}–{q['q3']:.2f})"

        rows.append([
            name, cell("diffopt/step"), cell("higher/step"), cell("torch.optim/step"),
            rat("step"), cell("diffopt/unroll"), cell("higher/unroll"), rat("unroll"), f"{e['parity_vs_torch']:.1e}",
            " / ".join(str(e["ops_per_update"].get(k, "n/a")) for k in ("diffopt", "higher")),
        ])
    return _common.markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_arguments(parser)
    parser.add_argument("--layers", type=int, default=10, help="Linear layers (2 tensors each)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per trial")
    parser.add_argument("--repeats", type=int, default=None, help="timed trials per implementation")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--optimizers", nargs="*", choices=list(OPTIMIZERS), default=None)
    parser.add_argument("--tensor-lr", action="store_true",
                        help="a learnable 0-dim tensor learning rate (higher: override) instead of a number")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 6 if args.quick else 40
    _common.set_threads(args.threads)
    info = _common.machine_info()
    results = run(args)
    info["load_average_end"] = _common.load_average()
    text = table(results)
    _common.report(args, "optimizer_step", f"Differentiable optimizer step ({args.layers} Linear layers = "
                   f"{2 * args.layers} tensors, width {args.width}, batch {args.batch}, float32, {args.steps} steps "
                   f"per trial, {args.repeats} trials{', learnable tensor lr' if args.tensor_lr else ''})", info,
                   results, text, note="ms: median ±IQR/2 over trials; ratios: median (Q1–Q3) of per-round ratios")
    return results


if __name__ == "__main__":
    main()
