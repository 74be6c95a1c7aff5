"""``diffopt bench`` / ``benchmarks/modes.py`` at tiny sizes: structure and output formats, never timings.

Also validates the memory measurement on known allocations (the repository's helpers and the
built-in copy used by installs without ``benchmarks/``), and that the in-process profiler peak
equals the one measured in a fresh process.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from diffopt import bench
from diffopt.errors import LinearSolveWarning
from diffopt.cli import bench as bench_cli

MiB = 2**20
TINY_SETTINGS = dict(steps=(1, 2), repeats=1, warmup=1, block_budget_s=0.5, max_call_s=5.0, discrepancy_tasks=2,
                     train_time_s=0.15, train_iterations=2, train_cap_factor=2.0, snapshots=2, es_samples=1,
                     solver_iterations=3)


def tiny_problems() -> list[bench.Problem]:
    return [
        bench.build_problem(bench.problem_spec("sinusoid", hidden=6, meta_batch=2, shots=4, query=4, test_tasks=4,
                                               test_query=5)),
        bench.build_problem(bench.problem_spec("conv4", filters=2, meta_batch=2, shots=1, query=1, test_tasks=2,
                                               classes=14, examples=2)),
    ]


@pytest.fixture(scope="module")
def tiny_results():
    settings = bench.Settings(**TINY_SETTINGS, steps_by_problem={"conv4": (1,)},
                              train_steps={"sinusoid": (1,), "conv4": (1,)})
    return bench.run(tiny_problems(), settings, progress=False)


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


# -- memory measurement on known allocations ---------------------------------------------------------
def test_tensor_peak_reads_a_known_allocation():
    common = bench.common
    numel = 16 * 2**20  # 64 MiB of float32

    def overlapping():
        a = torch.ones(numel)
        b = torch.ones(numel // 2)
        del a
        c = torch.ones(numel // 4)
        return b.sum() + c.sum()

    _, peak = common.peak_tensor_bytes(lambda: torch.ones(numel).sum())
    assert abs(peak - 64 * MiB) <= 0.03 * 64 * MiB, peak / MiB
    _, peak = common.peak_tensor_bytes(overlapping)  # 64 + 32 alive together, then 32 + 16
    assert abs(peak - 96 * MiB) <= 0.03 * 96 * MiB, peak / MiB


def test_tensor_peak_counts_a_known_autograd_graph():
    """A meta-step-like call: a graph that saves one 16 MiB activation, then its backward."""
    w = torch.ones(4 * 2**20, requires_grad=True)  # 16 MiB

    def step():
        (torch.sin(w) * 2).sum().backward()

    _, peak = bench.common.peak_tensor_bytes(step)
    # forward: sin(w) and 2·sin(w) are alive together (32 MiB); backward: the incoming gradient, cos(w) and
    # their product (16 MiB each, the last kept as w.grad): the peak is 32 to 64 MiB, never below 32.
    assert 32 * MiB * 0.97 <= peak <= 64 * MiB * 1.03, peak / MiB
    w.grad = None


def test_rss_peak_reads_a_known_allocation():
    common = bench.common
    numel = 16 * 2**20
    torch.ones(numel).sum()  # warm-up
    _, increase, method = common.peak_rss_increase(lambda: torch.ones(numel).sum())
    if method != "VmHWM reset":
        # The only skip left in CI-capable environments: Linux lets a process reset its own RSS peak
        # (writable here and on CI runners); macOS, Windows and locked-down kernels cannot, so the
        # RSS peak has nothing to be checked against there.
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert 0.97 * 64 * MiB <= increase <= 1.10 * 64 * MiB, increase / MiB


def test_in_process_peak_equals_fresh_process_peak(tmp_path, monkeypatch):
    """The profiler peak measured after a warm-up in the timing process is what a fresh process sees
    (here for a user's model, which the fresh process imports from the folders the CLI records)."""
    write_module(tmp_path, monkeypatch, """
        from torch import nn

        def mlp():
            return nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))
    """)
    roots = bench_cli._import_roots("bench_user_models:mlp")
    assert str(tmp_path.resolve()) in roots
    spec = bench.problem_spec("custom", factory="bench_user_models:mlp", task="sinusoid", meta_batch=3,
                              test_tasks=4, sys_path=roots)
    settings = bench.Settings(**{**TINY_SETTINGS, "steps": (3,), "baselines": ("plain loop",),
                                 "modes": ("second_order",), "discrepancy": False, "accuracy": False})
    block = bench.measure(bench.build_problem(spec), 3, settings)
    fresh = bench.subprocess_worker({"spec": spec, "steps": 3, "implementation": "second_order",
                                     "settings": settings.to_dict()}, timeout=120)
    assert "error" not in fresh, fresh
    here = block["second_order"]["memory"]["tensor_peak_bytes"]
    assert here > 0 and abs(fresh["tensor_peak_bytes"] - here) <= 0.05 * here, (here, fresh)
    assert fresh["rss_peak_bytes"] >= 0 and fresh["rss_method"] in ("VmHWM reset", "ru_maxrss")


def test_markdown_reports_the_resident_memory_of_subprocess_runs(tiny_results):
    results = copy.deepcopy(tiny_results)
    cell = results["problems"]["sinusoid"]["timing"]["1"]["second_order"]
    assert "Peak resident-memory" not in bench.markdown(results)  # the profiler measures tensors only
    cell["memory"] = {**cell["memory"], "rss_peak_bytes": 3 * MiB, "rss_method": "VmHWM reset"}
    text = bench.markdown(results)
    assert "Peak resident-memory (RSS) increase" in text
    rows = [line for line in text.split("Peak resident-memory")[1].splitlines() if line.startswith("| second_order")]
    assert rows[0].split("|")[2].strip() == "3"


# -- the run's structure -------------------------------------------------------------------------------
def test_every_mode_and_baseline_is_measured(tiny_results):
    names = bench.implementations(bench.Settings())
    assert set(bench.MODES) <= set(names)
    for baseline in ("plain loop SO", "plain loop FO", "higher loop SO", "higher loop FO", "torch.func vmap SO",
                     "torch.func vmap FO", "torchopt SO"):
        assert baseline in names
    for problem in ("sinusoid", "conv4"):
        entry = tiny_results["problems"][problem]
        assert set(entry["timing"]) == ({"1", "2"} if problem == "sinusoid" else {"1"})
        for k, block in entry["timing"].items():
            assert set(block) == set(names)
            for name, e in block.items():
                if name.startswith("torchopt"):
                    if bench.baseline_available("torchopt") is None:
                        assert e["time"]["n"] >= 1
                    else:
                        assert "not installed" in e["skipped"]
                    continue
                assert "error" not in e and "skipped" not in e, (problem, k, name, e)
                assert e["time"]["n"] >= 1 and e["time"]["median"] > 0
                assert e["memory"]["tensor_peak_bytes"] > 0
                assert set(e["ratios"]) == {"plain", "higher", "torch.func"}
            assert block["plain loop SO"]["ratios"]["plain"] == pytest.approx(1.0)
            # same meta-gradient, in float32 (the benchmarks' dtype), K <= 2: measured relative errors
            # 3.0e-8 to 4.8e-8 (sinusoid) and 3.4e-8 to 4.4e-7 (conv4); 1e-5 is ~20x the worst and
            # ~80 float32 ulps (the float64 parity of the engine itself is tested at 1e-12 in test_unroll)
            assert block["second_order"]["vs_exact"]["relative_error"] < 1e-5
            assert block["checkpointed"]["vs_exact"]["relative_error"] < 1e-5
            assert block["higher loop SO"]["vs_exact"]["relative_error"] < 1e-5
            assert block["forward"]["vs_exact"]["cosine"] is None            # θ gets no forward-mode gradient
        for k in entry["timing"]:
            d = entry["discrepancy"][k]
            assert -1 <= d["cosine"]["mean"] <= 1 and d["relative_error"]["mean"] >= 0 and d["tasks"] == 2


def test_accuracy_runs_have_time_and_iteration_budgets(tiny_results):
    for problem, metric in (("sinusoid", "loss"), ("conv4", "accuracy")):
        entry = tiny_results["problems"][problem]
        assert entry["metric"] == metric
        block = entry["accuracy"]["1"]
        assert set(block["runs"]) == set(bench.MODES) | {"plain loop"}
        assert metric in block["initial"]
        for name, run in block["runs"].items():
            assert run["iterations"] >= 1 and "failure" not in run, (name, run)
            t = run["at_time_budget"]
            assert t is not None and t["seconds"] >= block["time_budget_s"] / 2
            m = t["metrics"][metric]
            assert m["tasks"] == (4 if problem == "sinusoid" else 2) and m["ci95"] >= 0
            kinds = [p["kind"] for p in run["points"]]
            assert kinds.count("time") == 2
            if run["iterations"] >= 2:
                assert run["at_iteration_budget"]["iteration"] == 2
            assert all("_per_task" not in p for p in run["points"])
            if name != "second_order":
                d = run["vs_second_order"]["at_time_budget"]
                assert d["ci95"] >= 0 and isinstance(d["matches"], bool)
        # with K=1 the truncated window is the whole unroll: the same run as second order, to the bit
        same = block["runs"]["truncated"]["vs_second_order"]["at_iteration_budget"]
        assert same["mean"] == 0 and same["ci95"] == 0 and same["matches"]
        assert "discrepancy_after_second_order_training" in block


def test_json_and_markdown_formats(tiny_results, tmp_path):
    path = tmp_path / "out.json"
    bench.write_json(path, tiny_results)
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "modes" and payload["machine"]["torch"] == torch.__version__
    assert "profile_memory" in payload["memory_method"]
    assert {t["target"].split(" ")[1] for t in payload["targets"]} >= {"second_order", "first_order", "checkpointed"}
    # standard JSON: a number that is NaN or infinite (an unmeasured peak, a diverged solve) is null
    unmeasured = {**tiny_results, "unmeasured": [float("nan"), float("inf"), torch.tensor([1.0, float("nan")])]}
    bench.write_json(path, unmeasured)
    strict = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    assert strict["unmeasured"] == [None, None, [1.0, None]]
    text = bench.markdown(tiny_results)
    assert text.startswith("# diffopt bench") and "## sinusoid" in text and "## conv4" in text and "## Targets" in text
    lines = table_lines(text)
    assert lines
    for i, line in enumerate(lines):  # every table: header, rule, rows with the same number of cells
        if set(line.replace("|", "")) <= {"-"}:
            header = lines[i - 1]
            assert line.count("|") == header.count("|")
    for name in bench.MODES:
        assert any(line.startswith(f"| {name} |") for line in lines), name
    for name in ("plain loop SO", "higher loop FO", "torch.func vmap SO"):
        assert any(line.startswith(f"| {name} |") for line in lines), name
    header = next(line for line in lines if line.startswith("| implementation | K=1 | K=2 |"))
    assert header.count("|") == 4


def test_plots_written_with_matplotlib(tiny_results, tmp_path):
    import matplotlib  # noqa: F401  (in the test extra: a missing matplotlib fails here, it is not skipped)
    files = bench.plot(tiny_results, tmp_path)
    names = sorted(p.split("/")[-1] for p in files)
    assert names == ["modes_accuracy_conv4.png", "modes_accuracy_sinusoid.png", "modes_time_memory_conv4.png",
                     "modes_time_memory_sinusoid.png"]
    for f in files:
        with open(f, "rb") as stream:
            assert stream.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_skipped_cleanly_without_matplotlib(tiny_results, tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.ticker", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.warns(UserWarning, match="matplotlib is not installed"):  # the library warns; it does not print
        assert bench.plot(tiny_results, tmp_path / "plots") == []
    assert not (tmp_path / "plots").exists()
    # the command line says it on stderr
    assert bench_cli.main(["--benchmarks", "sinusoid", "--modes", "second_order", "--baselines", "plain loop",
                           "--no-accuracy", "--no-discrepancy", "--memory", "off", *TINY_CLI,
                           "--plots", str(tmp_path / "plots")]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_library_modules_do_not_import_matplotlib():
    code = "import sys, diffopt.bench, diffopt.cli.bench; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# -- baselines agree with the engine scripts' ---------------------------------------------------------------
def test_baselines_match_engine_sinusoid_meta_gradients():
    from benchmarks import engine_sinusoid  # the repository root is on sys.path (conftest.py)
    model = engine_sinusoid.make_model(8, torch.float64)
    data = engine_sinusoid.make_data(3, 5, 5, torch.float64)
    reference = engine_sinusoid.plain_loop(model, data, 2, 0.01, first_order=False)
    for p in model.parameters():
        p.grad = None
    reference()
    expected = [p.grad.clone() for p in model.parameters()]
    problem = bench.build_problem(bench.problem_spec("sinusoid", hidden=8, test_tasks=2))
    settings = bench.Settings()
    for name in ("plain loop SO", "higher loop SO", "torch.func vmap SO", "second_order", "checkpointed"):
        copy = engine_sinusoid.make_model(8, torch.float64)
        copy.load_state_dict(model.state_dict())
        impl = bench.Implementation(name, problem, copy, 2, settings)
        impl.call(data)()
        for got, want in zip(impl.gradients(), expected):
            assert torch.allclose(got, want, atol=1e-12, rtol=1e-10), name


# -- the command line --------------------------------------------------------------------------------------
TINY_CLI = ["--steps", "1", "--repeats", "1", "--block-budget", "0.2", "--train-time", "0.1", "--train-iterations",
            "1", "--snapshots", "1", "--test-tasks", "3", "--es-samples", "1", "--solver-iterations", "2",
            "--no-progress"]


def write_module(tmp_path, monkeypatch, body: str) -> None:
    (tmp_path / "bench_user_models.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("bench_user_models", None)


def test_cli_with_a_user_model_factory(tmp_path, monkeypatch, capsys):
    write_module(tmp_path, monkeypatch, """
        from torch import nn

        def regressor():
            return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    """)
    out = tmp_path / "out"
    code = bench_cli.main(["--model", "bench_user_models:regressor", "--task", "regression", "--input-shape", "3",
                           "--output-dim", "2", "--meta-batch", "2", "--shots", "3", "--query", "3",
                           "--baselines", "plain loop", "torch.func vmap", *TINY_CLI, "--json", str(out / "r.json"),
                           "--markdown", str(out / "r.md"), "--plots", str(out)])
    assert code == 0
    payload = json.loads((out / "r.json").read_text())
    [(name, entry)] = payload["problems"].items()
    assert name == "custom (bench_user_models:regressor)" and entry["metric"] == "loss"
    block = entry["timing"]["1"]
    assert set(bench.MODES) <= set(block) and {"plain loop SO", "torch.func vmap FO"} <= set(block)
    assert all("time" in e for e in block.values())
    assert set(entry["accuracy"]["1"]["runs"]) == set(bench.MODES) | {"plain loop"}
    assert "| second_order |" in (out / "r.md").read_text() and "| second_order |" in capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "modes_time_memory_custom.png").exists() and (out / "modes_accuracy_custom.png").exists()


def test_cli_user_classifier_and_subparser(tmp_path, monkeypatch):
    import argparse

    write_module(tmp_path, monkeypatch, """
        from torch import nn

        def classifier():
            return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    """)
    parser = argparse.ArgumentParser(prog="diffopt")
    commands = parser.add_subparsers(dest="command")
    bench_cli.add_parser(commands)
    args = parser.parse_args(["bench", "--model", "bench_user_models:classifier", "--task", "classification",
                              "--input-shape", "6", "--ways", "3", "--meta-batch", "2", "--modes", "first_order",
                              "second_order", "--baselines", "plain loop", "--no-accuracy", *TINY_CLI,
                              "--json", str(tmp_path / "c.json")])
    assert args.command == "bench"
    assert bench_cli.run(args) == 0
    entry = json.loads((tmp_path / "c.json").read_text())["problems"]["custom (bench_user_models:classifier)"]
    assert entry["metric"] == "accuracy" and set(entry["timing"]["1"]) == {"first_order", "second_order",
                                                                          "plain loop SO", "plain loop FO"}


@pytest.mark.parametrize("extra, message", [
    (["--model", "no_colon_here"], "module:factory"),
    (["--model", "bench_user_models:missing"], "cannot load"),
    (["--model", "bench_user_models:regressor", "--task", "regression", "--input-shape", "4"], "cannot take"),
    (["--model", "bench_user_models:regressor", "--task", "classification", "--input-shape", "3"], "logits"),
])
def test_cli_explains_bad_models(tmp_path, monkeypatch, capsys, extra, message):
    write_module(tmp_path, monkeypatch, """
        from torch import nn

        def regressor():
            return nn.Linear(3, 1)
    """)
    assert bench_cli.main([*extra, *TINY_CLI]) == 2
    assert message in capsys.readouterr().err


def test_quick_settings_are_smaller():
    parser = __import__("argparse").ArgumentParser()
    bench_cli.add_arguments(parser)
    quick = bench_cli.settings_from_args(parser.parse_args(["--quick"]))
    full = bench_cli.settings_from_args(parser.parse_args([]))
    assert quick.quick and not full.quick
    assert full.steps == bench.STEPS and set(quick.steps) < set(full.steps)
    assert quick.repeats < full.repeats and quick.time_budget("sinusoid") < full.time_budget("sinusoid")
    assert quick.steps_for("conv4") == (1,) and quick.train_steps_for("sinusoid") == (5,)
    assert bench_cli.settings_from_args(parser.parse_args(["--truncate", "3"])).truncate == 3
    assert bench.truncate_window(10, full) == 5 and bench.truncate_window(1, full) == 1
    assert full.min_sample_s == 0.02 and bench_cli.settings_from_args(
        parser.parse_args(["--min-sample-ms", "0"])).min_sample_s == 0.0
    assert "the mean of back-to-back meta-steps lasting ≥ 20 ms" in bench.markdown(
        {"machine": bench.common.machine_info(),
         "settings": full.to_dict(), "memory_method": "off", "problems": {}})


def test_modes_script_entry(tmp_path):
    from benchmarks import modes

    code = modes.main(["--benchmarks", "sinusoid", "--modes", "second_order", "--baselines", "plain loop",
                       "--no-accuracy", "--no-discrepancy", "--memory", "off", *TINY_CLI,
                       "--json", str(tmp_path / "m.json"), "--plots", str(tmp_path)])
    assert code == 0
    payload = json.loads((tmp_path / "m.json").read_text())
    assert set(payload["problems"]["sinusoid"]["timing"]["1"]) == {"second_order", "plain loop SO", "plain loop FO"}


@pytest.mark.parametrize("extra, message", [
    (["--json", "{tmp}"], "the --json file path {tmp} is a folder; give a file path such as {tmp}/bench.json"),
    (["--markdown", "{tmp}/a_file/x.md"], "is a file, not a folder"),
    (["--plots", "{tmp}/a_file"], "is a file; give a folder for the PNG files"),
    (["--task", "regression", "--ways", "3"], "--task, --ways describe the data of --model MODULE:FACTORY"),
    (["--modes"], "--modes needs one or more of"),
    (["--model", "m:f", "--input-shape", "1,x"], "--input-shape '1,x': give positive integers"),
])
def test_cli_refuses_what_it_would_ignore_or_could_not_write_before_measuring(tmp_path, capsys, monkeypatch,
                                                                           extra, message):
    """Output paths used to be written after the whole run (a traceback after up to ~18 minutes), and
    --model's data options without --model silently ran the default benchmark."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(bench_cli.bench, "run", lambda *a, **k: pytest.fail("measured before refusing"))
    assert bench_cli.main([a.format(tmp=tmp_path) for a in extra]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_the_report_names_linear_solves_that_did_not_converge():
    """The implicit rows' solve used to be visible only as a stderr warning: the measured residual is
    recorded per cell and the report lists the cells whose solve stopped above its tolerance."""
    from diffopt.bench.reporting import problem_markdown

    solve = {"solver": "cg", "iterations": 20, "relative_residual": 1.58, "converged": False}
    far, near = ({"relative_gradient_norm": r, "task": 0, "gradient_norm": r, "initial_gradient_norm": 1.0}
                 for r in (0.98, 0.1))
    entry = {"description": "toy", "timing": {"1": {"implicit": {"time": None, "solve": solve, "stationarity": far},
                                                    "second_order": {"time": None}},
                                              "5": {"implicit": {"time": None, "solve": {**solve, "converged": True},
                                                                 "stationarity": near}}}}
    results = {"implementations": ["second_order", "implicit"], "settings": {"memory": "off"}}
    text = problem_markdown("toy", entry, results)
    assert "- implicit, K=1: cg stopped after 20 iterations at relative residual 1.58" in text
    assert "K=5: cg" not in text
    # the inner problem's stationarity too: the implicit gradient assumes a solved inner problem
    assert "- implicit, K=1: the worst task's inner gradient norm is 0.98 times its value at the start" in text
    assert "K=5: the worst" not in text


def test_the_implicit_rows_default_solver_suits_the_indefinite_hessian_after_few_steps():
    """After K = 1 inner step the sinusoid MLP's inner Hessian has eigenvalues down to about -12, so
    H + λI (λ = 1) is indefinite: CG, the bench's old default, met negative curvature and ended at
    relative residual 1.6 (a meta-gradient of noise); MINRES, the default now, only lowers its residual."""
    from diffopt.bench.implementations import make_learner
    from diffopt.bench.measuring import fixed_batch

    problem = bench.build_problem(bench.problem_spec("sinusoid", test_tasks=1))
    batch = fixed_batch(problem, 0)
    assert bench.Settings().solver == "minres"
    solves = {}
    for solver in ("minres", "cg"):
        learner = make_learner(problem, problem.make_model(), 1, "implicit", bench.Settings(solver=solver))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LinearSolveWarning)
            learner.meta_loss(*batch).backward()
        solves[solver] = learner.loop.last_info["solve"]
    assert solves["cg"].negative_curvature and solves["cg"].relative_residual > 1
    assert solves["minres"].solver == "minres" and solves["minres"].iterations == 20
    assert solves["minres"].relative_residual < 0.5
