"""The benchmark scripts' code paths at tiny sizes: structure and output format, never timings.

Also validates the memory measurement used by the benchmarks on known allocations.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import (
    _common, conv_tasks, engine_conv4, engine_memory, engine_sinusoid, maml_iteration, optimizer_step, reweighting,
)

MiB = 2**20


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts call torch.set_num_threads(1); give the rest of the suite its thread count back."""
    saved = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def assert_markdown_table(text: str, columns: int | None = None) -> None:
    lines = table_lines(text)
    assert len(lines) >= 3, text
    header, rule = lines[0], lines[1]
    assert set(rule.replace("|", "")) <= {"-"}, rule
    n = header.count("|")
    assert all(line.count("|") == n for line in lines[:2]), text
    if columns is not None:
        assert n - 1 == columns


# -- memory measurement ------------------------------------------------------------------------
def test_tensor_peak_reads_a_known_allocation():
    numel = 16 * 2**20  # float32 elements in 64 MiB
    _, peak = _common.peak_tensor_bytes(lambda: torch.ones(numel).sum())
    assert abs(peak - 64 * MiB) <= 0.03 * 64 * MiB, peak / MiB


def test_tensor_peak_sees_a_free_between_allocations():
    numel = 16 * 2**20

    def twice():
        a = torch.ones(numel)
        del a
        b = torch.ones(numel)
        return b.sum()

    def overlapping():
        a = torch.ones(numel)
        b = torch.ones(numel)
        return a.sum() + b.sum()

    _, peak_sequential = _common.peak_tensor_bytes(twice)
    _, peak_overlapping = _common.peak_tensor_bytes(overlapping)
    assert abs(peak_sequential - 64 * MiB) <= 0.03 * 64 * MiB
    assert abs(peak_overlapping - 128 * MiB) <= 0.03 * 128 * MiB


def test_tensor_peak_counts_autograd_backward():
    w = torch.ones(2**20, requires_grad=True)  # 4 MiB

    def step():
        (w * 2).sum().backward()  # the gradient (4 MiB) is allocated in backward

    _, peak = _common.peak_tensor_bytes(step)
    assert peak >= 4 * MiB
    w.grad = None


def test_rss_peak_reads_a_known_allocation():
    if not _common.reset_peak_rss():
        # The only skip left in CI-capable environments: Linux lets a process reset its own RSS peak
        # (writable here and on CI runners); macOS, Windows and locked-down kernels cannot, so the
        # RSS peak has nothing to be checked against there.
        pytest.skip("/proc/self/clear_refs is not writable here: the RSS peak cannot be reset")
    numel = 16 * 2**20
    torch.ones(numel).sum()  # warm-up: code pages and allocator paths

    _, increase, method = _common.peak_rss_increase(lambda: torch.ones(numel).sum())
    assert method == "VmHWM reset"
    assert 0.97 * 64 * MiB <= increase <= 1.10 * 64 * MiB, increase / MiB


# -- helpers -------------------------------------------------------------------------------------
def test_summarize_and_ratio():
    s = _common.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s["median"] == 3.0 and s["min"] == 1.0 and s["n"] == 5
    assert s["q1"] == 2.0 and s["q3"] == 4.0 and s["iqr"] == 2.0
    assert _common.summarize([])["n"] == 0
    assert _common.ratio(1.0, 2.0) == 0.5
    assert _common.ratio(1.0, None) is None and _common.fmt_ratio(None) == "n/a"
    assert _common.fmt_ratio(0.5) == "0.50x"


def test_interleave_runs_every_function_equally():
    calls: dict[str, int] = {"a": 0, "b": 0}

    def make(name):
        def f():
            calls[name] += 1
        return f

    times = _common.interleave({"a": make("a"), "b": make("b")}, repeats=4, warmup=1, collect=False)
    assert calls == {"a": 5, "b": 5}
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4}
    assert all(t >= 0 for v in times.values() for t in v)



def test_interleave_sizes_samples_like_timeit():
    """With ``min_sample_s`` each sample is the mean of enough back-to-back calls to last that
    long (sized once after the warm-up), read from the given clock."""
    now = [0.0]
    calls = {"fast": 0, "slow": 0}

    def make(name, seconds):
        def f():
            calls[name] += 1
            now[0] += seconds
        return f

    times = _common.interleave({"fast": make("fast", 0.01), "slow": make("slow", 0.25)}, repeats=3, warmup=1,
                               collect=False, clock=lambda: now[0], min_sample_s=0.05)
    # warm-up 1, sizing 1, then 3 samples of 5 (fast) and of 1 (slow) calls
    assert calls == {"fast": 1 + 1 + 3 * 5, "slow": 1 + 1 + 3}
    assert all(abs(t - 0.01) < 1e-12 for t in times["fast"]) and all(abs(t - 0.25) < 1e-12 for t in times["slow"])
    assert _common.time_call(make("fast", 0.01), number=4, clock=lambda: now[0]) == pytest.approx(0.01)

def test_machine_info_and_markdown():
    info = _common.machine_info()
    for key in ("cpu", "cores", "torch", "threads", "python", "date", "load_average"):
        assert key in info
    assert info["torch"] == torch.__version__
    assert "torch" in _common.describe_machine(info)
    text = _common.markdown_table(["a", "b"], [[1, 2], [3, 4]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |"]


def test_report_prints_the_table_and_writes_the_record(tmp_path, capsys):
    """The scripts' common ending: title, machine, note and table on stdout; the JSON record with the
    arguments less the excluded ones, extra entries before the results."""
    import argparse

    info = _common.machine_info()
    args = argparse.Namespace(json=str(tmp_path / "out.json"), worker=None, tasks=3)
    _common.report(args, "demo", "Demo (3 tasks)", info, {"x": 1.0}, "| a |\n|---|\n| 1 |", note="a note",
                   exclude=("json", "worker"), memory_method="tensors")
    out = capsys.readouterr().out.splitlines()
    assert out == ["# Demo (3 tasks)", f"# {_common.describe_machine(info)}", "# a note", "| a |", "|---|", "| 1 |"]
    payload = json.loads((tmp_path / "out.json").read_text())
    assert list(payload) == ["benchmark", "machine", "command", "config", "memory_method", "results", "table"]
    assert payload["benchmark"] == "demo" and payload["config"] == {"tasks": 3} and payload["results"] == {"x": 1.0}
    assert payload["memory_method"] == "tensors" and payload["table"] == "| a |\n|---|\n| 1 |"
    _common.report(argparse.Namespace(json=None), "demo", "Demo", info, {}, "text")  # no --json: print only
    assert capsys.readouterr().out.splitlines()[-1] == "text"


def test_run_worker_reports_errors(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nraise SystemExit('boom')\n")
    reply = _common.run_worker(script, {}, timeout=60)
    assert "error" in reply and "boom" in reply["error"]


# -- the scripts at tiny sizes ----------------------------------------------------------------------
def test_optimizer_step_tiny(tmp_path, capsys):
    path = tmp_path / "out.json"
    results = optimizer_step.main([
        "--layers", "2", "--width", "4", "--batch", "2", "--steps", "2", "--repeats", "1", "--warmup", "0",
        "--optimizers", "SGD", "NAdam", "--json", str(path),
    ])
    out = capsys.readouterr().out
    assert_markdown_table(out, columns=10)
    assert set(results) == {"SGD", "NAdam"}
    assert {"diffopt/step", "diffopt/unroll", "higher/step", "higher/unroll", "torch.optim/step"} <= set(results["SGD"])
    assert "higher/step" not in results["NAdam"]          # higher has no NAdam
    nadam_row = next(line for line in table_lines(out) if line.startswith("| NAdam"))
    assert "n/a" in nadam_row
    for name in ("SGD", "NAdam"):
        assert results[name]["parity_vs_torch"] == 0.0  # float64 trajectories are torch.optim's, bit for bit
    # SGD with momentum on 4 tensors: buf * m and + g as two _foreach ops for the whole group, then
    # p - lr * buf tensor by tensor (on CPU under autograd add_scaled_all adds per tensor: the same
    # kernel, a cheaper backward); higher issues all its ops tensor by tensor.
    assert results["SGD"]["ops_per_update"]["diffopt"] == 2 + 4 and results["SGD"]["ops_per_update"]["higher"] >= 12
    assert "higher" not in results["NAdam"]["ops_per_update"]
    payload = json.loads(path.read_text())
    assert payload["machine"]["threads"] == 1  # recorded after set_num_threads
    assert payload["benchmark"] == "optimizer_step" and "machine" in payload and "command" in payload
    assert payload["results"]["SGD"]["diffopt/step"]["n"] == 1


def test_every_optimizer_has_a_diffopt_twin():
    import diffopt

    for name, (cls_name, _) in optimizer_step.OPTIMIZERS.items():
        assert hasattr(diffopt.optim, cls_name) and hasattr(torch.optim, cls_name)
    assert optimizer_step.diff_optimizer_available("Adam")
    assert not optimizer_step.diff_optimizer_available("RAdam")


def test_reweighting_tiny(tmp_path, capsys):
    pytest.importorskip("sklearn")
    path = tmp_path / "out.json"
    results = reweighting.main(["--seeds", "2", "--epochs", "1", "--hidden", "4", "--noise", "0.4", "--momentum", "0",
                                "--json", str(path)])
    out = capsys.readouterr().out
    assert_markdown_table(out, columns=6)
    summary = results["0.4 0"]
    assert set(summary) == set(reweighting.METHODS)
    for method, entry in summary.items():
        mean, half = entry["accuracy"]
        assert 0 <= mean <= 1 and math.isfinite(half) and len(entry["runs"]) == 2
        assert entry["diverged"] == 0
        assert ("weight_wrong" in entry) == (method in ("L2RW", "L2RW (SGD look-ahead)", "MWN"))
    assert summary["plain (noisy)"]["time_ratio"] == 1.0
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "reweighting" and payload["config"]["seeds"] == 2 and "machine" in payload


def test_reweighting_confidence_interval_uses_the_t_distribution():
    """Three values with standard deviation 1: half-width t_{0.975, 2}/sqrt(3), where the t quantile with 2
    degrees of freedom has the closed form (2p - 1)/sqrt(2p(1 - p))."""
    mean, half = reweighting.mean_ci([1.0, 2.0, 3.0])
    p = 0.975
    assert mean == 2.0 and abs(half - (2 * p - 1) / math.sqrt(2 * p * (1 - p)) / math.sqrt(3)) < 1e-12


def test_engine_sinusoid_tiny(tmp_path, capsys):
    path = tmp_path / "out.json"
    results = engine_sinusoid.main([
        "--steps", "2", "--tasks", "2", "--shots", "3", "--queries", "3", "--hidden", "5",
        "--repeats", "1", "--warmup", "0", "--min-sample-ms", "2", "--json", str(path),
    ])
    out = capsys.readouterr().out
    assert_markdown_table(out, columns=3)
    names = results["implementations"]
    assert names[0] == "plain loop" and set(engine_sinusoid.IMPLEMENTATIONS) == set(names)
    for key in ("second_order/K=2", "first_order/K=2"):
        for name in names:
            assert results["timing"][key][name]["n"] == 1
            # every implementation computes the same meta-gradient (float64)
            assert results["agreement"][key][name] < 1e-10, (key, name)
    payload = json.loads(path.read_text())
    assert payload["machine"]["threads"] == 1  # recorded after set_num_threads
    assert payload["benchmark"] == "engine_sinusoid" and payload["config"]["tasks"] == 2


def test_engine_conv4_tiny(tmp_path, capsys):
    path = tmp_path / "out.json"
    results = engine_conv4.main([
        "--steps", "1", "--tasks", "2", "--ways", "2", "--queries", "1", "--filters", "3", "--size", "16",
        "--repeats", "1", "--warmup", "0", "--in-process", "--json", str(path),
    ])
    out = capsys.readouterr().out
    assert_markdown_table(out, columns=9)
    for name in engine_conv4.IMPLEMENTATIONS:
        assert results["timing"]["K=1"][name]["n"] == 1
        memory = results["memory"]["K=1"][name]
        assert memory["tensor_peak_bytes"] > 0 and "rss_peak_bytes" in memory
        assert results["agreement"][name] < 1e-10, name
    payload = json.loads(path.read_text())
    assert payload["machine"]["threads"] == 1  # recorded after set_num_threads
    assert payload["benchmark"] == "engine_conv4" and "memory_method" in payload


def test_engine_memory_tiny(tmp_path, capsys):
    path = tmp_path / "out.json"
    results = engine_memory.main([
        "--steps", "2", "4", "--tasks", "2", "--shots", "3", "--queries", "3", "--hidden", "4",
        "--es-samples", "1", "--pes-truncation", "2", "--solver-iterations", "3", "--repeats", "1",
        "--in-process", "--json", str(path),
    ])
    out = capsys.readouterr().out
    assert_markdown_table(out, columns=9)
    for key in ("K=2", "K=4"):
        for mode in engine_memory.MODES:
            entry = results["memory"][key][mode]
            assert entry["meta_gradient"], (key, mode, entry)
            assert entry["tensor_peak_bytes"] > 0
            assert results["timing"][key][mode]["n"] == 1
    assert "Targets" in out
    payload = json.loads(path.read_text())
    assert payload["machine"]["threads"] == 1  # recorded after set_num_threads
    assert payload["benchmark"] == "engine_memory" and "memory_method" in payload


def test_memory_worker_runs_in_a_fresh_process():
    config = {"hidden": 4, "tasks": 2, "shots": 3, "queries": 3, "lr": 0.01, "seed": 0, "threads": 1,
              "proximal": 1.0, "solver_iterations": 3, "es_samples": 1, "es_sigma": 1e-3, "pes_truncation": 2,
              "mode": "checkpointed", "steps_k": 4, "skip_profile": False}
    reply = _common.run_worker(engine_memory.__file__, config, timeout=300)
    assert "error" not in reply, reply
    assert reply["meta_gradient"] and reply["tensor_peak_bytes"] > 0
    assert math.isfinite(reply["seconds"])


def test_engine_dispatch_counts_are_deterministic(capsys):
    from benchmarks import engine_dispatch

    first = engine_dispatch.main(["--quick"])
    second = engine_dispatch.main(["--quick"])
    assert [r["aten_ops"] for r in first] == [r["aten_ops"] for r in second]
    # a first-order step builds no second-order graph: fewer operations than second order at equal K
    by_case = {(r["mode"], r["steps"]): r["aten_ops"] for r in first}
    assert by_case[("first_order", 5)] < by_case[("second_order", 5)]
    assert by_case[("second_order", 1)] < by_case[("second_order", 5)]
    assert_markdown_table(capsys.readouterr().out, columns=4)


@pytest.mark.filterwarnings("ignore:We've integrated functorch:FutureWarning")  # torchopt 0.7
def test_implicit_regularization_script_at_tiny_size(capsys):
    """Structure and agreement, not timings: diffopt's and torchopt's hypergradients agree, every method
    reports losses, and the report prints a table."""
    pytest.importorskip("sklearn")
    pytest.importorskip("torchopt")
    from benchmarks import implicit_regularization
    result = implicit_regularization.main(["--repeats", "1", "--steps", "2", "--grid", "8"])
    assert result["hypergradient_max_relative_difference"] <= 1e-8
    assert set(result["summary"]) == {"diffopt", "torchopt", "diffopt_shared", "grid", "random"}
    assert all(math.isfinite(row["val"]) and math.isfinite(row["test"]) for row in result["summary"].values())
    assert_markdown_table(capsys.readouterr().out, columns=6)


def test_hyper_tuning_tiny():
    """benchmarks/hyper_tuning.py at 20 steps and one seed: both problems, every method's row (PES included),
    the goals."""
    pytest.importorskip("sklearn")
    from benchmarks import hyper_tuning

    lines: list[str] = []
    report = hyper_tuning.run(seeds=1, steps=20, grid_size=8, every=5, window=2, meta_lr=0.3, pes_samples=1,
                              log=lines.append)
    for name in ("digits", "regression"):
        assert_markdown_table(report[name]["table"], columns=7)
        # header and separator, (a), (b), and from 10x high and low: 2 HD rates, the tuner, without backtracking, PES
        assert len(table_lines(report[name]["table"])) == 2 + 2 + 2 * 5
        for goal in report[name]["goals"].values():
            assert goal["time_ratio"] > 0 and math.isfinite(goal["test_ratio"])
    assert any("goal" in line for line in lines)


def test_hyper_tuning_tiny_under_a_warmup():
    """--warmup/--delay/--backtrack 0: the grid under the same warm-up (b+) beside the plain grid (b), the
    tuner under the warm-up (d) and without it (d-), no (d0) row; goals for (d) and (d-), against both grids."""
    pytest.importorskip("sklearn")
    from benchmarks import hyper_tuning

    report = hyper_tuning.run(seeds=1, steps=20, grid_size=8, every=5, window=2, meta_lr=0.3,
                              warmup=(10, 0.0, "linear"), delay=5, backtrack=0, log=lambda line: None)
    for name in ("digits", "regression"):
        assert_markdown_table(report[name]["table"], columns=7)
        # header and separator, (a), (b), (b+), and from 10x high and low: 2 HD rates, (d), (d-)
        assert len(table_lines(report[name]["table"])) == 2 + 3 + 2 * 4
        goals = report[name]["goals"]
        assert len(goals) == 4 and all(math.isfinite(g["test_ratio_warm_grid"]) for g in goals.values())
    assert hyper_tuning.warmup_factor(10, 0.0)(0) == 0.0 and hyper_tuning.warmup_factor(10, 0.0)(5) == 0.5
    assert hyper_tuning.warmup_factor(10, 0.1)(20) == 1.0


def test_cpu_clock_times_the_task_loop_rows(capsys):
    """--clock cpu (this thread's CPU time, for a loaded machine): one sample per timed round, none from
    the warm-up; the per-task-backward loop is the reference of every ratio (issue 16)."""
    results = engine_sinusoid.main([
        "--steps", "1", "--orders", "first_order", "--tasks", "2", "--shots", "3", "--queries", "3", "--hidden", "5",
        "--repeats", "2", "--warmup", "1", "--clock", "cpu", "--implementations", "diffopt.innerloop",
        "learn2learn stand-in",
    ])
    assert "CPU time" in capsys.readouterr().out
    timed = results["timing"]["first_order/K=1"]
    assert set(timed) == {"plain loop", "plain loop, backward per task", "diffopt.innerloop", "learn2learn stand-in"}
    for entry in timed.values():
        assert entry["n"] == 2 and entry["median"] > 0
    assert timed["plain loop, backward per task"]["ratio"]["median"] == 1.0


def test_conv_tasks_tiny(tmp_path, capsys):
    """Grouped convolutions across tasks, the task loop and vmap: same meta-gradient (float64), every row
    timed and measured, the crossover reported (issue 16 item 4)."""
    path = tmp_path / "out.json"
    results = conv_tasks.main(["--tasks", "2", "3", "--steps", "1", "--orders", "second_order", "--ways", "2",
                               "--queries", "1", "--filters", "3", "--size", "16", "--repeats", "1",
                               "--clock", "cpu", "--json", str(path)])
    out = capsys.readouterr().out
    assert_markdown_table(out, columns=6)
    assert all(value < 1e-10 for value in results["agreement"].values()), results["agreement"]
    for tasks in (2, 3):
        cell = results["timing"][f"second_order/K=1/T={tasks}"]
        assert set(cell) == set(conv_tasks.IMPLEMENTATIONS) and cell["task loop"]["ratio"]["median"] == 1.0
        assert all(v > 0 for v in results["memory"][f"second_order/K=1/T={tasks}"].values())
    assert "second_order/K=1" in results["crossover"] and "Smallest meta-batch" in out
    assert json.loads(path.read_text())["benchmark"] == "conv_tasks"


def test_maml_iteration_tiny(tmp_path, capsys):
    """The library's Trainer and the hand-written loop both run chunks of MAML iterations; ratios and the
    70,000-iteration projection are reported (issue 16 item 6)."""
    path = tmp_path / "out.json"
    results = maml_iteration.main(["--chunk", "3", "--rounds", "2", "--json", str(path)])
    assert_markdown_table(capsys.readouterr().out, columns=4)
    assert results["hand-written"]["ratio"] == 1.0
    for entry in results.values():
        assert entry["ms_per_iteration"] > 0 and len(entry["samples_ms"]) == 2
        assert entry["projected_70k_s"] == pytest.approx(entry["ms_per_iteration"] * 70)
    assert json.loads(path.read_text())["benchmark"] == "maml_iteration"
