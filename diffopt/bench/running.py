"""The whole ``diffopt bench`` run: every problem, K, mode and baseline; returns JSON-able results
(formatted by :mod:`.reporting`), and the issue's targets checked on them."""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import _measure as common
from .._progress import Progress
from .implementations import _error
from .measuring import _median, _peak, discrepancy, fixed_batch, measure
from .problems import Problem
from .settings import Settings, implementations, reference_for
from .training_runs import accuracy

HELPERS = "diffopt._measure"


def _work(problems: Sequence[Problem], settings: Settings) -> int:
    total = 0
    for problem in problems:
        ks = settings.steps_for(problem.spec["kind"])
        total += len(ks) * (2 if settings.discrepancy else 1)
        if settings.accuracy:
            total += len(settings.train_steps_for(problem.spec["kind"])) * (
                len(settings.modes) + len(settings.accuracy_baselines) + 1)
    return total


def run(problems: Sequence[Problem], settings: Settings, progress: bool = True,
        stream: Any = None) -> dict[str, Any]:
    """Measure every problem; returns a JSON-able dictionary (see :func:`markdown`)."""
    torch.set_num_threads(settings.threads)
    info = common.machine_info()
    bar = Progress(_work(problems, settings), "diffopt bench", enabled=progress, stream=stream)
    results: dict[str, Any] = {
        "benchmark": "modes", "machine": info, "settings": settings.to_dict(), "helpers": HELPERS,
        "memory_method": memory_method(settings), "implementations": implementations(settings), "problems": {},
    }
    started = time.perf_counter()
    for problem in problems:
        kind = problem.spec["kind"]
        entry: dict[str, Any] = {"description": problem.description, "spec": problem.spec, "metric": problem.metric,
                                 "timing": {}, "discrepancy": {}, "accuracy": {}}
        results["problems"][problem.name] = entry
        previous: dict[str, tuple[int, float]] = {}
        for steps in settings.steps_for(kind):
            bar.update(0, postfix=f"{problem.name} K={steps}: time and memory")
            predicted = {name: seconds * steps / k for name, (k, seconds) in previous.items()}
            block = measure(problem, steps, settings, predicted)
            for name, value in block.items():
                seconds = _median(value) or value.get("first_call_s")
                if seconds:
                    previous[name] = (steps, seconds)
            entry["timing"][str(steps)] = block
            bar.update(1, postfix=f"{problem.name} K={steps} timed")
            if settings.discrepancy:
                try:
                    entry["discrepancy"][str(steps)] = discrepancy(
                        problem, problem.make_model(), steps, fixed_batch(problem, settings.seed),
                        settings.discrepancy_tasks)
                except Exception as error:  # noqa: BLE001
                    entry["discrepancy"][str(steps)] = {"error": _error(error)}
                bar.update(1, postfix=f"{problem.name} K={steps} discrepancy")
        if settings.accuracy:
            entry["accuracy"] = accuracy(problem, settings, bar)
        entry["vectorize_reason"] = next((b["second_order"].get("vectorize_reason") for b in entry["timing"].values()
                                          if "second_order" in b and b["second_order"].get("vectorize_reason")), None)
    bar.close()
    info["load_average_end"] = common.load_average()
    results["seconds"] = time.perf_counter() - started
    results["targets"] = targets(results)
    return results


def memory_method(settings: Settings) -> str:
    if settings.memory == "off":
        return "not measured"
    where = ("in the timing process, after a warm-up meta-step" if settings.memory == "profiler" else
             "in a fresh Python process per configuration after a warm-up meta-step, with the peak RSS increase "
             "(malloc_trim, VmRSS before, peak mark reset through /proc/self/clear_refs, VmHWM after)")
    return ("Peak of CPU tensor memory during one meta-step above the memory in use when it started: "
            "torch.profiler.profile(profile_memory=True) allocation (+) and free (-) events summed in time order, "
            f"maximum (peak_tensor_bytes, {HELPERS}); measured {where}. Validated on a known 64 MiB allocation in "
            "tests/test_bench.py and tests/test_benchmarks.py.")


def targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, checked on the sinusoid problem where it was measured."""
    out: list[dict[str, Any]] = []
    problem = results["problems"].get("sinusoid")
    if problem is None:
        return out
    timing = problem["timing"]

    def entry(k: int, name: str) -> Mapping[str, Any]:
        return timing.get(str(k), {}).get(name, {})

    for name, bound in (("second_order", 0.2), ("first_order", 0.25)):
        r = entry(5, name).get("ratios", {}).get("plain")
        out.append({"target": f"sinusoid {name} meta-step at K=5 ≤ {bound}x the plain loop ({reference_for(name)})",
                    "value": r, "display": common.fmt_ratio(r), "met": None if r is None else r <= bound})
    r = common.ratio(_peak(entry(100, "checkpointed")), _peak(entry(100, "second_order")))
    out.append({"target": "sinusoid checkpointed peak memory at K=100 ≤ 25% of second order's", "value": r,
                "display": common.fmt_ratio(r), "met": None if r is None else r <= 0.25})
    ks = sorted(int(k) for k in timing)
    for name in ("implicit", "forward"):
        peaks = {k: v for k in ks if (v := _peak(entry(k, name)))}
        r = common.ratio(peaks.get(100), peaks.get(10))
        display = common.fmt_ratio(r)
        if len(peaks) >= 2:
            display += (f" (max/min over K={min(peaks)}..{max(peaks)}: "
                        f"{max(peaks.values()) / min(peaks.values()):.2f}x)")
        out.append({"target": f"sinusoid {name} peak memory flat in K (K=100 / K=10 within 10%)", "value": r,
                    "display": display, "met": None if r is None else abs(r - 1) <= 0.10})
    return out
