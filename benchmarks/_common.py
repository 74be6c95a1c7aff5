"""What the benchmark scripts share: the measurement helpers of :mod:`diffopt._measure`
(interleaved timing, robust summaries, the machine description, peak memory, markdown
tables, JSON; their methods are described there), and fresh-process workers that run
from the repository root.
"""
from __future__ import annotations

import gc
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffopt import _measure
from diffopt._measure import (
    MEMORY_METHOD, MiB, add_common_arguments, command_line, cpu_model, describe_machine, fmt_ms, fmt_ratio,
    interleave, load_average, machine_info, markdown_table, max_rss_bytes, ms, paired_ratio, peak_rss_increase,
    peak_tensor_bytes, ratio, release_free_memory, reset_peak_rss, rss_bytes, set_threads, summarize, time_call,
    worker_reply, write_json, zero_grads,
)

__all__ = [  # the scripts also use _common.gc, _common.random and _common.time
    "MEMORY_METHOD", "MiB", "REPO", "add_common_arguments", "command_line", "cpu_model", "describe_machine", "fmt_ms",
    "fmt_ratio", "gc", "interleave", "load_average", "machine_info", "markdown_table", "max_rss_bytes", "ms",
    "paired_ratio", "peak_rss_increase", "peak_tensor_bytes", "random", "ratio", "release_free_memory",
    "reset_peak_rss", "rss_bytes", "run_worker", "set_threads", "summarize", "time", "time_call", "worker_reply",
    "write_json", "zero_grads", "interleave_cpu", "CLOCKS", "report",
]

#: ``--clock`` of the engine scripts: wall time, or the calling thread's CPU time
CLOCKS = ("wall", "cpu")


def interleave_cpu(fns: Mapping[str, Any], warmup: int = 2, **kwargs: Any) -> dict[str, list[float]]:
    """:func:`interleave`, each sample the calling thread's CPU time (``time.thread_time``) instead of
    wall time. With one torch thread every forward and backward runs in the calling thread, so this
    is the work done, without the time spent waiting for a core on a loaded machine."""
    return interleave(fns, warmup=warmup, clock=time.thread_time, **kwargs)


REPO = Path(__file__).resolve().parent.parent


def report(args: Any, benchmark: str, title: str, info: Mapping[str, Any], results: Any, text: str, *,
           note: str | None = None, exclude: Sequence[str] = ("json",), **extra: Any) -> None:
    """Print ``text`` under ``# title``, the machine (and ``# note``), and write the run's record to
    ``args.json`` (when given): the benchmark's name, the machine, the command line, the arguments
    (less ``exclude``), ``extra`` entries, the results and the table."""
    print(f"# {title}")
    print(f"# {describe_machine(info)}")
    if note is not None:
        print(f"# {note}")
    print(text)
    write_json(args.json, {"benchmark": benchmark, "machine": info, "command": command_line(),
                           "config": {k: v for k, v in vars(args).items() if k not in exclude}, **extra,
                           "results": results, "table": text})


def run_worker(script: str | os.PathLike[str], config: Mapping[str, Any], timeout: float | None = None,
               threads: int = 1) -> dict[str, Any]:
    """:func:`diffopt._measure.run_worker` from the repository root."""
    return _measure.run_worker(script, config, timeout=timeout, threads=threads, cwd=REPO)
