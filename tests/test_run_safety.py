"""Nothing lost, nothing silently wrong, one clear line for every error (issue #17, items 2–7, 11–13).

* a failing final evaluation never loses the run: the checkpoint is written first, and evaluation
  settings no run can use are refused before training starts;
* ``diffopt train`` refuses to replace an earlier run without ``--resume`` or ``--overwrite``;
* a checkpoint path that cannot be written is refused at start; a full disk is one line;
* temporary files left by a saving process killed with ``kill -9`` are cleaned by the next save;
* a resumed run writes the same metrics file as an uninterrupted one (running mean, time);
* ``--outer-lr`` is Reptile's step size ε (it used to be ignored) and the configuration records it;
* corrupt, truncated, foreign and malicious checkpoints: one line each, never torch's
  ``weights_only=False`` advice; non-finite weights and negative iterations refused;
* divergence: one line naming the meta-iteration, the task, the step and the likely cause;
* every numeric flag is checked while parsing, naming the flag.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffopt.algorithms import MAML
from diffopt.cli import main
from diffopt.errors import CheckpointError, NonFiniteError
from diffopt.recipes import SinusoidSource, sinusoid_mlp
from diffopt.training import Trainer, load_checkpoint, save_checkpoint
from diffopt.training.trainer import CHECKPOINT_FORMAT

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--meta-batch", "2", "--test-tasks", "2", "--eval-steps", "0", "--no-progress"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``diffopt ARGS`` in-process: (status, stdout, stderr); a traceback fails the test."""
    try:
        status = main(list(args))
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


def one_line_error(capsys, *args: str) -> str:
    status, _, err = run_cli(capsys, *args)
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("usage:")
             and not line.startswith("  ") and "[-h]" not in line]
    assert len(lines) == 1, err
    assert "weights_only" not in err
    return lines[0]


def setup_maml(**options):
    torch.manual_seed(0)
    learner = MAML(sinusoid_mlp(hidden=8), F.mse_loss, inner_lr=0.01, inner_steps=1)
    source = SinusoidSource(meta_batch=2, shots=5, query=5, test_tasks=2, test_shots=5, test_query=5)
    return Trainer(learner, source, torch.optim.Adam(learner.parameters(), lr=1e-2), progress=False, **options)


# -- item 2: a failing evaluation never loses the run -------------------------------------------------
def test_the_checkpoint_is_written_before_the_final_evaluation(tmp_path, monkeypatch):
    trainer = setup_maml(iterations=3, checkpoint=tmp_path / "run.pt", checkpoint_every=2, eval_steps=(0,))

    def diverging(*args, **kwargs):
        raise NonFiniteError("inner loss is not finite for task(s) [0] at inner step 1 (values [nan])")

    monkeypatch.setattr(trainer.learner, "evaluate_steps", diverging)
    # (a divergence that remains with the checks off: evaluate() warns, tries once more, and it raises)
    with pytest.raises(NonFiniteError, match="final evaluation after meta-iteration 3.*checkpoint of iteration 3"), \
            pytest.warns(RuntimeWarning, match="test-time fine-tuning diverged"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "run.pt")["iteration"] == 3  # 3 is not a multiple of checkpoint_every


@pytest.mark.parametrize("steps", ["-1", ",", "", "1,,2", "a,b"])
def test_unusable_evaluation_steps_are_refused_before_training(capsys, tmp_path, steps):
    line = one_line_error(capsys, "train", "--iterations", "3", "--checkpoint", str(tmp_path / "c.pt"),
                          "--meta-batch", "2", "--test-tasks", "2", "--no-progress", f"--eval-steps={steps}")
    assert "--eval-steps" in line
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("steps", [(), (-1,), (1.5,)])
def test_trainer_refuses_unusable_evaluation_steps(steps):
    with pytest.raises(ValueError, match="eval_steps must be one or more integers >= 0"):
        setup_maml(iterations=1, eval_steps=steps)


# -- item 3: no silent overwrite -----------------------------------------------------------------------
def test_a_rerun_without_resume_refuses_to_replace_the_checkpoint(capsys, tmp_path):
    args = ["train", "--iterations", "2", "--checkpoint", str(tmp_path / "c.pt"), "--metrics",
            str(tmp_path / "m.jsonl"), *QUICK]
    assert run_cli(capsys, *args)[0] == 0
    checkpoint, metrics = (tmp_path / "c.pt").read_bytes(), (tmp_path / "m.jsonl").read_bytes()
    line = one_line_error(capsys, *args)
    assert "already exists" in line and "--resume" in line and "--overwrite" in line
    assert (tmp_path / "c.pt").read_bytes() == checkpoint and (tmp_path / "m.jsonl").read_bytes() == metrics
    assert run_cli(capsys, *args, "--overwrite")[0] == 0
    assert run_cli(capsys, *args, "--resume")[0] == 0


# -- item 4: unwritable paths at start, a full disk in one line ----------------------------------------
def test_a_checkpoint_path_that_cannot_be_written_is_refused_at_start(capsys, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(Trainer, "_train_step", lambda self, batch, i: calls.append(i) or {"meta_loss": 0.0})
    (tmp_path / "folder").mkdir()
    line = one_line_error(capsys, "train", "--iterations", "5", "--checkpoint", str(tmp_path / "folder"), *QUICK)
    assert "is a folder" in line
    (tmp_path / "file").write_text("x")
    line = one_line_error(capsys, "train", "--iterations", "5", "--checkpoint", str(tmp_path / "file" / "c.pt"),
                          *QUICK)
    assert "cannot be created" in line
    assert calls == []  # no training time spent


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(capsys, tmp_path, monkeypatch):
    real_save = torch.save
    saves = []

    def full_disk(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    line = one_line_error(capsys, "train", "--iterations", "4", "--checkpoint", str(tmp_path / "c.pt"),
                          "--checkpoint-every", "2", *QUICK)
    assert "No space left on device" in line and "previous checkpoint is kept" in line
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "c.pt")["iteration"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


# -- item 5: temporary files of killed saves are cleaned -----------------------------------------------
def test_temporary_files_of_a_save_killed_with_sigkill_are_removed_by_the_next_save(tmp_path):
    target = tmp_path / "run.pt"
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(ROOT)!r})
        from diffopt._io import atomic_save
        real = torch.save
        def slow(obj, f, *a, **k):
            f.write(b"half a checkpoint")
            f.flush()
            print("saving", flush=True)
            time.sleep(60)
        torch.save = slow
        atomic_save({str(target)!r}, {{"x": torch.zeros(3)}})
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "saving"
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".run.pt.") and left[0].endswith(".tmp")
    (tmp_path / ".run.pt.k2j3h4.tmp").write_bytes(b"from an older diffopt")  # no process id: stale
    (tmp_path / ".other.pt.123.x.tmp").write_bytes(b"another target's")
    save_checkpoint(target, {"format": CHECKPOINT_FORMAT, "version": 1, "iteration": 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.123.x.tmp", "run.pt"]


# -- item 6: resume reproduces the metrics file ---------------------------------------------------------
class Crash(RuntimeError):
    pass


def test_resume_reproduces_the_metrics_when_checkpoints_and_logs_interleave(tmp_path):
    options = dict(iterations=8, log_every=2, checkpoint_every=3, eval_steps=(0,))
    setup_maml(metrics=tmp_path / "full.jsonl", **options).fit()

    def crash(trainer, i):
        if i == 5:
            raise Crash
        return None

    with pytest.raises(Crash):
        setup_maml(metrics=tmp_path / "cut.jsonl", checkpoint=tmp_path / "cut.pt", callbacks=[crash], **options).fit()
    assert load_checkpoint(tmp_path / "cut.pt")["iteration"] == 3
    setup_maml(metrics=tmp_path / "cut.jsonl", checkpoint=tmp_path / "cut.pt", resume=True, **options).fit()

    def lines(name):
        return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]

    full, cut = lines("full.jsonl"), lines("cut.jsonl")
    seconds = [r.pop("seconds") for r in cut if "seconds" in r]
    for record in full:
        record.pop("seconds", None)
    assert cut == full  # the mean at iteration 4 covers iterations 3 and 4, across the resume
    assert seconds == sorted(seconds)  # time continues from the checkpoint's, it does not restart at 0


# -- item 7: Reptile's outer learning rate --------------------------------------------------------------
def test_outer_lr_is_reptiles_step_size_and_is_recorded(capsys, tmp_path):
    weights = {}
    for lr in ("0.5", "0.1"):
        path = tmp_path / f"r{lr}.pt"
        assert run_cli(capsys, "train", "--algo", "reptile", "--iterations", "2", "--outer-lr", lr,
                       "--checkpoint", str(path), *QUICK)[0] == 0
        payload = load_checkpoint(path)
        assert payload["config"]["outer_lr"] == float(lr)
        weights[lr] = payload["learner"]
    assert any(not torch.equal(weights["0.5"][k], weights["0.1"][k]) for k in weights["0.5"])
    assert run_cli(capsys, "train", "--algo", "reptile", "--iterations", "1", "--checkpoint",
                   str(tmp_path / "default.pt"), *QUICK)[0] == 0
    assert load_checkpoint(tmp_path / "default.pt")["config"]["outer_lr"] == 1.0  # ε = 1, the paper's


# -- item 11: broken and hostile checkpoints ------------------------------------------------------------
class Exploit:
    def __reduce__(self):
        return (os.system, ("echo exploited",))


def good_checkpoint(tmp_path) -> Path:
    trainer = setup_maml(iterations=1, checkpoint=tmp_path / "good.pt", eval_steps=(0,))
    trainer.fit()
    return tmp_path / "good.pt"


def test_broken_and_hostile_checkpoints_get_one_line_each(capsys, tmp_path):
    good = good_checkpoint(tmp_path)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    corrupt = bytearray(data)
    middle = len(corrupt) // 2
    corrupt[middle:middle + 64] = bytes(64)
    (tmp_path / "corrupt.pt").write_bytes(bytes(corrupt))
    torch.save({"a": Exploit()}, tmp_path / "evil.pt")
    torch.save({"a": Exploit()}, tmp_path / "evil_legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"state": torch.zeros(2)}, tmp_path / "foreign.pt")
    expected = {
        "truncated.pt": "truncated or corrupt", "empty.pt": "is empty", "corrupt.pt": "corrupt",
        "evil.pt": "refused: it contains code", "evil_legacy.pt": "is not a diffopt checkpoint",
        "foreign.pt": "is not a diffopt checkpoint", "folder": "is a folder",
    }
    (tmp_path / "folder").mkdir()
    for name, message in expected.items():
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(tmp_path / name)
        assert "weights_only" not in str(info.value) and "\n" not in str(info.value)
        line = one_line_error(capsys, "diagnose", str(tmp_path / name), "--sigma", "0.5", "--tasks", "2")
        assert message in line
    line = one_line_error(capsys, "diagnose", "/etc/passwd", "--sigma", "0.5", "--tasks", "2")
    assert "is not a diffopt checkpoint" in line


def edited(tmp_path, name, change) -> Path:
    payload = torch.load(good_checkpoint(tmp_path), weights_only=True)
    change(payload)
    torch.save(payload, tmp_path / name)
    return tmp_path / name


def test_checkpoints_with_non_finite_weights_or_a_negative_iteration_are_refused(capsys, tmp_path):
    def poison(payload):
        next(iter(payload["learner"].values())).view(-1)[0] = float("nan")

    path = edited(tmp_path, "nan.pt", poison)
    with pytest.raises(CheckpointError, match="non-finite values .*learner"):
        load_checkpoint(path)
    path = edited(tmp_path, "minus.pt", lambda p: p.update(iteration=-5))
    with pytest.raises(CheckpointError, match="iteration is -5"):
        load_checkpoint(path)
    trainer = setup_maml(iterations=3, checkpoint=path, resume=True, eval_steps=(0,))
    with pytest.raises(CheckpointError, match="iteration is -5"):
        trainer.fit()


def test_a_checkpoint_that_does_not_fit_the_learner_is_one_line_and_changes_nothing(tmp_path):
    def shrink(payload):
        key = next(iter(payload["learner"]))
        payload["learner"][key] = payload["learner"][key][:1]

    path = edited(tmp_path, "shrunk.pt", shrink)
    trainer = setup_maml(iterations=1, checkpoint=path, resume=True, eval_steps=(0,))
    before = {k: v.clone() for k, v in trainer.learner.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not fit this learner"):
        trainer.fit()
    assert all(torch.equal(before[k], v) for k, v in trainer.learner.state_dict().items())
    path = edited(tmp_path, "nolearner.pt", lambda p: p.pop("learner"))
    with pytest.raises(CheckpointError, match="has no learner"):
        setup_maml(iterations=1, checkpoint=path, resume=True, eval_steps=(0,)).fit()


# -- item 12: divergence in one line --------------------------------------------------------------------
def test_divergence_from_the_outer_lr_names_iteration_task_step_and_cause(capsys):
    line = one_line_error(capsys, "train", "--iterations", "4", "--outer-lr", "1e30", *QUICK)
    assert "meta-iteration 1" in line and "task(s)" in line and "inner step 0" in line
    assert "--outer-lr" in line and "--inner-lr" not in line


def test_divergence_from_the_inner_lr_names_iteration_task_step_and_cause(capsys):
    line = one_line_error(capsys, "train", "--iterations", "4", "--inner-lr", "1e12", "--inner-steps", "3", *QUICK)
    assert "meta-iteration 0" in line and "task(s)" in line and "inner step 1" in line
    assert "--inner-lr" in line and "--outer-lr" not in line


@pytest.mark.parametrize("iterations", [1, 3])
def test_weights_an_outer_step_made_non_finite_are_named_with_that_iteration_and_never_saved(tmp_path, iterations):
    # (read when the next meta-step diverges, and after the last one: not after every step)
    torch.manual_seed(0)
    learner = MAML(sinusoid_mlp(hidden=8), F.mse_loss, inner_lr=0.01, inner_steps=1)
    source = SinusoidSource(meta_batch=2, shots=5, query=5, test_tasks=2, test_shots=5, test_query=5)
    outer = torch.optim.SGD(learner.parameters(), lr=float("nan"))  # its first step makes every weight NaN
    trainer = Trainer(learner, source, outer, iterations=iterations, checkpoint=tmp_path / "run.pt",
                      checkpoint_every=1, eval_steps=(0,), progress=False)
    with pytest.raises(NonFiniteError, match=r"meta-iteration 0: the outer step made the weights .* non-finite; "
                                             r"likely cause: the outer learning rate"):
        trainer.fit()
    assert not (tmp_path / "run.pt").exists()


# -- item 13: numeric flags -------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [
    ("--meta-batch", "0"), ("--nproc", "0"), ("--shots", "0"), ("--query", "0"), ("--test-tasks", "0"),
    ("--eval-steps", "a,b"), ("--timeout", "-1"), ("--timeout", "nan"), ("--iterations", "2.5"),
    ("--outer-lr", "-1"), ("--inner-lr", "inf"), ("--ways", "0"), ("--checkpoint-every", "0"),
    ("--inner-steps", "-1"), ("--seed", "-1"), ("--threads", "0"), ("--omniglot-train-classes", "0"),
])
def test_train_refuses_each_unusable_value_at_parse_time_naming_the_flag(capsys, flag, value, monkeypatch):
    monkeypatch.setattr(Trainer, "fit", lambda self: pytest.fail("training started"))
    line = one_line_error(capsys, "train", flag, value, "--no-progress")
    assert flag in line


def test_rule_option_that_needs_a_number_names_the_flag(capsys, tmp_path):
    line = one_line_error(capsys, "train-optimizer", "--rule", "mlp", "--rule-option", "lr=abc",
                          "--meta-iterations", "1", "-o", str(tmp_path / "r.pt"), "--no-progress")
    assert "--rule-option lr=abc" in line and "number" in line


@pytest.mark.parametrize("value", [2.5, True, "3"])
def test_trainer_refuses_a_non_integer_iteration_count(value):
    with pytest.raises(TypeError, match="iterations must be an integer"):
        setup_maml(iterations=value)


def test_omniglot_class_count_error_names_the_flag(capsys, tmp_path):
    from fake_omniglot import write_fake_omniglot

    write_fake_omniglot(tmp_path / "omniglot", {"images_background": 1, "images_evaluation": 1}, 3, 2)
    line = one_line_error(capsys, "train", "--task", "omniglot", "--data-root", str(tmp_path / "omniglot"),
                          "--iterations", "1", "--ways", "2", "--no-progress")
    assert "--omniglot-train-classes 1200" in line and "num_train" not in line


# -- items 10 and 11: learned-rule files --------------------------------------------------------------
def saved_mlp_rule(tmp_path) -> tuple[Path, dict]:
    from diffopt.optim import learned

    model = torch.nn.Linear(3, 1)
    path = tmp_path / "mlp.pt"
    learned.save(learned.MLPOptimizer(model.parameters(), hidden=(4,)), path)
    return path, torch.load(path, weights_only=True)


def test_a_rule_file_claiming_a_huge_network_allocates_nothing_before_it_is_refused(tmp_path):
    _, payload = saved_mlp_rule(tmp_path)
    config = json.loads(payload["config"])
    config["hidden"] = [30000, 30000]  # 3.6 GiB of float32 weights, in a file of a few KB
    torch.save(dict(payload, config=json.dumps(config)), tmp_path / "huge.pt")
    assert (tmp_path / "huge.pt").stat().st_size < 20_000
    # in a process that cannot grow by more than 512 MiB: building the network first fails to allocate
    script = textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from diffopt.optim import learned
        size = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize"))) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + 512 * 2**20, resource.RLIM_INFINITY))
        try:
            learned.load({str(tmp_path / "huge.pt")!r}, torch.nn.Linear(3, 1).parameters())
        except learned.LearnedRuleError as error:
            print("refused:", error)
        except BaseException as error:
            print("failed:", type(error).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("refused:") and "its config implies" in out, out


def test_rule_files_with_non_finite_weights_are_refused(tmp_path):
    from diffopt.optim import learned

    _, payload = saved_mlp_rule(tmp_path)
    tensors = {k: v.clone() for k, v in payload["tensors"].items()}
    next(iter(tensors.values())).view(-1)[0] = float("inf")
    torch.save(dict(payload, tensors=tensors), tmp_path / "inf.pt")
    with pytest.raises(learned.LearnedRuleError, match="hold NaN or infinity"):
        learned.load(tmp_path / "inf.pt", torch.nn.Linear(3, 1).parameters())


def test_broken_and_hostile_rule_files_get_one_line_each(tmp_path):
    from diffopt.optim import learned

    path, _ = saved_mlp_rule(tmp_path)
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[:100])
    torch.save({"a": Exploit()}, tmp_path / "evil.pt")
    (tmp_path / "text.pt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    expected = {"truncated.pt": "truncated or corrupt", "evil.pt": "refused: it contains code",
                "text.pt": "is not a diffopt learned-rule file"}
    for name, message in expected.items():
        with pytest.raises(learned.LearnedRuleError, match=message) as info:
            learned.load(tmp_path / name, torch.nn.Linear(3, 1).parameters())
        assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


# -- what users expect: tqdm, pytest's summary line ------------------------------------------------------
def test_the_progress_bar_is_tqdm_and_disable_draws_nothing():
    import io

    from tqdm.auto import tqdm

    from diffopt._progress import Progress

    stream = io.StringIO()
    bar = Progress(4, "train", stream=stream)
    assert isinstance(bar._bar, tqdm)
    for i in range(4):
        bar.update(1, postfix=f"loss {i}")
    bar.close()
    assert "4/4" in stream.getvalue() and "it/s" in stream.getvalue() and "loss 3" in stream.getvalue()
    quiet = io.StringIO()
    off = Progress(4, "train", stream=quiet, enabled=False)
    off.update(4)
    off.close()
    assert quiet.getvalue() == ""


def test_the_test_command_prints_pytests_summary_line(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert True\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                          str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path / "test_one.py")],
                         capture_output=True, text=True, timeout=120).stdout
    assert "1 passed" in out, out


def test_the_readme_first_command_installs_what_the_demo_plot_and_the_bars_need(tmp_path):
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    assert {"matplotlib", "tqdm"} <= names
    pytest.importorskip("matplotlib")
    from diffopt.training import demo

    result = demo.run(iterations=2, plot=str(tmp_path / "demo.png"), progress=False)
    assert result.plot == str(tmp_path / "demo.png") and Path(result.plot).stat().st_size > 0


def test_ci_runs_the_readmes_commands_in_order_and_builds_the_docs():
    import re

    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)[:3]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd ", "rm "))]
    assert ci == commands  # set-up + demo, the test suite, then the documentation build
    assert "sphinx-build -W" in commands[2] and (ROOT / "docs" / "conf.py").is_file()


def test_diagnose_and_train_optimizer_refuse_incomplete_or_foreign_checkpoints_in_one_line(capsys, tmp_path):
    path = tmp_path / "run.pt"
    assert run_cli(capsys, "train", "--iterations", "1", "--checkpoint", str(path), *QUICK)[0] == 0
    payload = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in payload.items() if k != "learner"}, tmp_path / "nolearner.pt")
    line = one_line_error(capsys, "diagnose", str(tmp_path / "nolearner.pt"), "--sigma", "0.5", "--tasks", "2")
    assert "no learner weights" in line
    key = next(iter(payload["learner"]))
    torch.save(dict(payload, learner={**payload["learner"], key: torch.zeros(1)}), tmp_path / "shape.pt")
    line = one_line_error(capsys, "diagnose", str(tmp_path / "shape.pt"), "--sigma", "0.5", "--tasks", "2")
    assert "do not fit the rebuilt learner" in line
    # a train-optimizer run resumed from a diffopt train checkpoint of the same configuration name
    rule_run = tmp_path / "rule-run.pt"
    args = ["train-optimizer", "--rule", "mlp", "--meta-iterations", "1", "--unroll", "4", "--truncation", "2",
            "--meta-batch", "2", "-o", str(tmp_path / "rule.pt"), "--checkpoint", str(rule_run), "--no-progress"]
    assert run_cli(capsys, *args)[0] == 0
    saved = torch.load(rule_run, weights_only=True)
    saved["rule"] = dict(saved["rule"], tensors={})
    torch.save(saved, rule_run)
    status, _, err = run_cli(capsys, *args, "--resume")
    assert status == 2 and "another rule's tensors" in err and len(err.strip().splitlines()) == 1


def test_an_atomic_save_also_syncs_its_folder_so_the_rename_survives_a_power_loss(tmp_path, monkeypatch):
    """fsync of the file, os.replace, then fsync of the folder's entries (a review's note: the rename
    was atomic but not yet durable)."""
    import os

    from diffopt import _io

    synced: list[str] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(_io.os, "fsync", recording)
    _io.atomic_save(tmp_path / "run.pt", {"x": torch.zeros(3)})
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(tmp_path)
    assert torch.equal(torch.load(tmp_path / "run.pt", weights_only=True)["x"], torch.zeros(3))
