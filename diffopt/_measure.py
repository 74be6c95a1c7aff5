"""Measurement helpers shared by ``diffopt bench`` and the scripts in ``benchmarks/``:
interleaved timing, robust summaries, the machine description, peak-memory
measurement, markdown tables and JSON output (``benchmarks/_common.py`` re-exports
them for the scripts).

Timing
------
:func:`interleave` runs every implementation once per round, in an order that is
reshuffled (seeded) every round, so slow drifts of a shared machine (other
processes, frequency scaling, thermal state) hit every implementation alike.
Each sample is one call, or with ``min_sample_s`` the mean of enough back-to-back
calls to last that long (as ``timeit`` sizes its loops), timed with
``time.perf_counter`` (or another ``clock``: the engine scripts' ``--clock cpu``
takes the thread's CPU time) with the garbage collector paused during the sample
(collected between samples). Report medians and ratios against a baseline
measured in the same run; never compare absolute numbers between runs.

Memory (CPU)
------------
Two measurements, both taken in a fresh process per configuration when it
matters (:func:`run_worker`):

* **tensor peak** (:func:`peak_tensor_bytes`): every allocation and free made by
  PyTorch's CPU allocator during the call is recorded by
  ``torch.profiler.profile(profile_memory=True)``; the events, in time order,
  are summed cumulatively and the maximum is the peak of tensor memory *above
  what was allocated when the call started* (tensors alive before the call are
  not counted; tensors they free during the call count negatively). This is the
  CPU analogue of ``torch.cuda.max_memory_allocated`` minus the starting value.
* **RSS peak increase** (:func:`peak_rss_increase`): freed heap memory is handed
  back to the OS (glibc ``malloc_trim(0)``), the resident set size is read
  (``VmRSS``), the kernel's peak mark is reset (``echo 5 > /proc/self/clear_refs``),
  the call runs, and the peak (``VmHWM``) minus the starting RSS is reported. It
  includes allocator fragmentation and Python objects. Run it after a warm-up
  call: the first call of a process also faults in hundreds of MiB of library
  code pages (libtorch), which RSS counts. Without ``clear_refs`` it falls back to
  ``ru_maxrss``, which only sees a new process-lifetime peak.

Both are validated in ``tests/test_benchmarks.py`` on a known 64 MiB allocation.
"""
from __future__ import annotations

import datetime as _dt
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

MiB = 2**20
MEMORY_METHOD = (
    "Each configuration runs in a fresh Python process after one warm-up call. Tensor peak: "
    "torch.profiler.profile(profile_memory=True) records every CPU allocator allocation (+bytes) and free "
    "(-bytes) during one call; in time order, the running sum's maximum is the peak above the memory in use "
    "when the call started (frees of blocks allocated before the call are not seen, so it is an upper bound "
    "by at most those blocks). RSS peak increase: malloc_trim(0), VmRSS read, the kernel's peak mark reset "
    "(echo 5 > /proc/self/clear_refs), one call, VmHWM minus the VmRSS before. Validated on a 64 MiB "
    "allocation in tests/test_benchmarks.py."
)


# -- machine ---------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Where and with what a benchmark ran."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "higher": _version("higher"),
        "diffopt": _version("diffopt"),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average": load_average(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: how busy the (shared) machine was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def describe_machine(info: Mapping[str, Any]) -> str:
    return (
        f"{info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), torch {info['torch']}, "
        f"{info['threads']} thread(s), Python {info['python']}, {info['date']}, load average "
        f"{info.get('load_average')}"
    )


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


# -- timing ----------------------------------------------------------------------------
def time_call(fn: Callable[[], Any], number: int = 1, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of ``fn``, averaged over ``number`` back-to-back calls, garbage collector
    paused during them. ``clock``: wall time (default), or e.g. ``time.thread_time`` for the
    calling thread's CPU time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = clock()
        for _ in range(number):
            fn()
        return (clock() - start) / number
    finally:
        if enabled:
            gc.enable()


def calls_per_sample(fn: Callable[[], Any], min_sample_s: float, clock: Callable[[], float] = time.perf_counter) -> int:
    """How many back-to-back calls of ``fn`` make a sample of at least ``min_sample_s`` (by one timed
    call; at least 1), as ``timeit`` sizes its loops."""
    return max(1, math.ceil(min_sample_s / max(time_call(fn, clock=clock), 1e-9)))


def interleave(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 2,
    seed: int = 0,
    budget_s: float | None = None,
    min_repeats: int = 3,
    collect: bool = True,
    clock: Callable[[], float] = time.perf_counter,
    min_sample_s: float | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every function, measured in interleaved, shuffled rounds.

    ``warmup`` untimed rounds come first. With ``budget_s``, rounds stop once the
    time spent exceeds it (after at least ``min_repeats`` rounds). ``collect``:
    run the garbage collector before every sample (outside the timer). ``clock``: wall
    time (default) or another clock, e.g. ``time.thread_time``.

    With ``min_sample_s``, each sample is the mean of as many back-to-back calls as make it
    last at least that long (sized once per function after the warm-up, :func:`calls_per_sample`),
    as ``timeit`` does. A single call of a millisecond right after a full collection and six
    other functions' calls runs from cold caches, which costs code with more Python per call
    more than code with less (a sinusoid meta-step read 1.6-1.75x its back-to-back time,
    ``benchmarks/RESULTS.md`` section 10); back-to-back calls measure what a training loop runs.
    """
    names = list(fns)
    rng = random.Random(seed)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    number = {name: 1 if min_sample_s is None else calls_per_sample(fns[name], min_sample_s, clock)
              for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for r in range(repeats):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            if collect:
                gc.collect()
            times[name].append(time_call(fns[name], number[name], clock))
        if budget_s is not None and r + 1 >= min_repeats and time.perf_counter() - started > budget_s:
            break
    return times


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, IQR, min and count of a list of samples."""
    xs = sorted(samples)
    if not xs:
        return {"median": float("nan"), "q1": float("nan"), "q3": float("nan"), "iqr": float("nan"),
                "min": float("nan"), "n": 0}
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1, "min": xs[0], "n": len(xs)}


def paired_ratio(samples: Sequence[float], baseline: Sequence[float]) -> dict[str, float]:
    """Summary of the per-round ratios ``samples[r] / baseline[r]``.

    Both lists come from the same interleaved rounds (:func:`interleave`), so each
    ratio compares two calls made moments apart; its median is more robust to a
    shared machine's slow drifts than the ratio of the two medians.
    """
    return summarize([a / b for a, b in zip(samples, baseline) if b > 0])


def ms(summary: Mapping[str, float]) -> dict[str, float]:
    """A summary in seconds converted to milliseconds (``n`` kept)."""
    return {k: (v if k == "n" else v * 1e3) for k, v in summary.items()}


def fmt_ms(summary: Mapping[str, float], spread: bool = True) -> str:
    """``median ±IQR/2`` in ms."""
    if summary.get("n", 0) == 0:
        return "n/a"
    text = f"{summary['median'] * 1e3:.3g}" if summary["median"] * 1e3 < 100 else f"{summary['median'] * 1e3:.0f}"
    if spread:
        text += f" ±{summary['iqr'] * 1e3 / 2:.2g}"
    return text


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


# -- tables and output ---------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def write_json(path: str | os.PathLike[str] | None, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as standard JSON (nothing when ``path`` is empty): a NaN or infinite number (a
    measurement that did not happen, a solve that diverged) becomes ``null``, which every JSON reader
    accepts, where ``json.dump``'s default would write the non-standard ``NaN`` / ``Infinity``."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_standard_json(payload), indent=2, allow_nan=False)
    Path(path).write_text(text + "\n")


def _standard_json(value: Any) -> Any:
    """``value`` with tensors as lists, paths and other objects as text and non-finite floats as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _standard_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_standard_json(item) for item in value]
    if isinstance(value, torch.Tensor):
        return _standard_json(value.tolist())
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def command_line() -> str:
    """How this script was invoked (relative to the working directory), for the results file."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def add_common_arguments(parser: Any) -> None:
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute or less)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)


# -- memory ----------------------------------------------------------------------------
def _status_bytes(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, RssAnon) in bytes, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return None


def rss_bytes() -> int:
    """The current resident set size of this process."""
    value = _status_bytes("VmRSS")
    return max_rss_bytes() if value is None else value


def max_rss_bytes() -> int:
    """The largest resident set size since the last :func:`reset_peak_rss` (else since start).

    ``VmHWM`` from /proc/self/status where available, else ``ru_maxrss``.
    """
    value = _status_bytes("VmHWM")
    if value is not None:
        return value
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # pragma: no cover
    return value if sys.platform == "darwin" else value * 1024  # pragma: no cover


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def peak_rss_increase(fn: Callable[[], Any]) -> tuple[Any, int, str]:
    """``(fn(), peak RSS during the call − RSS before it, method)``.

    Freed heap memory is returned to the OS first (``malloc_trim``) and the
    kernel's peak-RSS mark is reset, so the number is the call's own peak
    (``method="VmHWM reset"``). Where the mark cannot be reset it falls back to
    the process-lifetime peak (``method="ru_maxrss"``), which is only meaningful
    on the first large call of a fresh process.
    """
    release_free_memory()
    before = rss_bytes()
    method = "VmHWM reset" if reset_peak_rss() else "ru_maxrss"
    result = fn()
    return result, max(max_rss_bytes() - before, 0), method


def _allocation_events(prof: Any) -> list[tuple[int, int]]:
    """``(time_ns, bytes)`` for every CPU allocation (+) and free (−) the profiler saw."""
    results = prof.profiler.kineto_results
    out: list[tuple[int, int]] = []
    stack = list(results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            out.append((node.start_time_ns, int(fields.alloc_size)))
    out.sort(key=lambda e: e[0])
    return out


def peak_tensor_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), peak)``: the peak of CPU tensor memory allocated during the call above its start.

    Uses ``torch.profiler.profile(profile_memory=True)``: the allocation and free
    events in time order are summed cumulatively; the peak is the maximum of
    that sum (0 if nothing was allocated).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        result = fn()
    events = _allocation_events(prof)
    peak = max(itertools.accumulate(size for _, size in events), default=0)
    return result, max(peak, 0)


def run_worker(script: str | os.PathLike[str], config: Mapping[str, Any], timeout: float | None = None,
               threads: int = 1, cwd: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run ``script --worker JSON`` in a fresh Python process (in ``cwd``); its last stdout line is JSON.

    Returns the parsed result, or ``{"error": ...}`` when the process failed or timed out.
    """
    return run_worker_command([sys.executable, str(script)], config, timeout, threads, cwd)


def run_worker_command(program: Sequence[str], config: Mapping[str, Any], timeout: float | None = None,
                       threads: int = 1, cwd: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """:func:`run_worker` for any command line (e.g. ``[python, "-m", module]``)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    command = [*program, "--worker", json.dumps(dict(config))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=None if cwd is None else str(cwd))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit code {done.returncode}: " + " / ".join(tail)}
    return json.loads(lines[-1])


def worker_reply(payload: Mapping[str, Any]) -> None:
    """Print a worker's result as the last stdout line (for the parent's ``json.loads``, which reads
    the ``NaN`` a missing measurement is written as back into a float)."""
    sys.stdout.write(json.dumps(dict(payload), default=lambda value: value.tolist()
                                if isinstance(value, torch.Tensor) else str(value)) + "\n")
    sys.stdout.flush()


def zero_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None
