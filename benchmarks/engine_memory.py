"""Peak memory and time per meta-step of the InnerLoop's hypergradient modes against K.

Problem: the sinusoid MAML problem of ``engine_sinusoid.py`` (MLP 1-40-40-1,
25 tasks, 10 support + 10 query, float32, one thread), inner SGD whose
learning rate is a tensor hyperparameter (0.01, requires grad), vectorised
inner loop, K inner steps. Modes and what receives the meta-gradient:

``second_order``  full reverse unroll: θ and the learning rate.
``checkpointed``  segments of ⌈√K⌉ steps recomputed in backward: θ and the learning rate.
``implicit``      iMAML: proximal term λ/2‖φ−θ‖² with λ = ``--proximal`` (1.0), CG with
                  ``--solver-iterations`` (20) Hessian-vector products: θ.
``forward``       forward-mode tangents, ``forward_wrt=[learning rate]``: the learning rate.
``pes``           persistent ES, ``--es-samples`` (4) antithetic pairs, σ = ``--es-sigma``
                  (1e-3), truncations of ``--pes-truncation`` (10) steps: θ and the learning rate.

Memory: every (mode, K) runs in a fresh process (``--worker``) which first runs
one warm-up meta-step with min(K, 10) steps (to fault in library code and set up
thread pools), then

* the RSS peak increase during one full meta-step (``malloc_trim``, ``VmRSS``
  before, the kernel's peak mark reset through /proc/self/clear_refs,
  ``VmHWM`` after), and that call's wall time;
* the tensor peak during another meta-step: ``torch.profiler`` with
  ``profile_memory=True``; allocation (+) and free (−) events in time order,
  cumulative sum, maximum (tensors alive before the call are not counted);
* whether a finite meta-gradient came out.

Time: for K ≤ ``--time-max-k`` (100) all modes are also timed in one process,
interleaved in shuffled rounds; a time ratio is the median over rounds of the
per-round ratio to second order. For larger K only the single call in the
worker is timed.

Targets: checkpointed peak at K=100 ≤ 25% of second order's and time ≤ 2.5x;
implicit and forward peaks flat in K (K=10 vs K=100 within 10%); K=1000
completes with a meta-gradient in checkpointed, implicit, forward and PES modes.

    python benchmarks/engine_memory.py [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common  # noqa: E402
from benchmarks._common import MEMORY_METHOD  # noqa: E402
from benchmarks.engine_sinusoid import make_data, make_model  # noqa: E402

from diffopt.optim import SGD  # noqa: E402
from diffopt.unroll import InnerLoop  # noqa: E402

MODES = ("second_order", "checkpointed", "implicit", "forward", "pes")


def build(mode: str, steps: int, args: Any) -> tuple[Callable[[], None], list[torch.Tensor], InnerLoop]:
    """A meta-step callable for ``mode``, the tensors that should get a meta-gradient, and the loop."""
    model = make_model(args.hidden, torch.float32, args.seed)
    sx, sy, qx, qy = make_data(args.tasks, args.shots, args.queries, torch.float32, args.seed)
    lr = torch.tensor(args.lr, requires_grad=True)
    options: dict[str, Any] = {}
    wanted = list(model.parameters()) + [lr]
    if mode == "implicit":
        options = {"proximal": args.proximal, "solver_iterations": args.solver_iterations}
        wanted = list(model.parameters())
    elif mode == "forward":
        options = {"forward_wrt": [lr]}
        wanted = [lr]
    elif mode == "pes":
        options = {"es_samples": args.es_samples, "es_sigma": args.es_sigma, "pes_truncation": min(args.pes_truncation, max(steps, 1)),
                   "generator": torch.Generator().manual_seed(args.seed)}
    loop = InnerLoop(model, SGD(model.parameters(), lr=lr), F.mse_loss, steps=steps, mode=mode, vectorize=True,
                     **options)
    everything = list(model.parameters()) + [lr]

    def meta_step() -> None:
        _common.zero_grads(everything)
        loop.meta_loss(sx, sy, qx, qy).backward()

    return meta_step, wanted, loop


def has_meta_gradient(tensors: list[torch.Tensor]) -> bool:
    return all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in tensors) and any(
        bool((t.grad != 0).any()) for t in tensors)


# -- worker: one (mode, K) in a fresh process ------------------------------------------------------
def worker(config: dict[str, Any]) -> dict[str, Any]:
    args = argparse.Namespace(**config)
    _common.set_threads(args.threads)
    mode, steps = args.mode, args.steps_k
    warm, _, _ = build(mode, min(steps, 10), args)
    warm()
    del warm
    fn, wanted, _ = build(mode, steps, args)
    start = time.perf_counter()
    _, rss, method = _common.peak_rss_increase(fn)
    seconds = time.perf_counter() - start
    ok = has_meta_gradient(wanted)
    reply: dict[str, Any] = {"rss_peak_bytes": rss, "rss_method": method, "seconds": seconds,
                             "meta_gradient": ok}
    if not args.skip_profile:
        _, peak = _common.peak_tensor_bytes(fn)
        reply["tensor_peak_bytes"] = peak
    return reply


def memory(args: argparse.Namespace) -> dict[str, dict[str, dict[str, Any]]]:
    config = {k: getattr(args, k) for k in ("hidden", "tasks", "shots", "queries", "lr", "seed", "threads",
                                             "proximal", "solver_iterations", "es_samples", "es_sigma", "pes_truncation")}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for steps in args.steps:
        row = {}
        for mode in args.modes:
            if steps > args.max_second_order_k and mode == "second_order":
                row[mode] = {"error": f"skipped: second order above K={args.max_second_order_k}"}
                continue
            job = {**config, "mode": mode, "steps_k": steps, "skip_profile": steps > args.profile_max_k}
            reply = worker(job) if args.in_process else _common.run_worker(
                __file__, job, timeout=args.worker_timeout, threads=args.threads)
            row[mode] = reply
            if args.verbose:
                print(f"memory K={steps} {mode}: {reply}", file=sys.stderr)
        out[f"K={steps}"] = row
    return out


def timing(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    out = {}
    for steps in args.steps:
        if steps > args.time_max_k:
            continue
        fns, failed = {}, {}
        for mode in args.modes:
            fn = build(mode, steps, args)[0]
            try:
                fn()  # also the warm-up
            except Exception as error:  # noqa: BLE001 - recorded, the other modes go on
                failed[mode] = {"error": f"{type(error).__name__}: {error}"}
                continue
            fns[mode] = fn
        samples = _common.interleave(fns, repeats=args.repeats, warmup=0, seed=args.seed, budget_s=args.budget)
        base = samples.get("second_order")
        out[f"K={steps}"] = {**{
            mode: {**_common.summarize(v), "samples": v,
                   **({"ratio": _common.paired_ratio(v, base)} if base else {})}
            for mode, v in samples.items()}, **failed}
        if args.verbose:
            print(f"timed K={steps}", file=sys.stderr)
    return out


def tables(results: dict[str, Any], args: argparse.Namespace) -> str:
    headers = ["K", "mode", "tensor peak MiB", "peak / second order", "RSS peak increase MiB",
               "ms per meta-step (interleaved)", "time / second order", "s, single call in worker", "meta-gradient"]
    rows = []
    mem, timed = results["memory"], results["timing"]
    for steps in args.steps:
        key = f"K={steps}"
        so_peak = mem[key].get("second_order", {}).get("tensor_peak_bytes")
        for mode in args.modes:
            m = mem[key].get(mode, {})
            t = timed.get(key, {}).get(mode)
            t = t if t and "median" in t else None
            peak = m.get("tensor_peak_bytes")
            if "error" in m:
                rows.append([steps, mode, m["error"], "", "", "", "", "", "no"])
                continue
            rows.append([
                steps, mode, "n/a" if peak is None else f"{peak / _common.MiB:.2f}",
                _common.fmt_ratio(_common.ratio(peak, so_peak)),
                f"{m['rss_peak_bytes'] / _common.MiB:.1f}",
                "n/a" if t is None else _common.fmt_ms(t),
                _common.fmt_ratio(None if t is None or "ratio" not in t else t["ratio"]["median"]),
                f"{m['seconds']:.2f}", "yes" if m.get("meta_gradient") else "no",
            ])
    text = _common.markdown_table(headers, rows)
    text += "\n\nTargets:\n\n" + _common.markdown_table(["target", "measured", ""], targets(results, args))
    return text


def targets(results: dict[str, Any], args: argparse.Namespace) -> list[list[str]]:
    mem, timed = results["memory"], results["timing"]
    out = []

    def peak(k: int, mode: str) -> float | None:
        return mem.get(f"K={k}", {}).get(mode, {}).get("tensor_peak_bytes")

    r = _common.ratio(peak(100, "checkpointed"), peak(100, "second_order"))
    out.append(["checkpointed peak at K=100 ≤ 25% of second order's", _common.fmt_ratio(r),
                "n/a" if r is None else ("met" if r <= 0.25 else "missed")])
    t = timed.get("K=100", {})
    r = t.get("checkpointed", {}).get("ratio", {}).get("median")
    out.append(["checkpointed time at K=100 ≤ 2.5x second order's", _common.fmt_ratio(r),
                "n/a" if r is None else ("met" if r <= 2.5 else "missed")])
    for mode in ("implicit", "forward"):
        r = _common.ratio(peak(100, mode), peak(10, mode))
        ok = r is not None and abs(r - 1) <= 0.10
        out.append([f"{mode} peak flat in K (K=100 / K=10 within 10%)", _common.fmt_ratio(r),
                    "n/a" if r is None else ("met" if ok else "missed")])
    if "K=1000" in mem:
        for mode in ("checkpointed", "implicit", "forward", "pes"):
            m = mem["K=1000"].get(mode, {})
            done = bool(m.get("meta_gradient"))
            out.append([f"K=1000 completes with a meta-gradient: {mode}",
                        f"{m['seconds']:.1f} s" if "seconds" in m else m.get("error", "not run"),
                        "met" if done else "missed"])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_arguments(parser)
    parser.add_argument("--steps", type=int, nargs="*", default=None, help="K values (default 10 100 1000; quick: 10 100)")
    parser.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    parser.add_argument("--tasks", type=int, default=25)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--proximal", type=float, default=1.0)
    parser.add_argument("--solver-iterations", type=int, default=20)
    parser.add_argument("--es-samples", type=int, default=4)
    parser.add_argument("--es-sigma", type=float, default=1e-3,
                        help="PES perturbation scale (1e-2 on a 0.01 learning rate makes it negative and diverge)")
    parser.add_argument("--pes-truncation", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed rounds per K")
    parser.add_argument("--time-max-k", type=int, default=100, help="interleaved timing only up to this K")
    parser.add_argument("--profile-max-k", type=int, default=1000, help="tensor-peak profiling only up to this K")
    parser.add_argument("--max-second-order-k", type=int, default=1000)
    parser.add_argument("--worker-timeout", type=float, default=900)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--in-process", action="store_true",
                        help="measure memory in this process instead of a fresh one per configuration (tests)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _common.worker_reply(worker(json.loads(args.worker)))
        return {}
    if args.steps is None:
        args.steps = [10, 100] if args.quick else [10, 100, 1000]
    if args.repeats is None:
        args.repeats = 2 if args.quick else 10
    _common.set_threads(args.threads)
    info = _common.machine_info()
    results: dict[str, Any] = {"memory": memory(args), "timing": timing(args)}
    info["load_average_end"] = _common.load_average()
    text = tables(results, args)
    _common.report(args, "engine_memory", f"InnerLoop modes: memory and time per meta-step against K (sinusoid MLP "
                   f"1-{args.hidden}-{args.hidden}-1, {args.tasks} tasks, vectorised, float32; implicit: proximal "
                   f"{args.proximal}, {args.solver_iterations} CG iterations; pes: {args.es_samples} antithetic pairs, "
                   f"truncation {args.pes_truncation})", info, results, text, exclude=("json", "worker"),
                   memory_method=MEMORY_METHOD)
    return results


if __name__ == "__main__":
    main()
