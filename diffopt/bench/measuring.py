"""Time, memory and meta-gradient agreement of every implementation for one (problem, K), and
the first- versus second-order meta-gradient discrepancy.

Timing rounds are interleaved (``interleave`` of :mod:`diffopt._measure`); memory
is the profiler's tensor peak in the timing process, or a fresh
``python -m diffopt.bench --worker`` process per configuration.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .. import _measure as common
from ..diagnostics import metagradient_discrepancy
from .baselines import Batch
from .implementations import Implementation, _compare, _error
from .problems import Problem, build_problem
from .settings import Settings, implementations, reference_for


def fixed_batch(problem: Problem, seed: int) -> Batch:
    return problem.source.train_batch(torch.Generator().manual_seed(seed + 1_000_003))


def measure(problem: Problem, steps: int, settings: Settings, predicted: Mapping[str, float] | None = None,
            worker: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Time, memory and meta-gradient agreement of every implementation at ``steps`` inner steps.

    ``predicted``: seconds per call expected from smaller K; implementations over
    ``settings.max_call_s`` are skipped (and say so) rather than run.
    """
    batch = fixed_batch(problem, settings.seed)
    base = problem.make_model()
    out: dict[str, Any] = {}
    fns: dict[str, Callable[[], None]] = {}
    impls: dict[str, Implementation] = {}
    for name in implementations(settings):
        guess = (predicted or {}).get(name)
        if guess is not None and guess > settings.max_call_s:
            out[name] = {"skipped": f"predicted {guess:.1f} s per meta-step > {settings.max_call_s:g} s (max_call_s)"}
            continue
        try:
            impl = Implementation(name, problem, copy.deepcopy(base), steps, settings)
            fn = impl.call(batch)
            started = time.perf_counter()
            fn()  # warm-up: lazy initialisation, caches, thread pools are not charged
            first = time.perf_counter() - started
        except ModuleNotFoundError as error:
            out[name] = {"skipped": str(error)}
            continue
        except Exception as error:  # noqa: BLE001 - recorded; the other implementations go on
            out[name] = {"error": _error(error)}
            continue
        out[name] = {"first_call_s": first}
        info = impl.learner.loop.last_info if impl.learner is not None else {}
        if info.get("solve") is not None:  # implicit mode: how far the warm-up's solve got (the timed calls repeat it)
            solve = info["solve"]
            out[name]["solve"] = {"solver": solve.solver, "iterations": solve.iterations,
                                  "relative_residual": solve.relative_residual, "converged": solve.converged}
        if info.get("stationarity") is not None:  # and how far the inner loop got towards a stationary point
            out[name]["stationarity"] = dict(info["stationarity"])
        impls[name] = impl
        if first > 2 * settings.max_call_s:
            out[name]["note"] = f"one call only: the warm-up took {first:.1f} s > 2 × max_call_s"
            out[name]["time"] = common.summarize([first])
        else:
            fns[name] = fn
    # meta-gradient agreement with the plain loop (the warm-up calls left the gradients in place)
    grads = {name: impl.gradients() for name, impl in impls.items()}
    for name in impls:
        ref = grads.get("plain loop SO")
        out[name]["vs_exact"] = _compare(grads[name], ref)
        if name.endswith(" FO") or name == "first_order":
            out[name]["vs_first_order_loop"] = _compare(grads[name], grads.get("plain loop FO"))
    # memory
    if settings.memory == "profiler":
        for name, impl in impls.items():
            try:
                impl.zero_grad()  # the previous call's gradients are freed here, outside the measured call
                _, peak = common.peak_tensor_bytes(lambda impl=impl: impl.step(batch))
                out[name]["memory"] = {"tensor_peak_bytes": peak, "method": "profiler, in process"}
            except Exception as error:  # noqa: BLE001
                out[name]["memory"] = {"error": _error(error)}
    elif settings.memory == "subprocess":
        run_worker = worker or subprocess_worker
        for name in impls:
            reply = run_worker({"spec": problem.spec, "steps": steps, "implementation": name,
                                "settings": settings.to_dict()})
            out[name]["memory"] = {**reply, "method": "fresh process"}
    # time
    if fns:
        # interleave collects garbage before every call (outside the timer); the ~10^5 long-lived objects
        # of torch, its profiler and the implementations would make each collection take ~0.2 s, so they
        # are moved to the permanent generation for the block (gc.freeze) and given back afterwards.
        gc.collect()
        gc.freeze()
        try:
            samples = common.interleave(fns, repeats=settings.repeats, warmup=max(settings.warmup - 1, 0),
                                        seed=settings.seed, budget_s=settings.block_budget_s,
                                        min_repeats=min(3, settings.repeats),
                                        min_sample_s=settings.min_sample_s or None)
        finally:
            gc.unfreeze()
        for name, values in samples.items():
            out[name]["time"] = common.summarize(values)
    for name, entry in out.items():
        ref = out.get(reference_for(name), {})
        for key, other in (("plain", reference_for(name)), ("higher", reference_for(name).replace("plain", "higher")),
                           ("torch.func", reference_for(name).replace("plain loop", "torch.func vmap"))):
            entry.setdefault("ratios", {})[key] = common.ratio(_median(entry), _median(out.get(other, {})))
        entry["memory_ratio"] = common.ratio(_peak(entry), _peak(ref))
        entry["memory_ratio_second_order"] = common.ratio(_peak(entry), _peak(out.get("second_order", {})))
    if impls and "second_order" in impls:
        out["second_order"]["vectorize_reason"] = impls["second_order"].learner.loop.vectorize_reason
    return out


def _median(entry: Mapping[str, Any]) -> float | None:
    t = entry.get("time")
    return None if not t or not t.get("n") else t["median"]


def _peak(entry: Mapping[str, Any]) -> float | None:
    return (entry.get("memory") or {}).get("tensor_peak_bytes")


def subprocess_worker(config: Mapping[str, Any], timeout: float = 900.0) -> dict[str, Any]:
    """Memory of one configuration in a fresh ``python -m diffopt.bench --worker`` process."""
    threads = config.get("settings", {}).get("threads", 1)
    return common.run_worker_command([sys.executable, "-m", "diffopt.bench"], config, timeout, threads)


def worker(config: Mapping[str, Any]) -> dict[str, Any]:
    """One configuration's memory: a warm-up meta-step, the peak RSS increase during one, then
    the profiler's tensor peak during another (the method of ``benchmarks/engine_memory.py``)."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    raw = {k: v for k, v in config["settings"].items() if k in fields}
    for key in ("steps", "modes", "baselines", "accuracy_baselines"):
        if key in raw:
            raw[key] = tuple(raw[key])
    settings = Settings(**raw)
    torch.set_num_threads(settings.threads)
    problem = build_problem(config["spec"])
    impl = Implementation(config["implementation"], problem, problem.make_model(), int(config["steps"]), settings)
    batch = fixed_batch(problem, settings.seed)
    impl.call(batch)()  # warm-up: library code pages, thread pools and caches are not charged
    impl.zero_grad()
    _, rss, method = common.peak_rss_increase(lambda: impl.step(batch))
    impl.zero_grad()
    _, peak = common.peak_tensor_bytes(lambda: impl.step(batch))
    return {"tensor_peak_bytes": peak, "rss_peak_bytes": rss, "rss_method": method}


def discrepancy(problem: Problem, model: nn.Module, steps: int, batch: Batch, tasks: int) -> dict[str, Any]:
    """``diffopt.diagnostics.metagradient_discrepancy`` at the model's weights: cosine and relative
    error between the first- and second-order meta-gradients per task (mean, 95% CI)."""
    sx, sy, qx, qy = (t[:tasks] for t in batch)
    group = metagradient_discrepancy(model, dict(model.named_parameters()), sx, sy, qx, qy, lr=problem.inner_lr,
                                     steps=steps, loss_fn=problem.loss_fn, bn_mode=problem.bn_mode, batched=True)
    out: dict[str, Any] = {"tasks": int(sx.shape[0])}
    for key, name in (("metagrad/cosine", "cosine"), ("metagrad/relative_error", "relative_error"),
                      ("metagrad/cosine_of_means", "cosine_of_means")):
        if key in group:
            d = group[key]
            out[name] = {"mean": float(d.value), "ci95": None if d.ci95 is None else [float(c) for c in d.ci95]}
    return out
