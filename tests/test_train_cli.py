"""``diffopt train`` and ``diffopt demo``, called in-process through ``diffopt.cli.main``.

* the sinusoid, synthetic and Omniglot-protocol paths run and print a JSON summary;
* --checkpoint / --resume: an interrupted run resumed ends where the uninterrupted one does;
* bad input ends with a one-line message naming the problem (exit status 2), not a traceback:
  an Omniglot folder in the wrong layout, shots or ways the data cannot supply, a checkpoint
  from another configuration, an unknown algorithm.

The Omniglot folder is generated in the published layout
(``images_background/<Alphabet>/<character>/*.png``, ``images_evaluation/...``) with
``diffopt.tasks.write_png``; the CLI uses the protocol's 1200 training characters, so the
folder holds 1205 small characters (28×28, the loader's size, two drawings each).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffopt.training import experiment
from diffopt.algorithms import MAMLPlusPlus
from diffopt.cli import main
from diffopt.tasks import write_png
from diffopt.training import Trainer
from fake_omniglot import write_fake_omniglot


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(capsys, *args: str) -> dict:
    """Run ``diffopt train ARGS --no-progress`` and parse the JSON summary it prints."""
    assert main(["train", *args, "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def fails(capsys, *args: str) -> str:
    """Run ``diffopt ARGS``, expect exit status 2, return stderr."""
    with pytest.raises(SystemExit) as info:
        main(list(args))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def check_summary(summary: dict, iterations: int, tasks: int, steps=None, accuracy: bool = False) -> None:
    assert summary["iterations"] == iterations and summary["world_size"] == 1
    final = summary["final"]
    assert set(final) == ({"loss", "accuracy"} if accuracy else {"loss"})
    for metric in final.values():
        entries = [metric[str(k)] for k in steps] if steps else [metric]
        assert set(metric) == ({str(k) for k in steps} if steps else {"mean", "ci95", "tasks"})
        for entry in entries:
            assert entry["tasks"] == tasks and np.isfinite(entry["mean"]) and entry["ci95"] >= 0
    if accuracy:
        for entry in ([final["accuracy"][str(k)] for k in steps] if steps else [final["accuracy"]]):
            assert 0.0 <= entry["mean"] <= 1.0


# =============================================================================================
# The task families
# =============================================================================================

def test_train_sinusoid_maml_prints_a_json_summary(capsys):
    summary = train(capsys, "--task", "sinusoid", "--algo", "maml", "--iterations", "20", "--test-tasks", "20")
    check_summary(summary, 20, 20, steps=(0, 1, 5, 10))


@pytest.mark.parametrize("algo", ["protonet", "maml"])
def test_train_synthetic(capsys, algo):
    steps = () if algo == "protonet" else ("--eval-steps", "0,1")  # protonet has no test-time steps
    summary = train(capsys, "--task", "synthetic", "--algo", algo, "--iterations", "5", "--test-tasks", "10", *steps)
    check_summary(summary, 5, 10, steps=None if algo == "protonet" else (0, 1), accuracy=True)


def test_train_mamlpp_anneals_by_epoch_and_evaluates_beyond_its_inner_steps(capsys, monkeypatch):
    """MAML++'s schedules advance with the iterations; test-time steps may exceed K (5 here)."""
    epochs = []
    real = MAMLPlusPlus.set_epoch
    monkeypatch.setattr(MAMLPlusPlus, "set_epoch", lambda self, e: (epochs.append(e), real(self, e))[1])
    monkeypatch.setattr(experiment, "ITERATIONS_PER_EPOCH", 2)
    summary = train(capsys, "--task", "sinusoid", "--algo", "mamlpp", "--iterations", "5", "--meta-batch", "4",
                    "--test-tasks", "4", "--eval-steps", "0,1,10")
    assert epochs == [0, 0, 1, 1, 2]
    check_summary(summary, 5, 4, steps=(0, 1, 10))


def test_a_diverged_test_task_prints_standard_json_with_null_and_the_count(capsys):
    """The summary had bare Infinity / NaN tokens (not JSON), and the diverged tasks' accuracy as a number."""
    with pytest.warns(RuntimeWarning, match="fine-tuning diverged"):
        assert main(["train", "--task", "synthetic", "--ways", "3", "--inner-lr", "1e5", "--eval-steps", "0,10",
                     "--iterations", "1", "--meta-batch", "2", "--test-tasks", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out

    def refuse(token: str):
        raise AssertionError(f"non-standard JSON token {token}")

    final = json.loads(out, parse_constant=refuse)["final"]
    for metric in ("loss", "accuracy"):
        entry = final[metric]["10"]
        assert entry["mean"] is None and entry["ci95"] is None and entry["diverged"] >= 1 and entry["tasks"] == 3
        assert final[metric]["0"]["mean"] is not None and "diverged" not in final[metric]["0"]


def test_demo_runs_and_prints_the_table(capsys):
    assert main(["demo", "--iterations", "50", "--plot", "", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| method | 0 steps | 1 step | 5 steps | 10 steps |" in out
    rows = [line for line in out.splitlines() if line.startswith("| MAML |") or line.startswith("| pretrained |")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert len(cells) == 4 and all("±" in c and np.isfinite(float(c.split("±")[0])) for c in cells)
    assert "plot of adapted fits" not in out


# =============================================================================================
# Checkpoints through the command line
# =============================================================================================

COMMON = ("--task", "sinusoid", "--algo", "maml", "--iterations", "6", "--meta-batch", "5", "--test-tasks", "5",
          "--eval-steps", "0,1", "--checkpoint-every", "2")


class Crash(RuntimeError):
    pass


def test_checkpoint_and_resume(capsys, monkeypatch, tmp_path):
    reference = train(capsys, *COMMON, "--checkpoint", str(tmp_path / "a.pt"), "--metrics", str(tmp_path / "a.jsonl"))

    class CrashingTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            def crash(trainer, i):
                if i == 5:
                    raise Crash("killed at iteration 5")
            super().__init__(*args, **{**kwargs, "callbacks": [crash]})

    monkeypatch.setattr(experiment, "Trainer", CrashingTrainer)
    with pytest.raises(Crash):
        main(["train", *COMMON, "--checkpoint", str(tmp_path / "b.pt"), "--metrics", str(tmp_path / "b.jsonl"),
              "--no-progress"])
    monkeypatch.undo()
    assert torch.load(tmp_path / "b.pt", weights_only=True)["iteration"] == 4
    resumed = train(capsys, *COMMON, "--checkpoint", str(tmp_path / "b.pt"), "--metrics", str(tmp_path / "b.jsonl"),
                    "--resume")
    assert resumed == reference
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(a["learner"][k], b["learner"][k]) for k in a["learner"])

    def lines(path: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]
    assert lines(tmp_path / "a.jsonl") == lines(tmp_path / "b.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "a.pt", "b.jsonl", "b.pt"]  # no temp files

    # a checkpoint from another configuration is refused, naming what differs
    err = fails(capsys, "train", *COMMON, "--checkpoint", str(tmp_path / "a.pt"), "--resume", "--inner-lr", "0.02",
                "--no-progress")
    assert "was written by another configuration" in err
    assert "inner_lr differs (checkpoint 0.01, now 0.02)" in err
    err = fails(capsys, "train", *COMMON, "--inner-steps", "2", "--checkpoint", str(tmp_path / "a.pt"), "--resume",
                "--no-progress")
    assert "learner.inner_steps differs (checkpoint 1, now 2)" in err


# =============================================================================================
# Bad input
# =============================================================================================

def test_unknown_algorithm(capsys):
    err = fails(capsys, "train", "--algo", "mamla")
    assert "invalid choice: 'mamla'" in err and "maml" in err


def test_shots_and_ways_the_data_cannot_supply(capsys):
    err = fails(capsys, "train", "--task", "synthetic", "--algo", "protonet", "--ways", "300", "--iterations", "1")
    assert "diffopt train: error: ways=300 but this split has only 140 classes" in err
    err = fails(capsys, "train", "--task", "synthetic", "--algo", "protonet", "--shots", "10", "--query", "15",
                "--iterations", "1")
    assert "shots + query = 10 + 15 = 25 examples per class are needed" in err


def test_omniglot_folder_in_the_wrong_layout(capsys, tmp_path):
    bad = tmp_path / "flat"
    (bad / "images_background").mkdir(parents=True)
    (bad / "images_evaluation").mkdir(parents=True)
    write_png(np.ones((28, 28), dtype=bool), bad / "images_background" / "a.png")
    err = fails(capsys, "train", "--task", "omniglot", "--data-root", str(bad), "--iterations", "1")
    assert err.startswith("diffopt train: error: ")
    assert "no alphabet folders" in err and "images_background" in err
    err = fails(capsys, "train", "--task", "omniglot", "--data-root", str(tmp_path / "nowhere"), "--iterations", "1")
    assert "does not exist" in err and "images_background.zip" in err
    assert "--task omniglot needs --data-root" in fails(capsys, "train", "--task", "omniglot", "--iterations", "1")


# =============================================================================================
# The Omniglot protocol end to end on a generated folder
# =============================================================================================

@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("omniglot")
    count = write_fake_omniglot(root, {"images_background": 3, "images_evaluation": 2}, characters=241, drawings=2)
    assert count == 1205
    return root


def test_omniglot_protocol_splits_and_models(omniglot_root):
    """1200 training characters and the rest for testing, each rotated into 4 classes; Conv-4 on 28×28."""
    from diffopt.cli import build_parser
    from diffopt.cli.train import settings_from_args

    args = build_parser().parse_args(["train", "--task", "omniglot", "--data-root", str(omniglot_root),
                                      "--algo", "maml", "--shots", "1", "--query", "1", "--meta-batch", "2"])
    source, learner, config = experiment.build(settings_from_args(args))
    assert (source.train.num_groups, source.train.num_classes) == (1200, 4800)
    assert (source.test.num_groups, source.test.num_classes) == (5, 20)
    assert source.train.example_shape == (1, 28, 28)
    train_names = {n.split("@")[0] for n in source.train.class_names}
    assert not train_names & {n.split("@")[0] for n in source.test.class_names}
    sx, sy, qx, qy = source.train_batch(torch.Generator().manual_seed(0))
    assert sx.shape == (2, 5, 1, 28, 28) and qx.shape == (2, 5, 1, 28, 28)
    assert 0.0 <= float(sx.min()) and float(sx.max()) <= 1.0 and float(sx.sum()) > 0  # strokes 1, background 0
    convolutions = [m for m in learner.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convolutions) == 4 and learner.model[-1].out_features == 5 and config["inner_lr"] == 0.4


def test_omniglot_too_few_test_characters_names_the_test_split_and_the_flag(capsys, omniglot_root):
    """1204 of 1205 characters for training leave 4 test classes for 5 ways: the error had said "this split"."""
    err = fails(capsys, "train", "--task", "omniglot", "--data-root", str(omniglot_root), "--omniglot-train-classes",
                "1204", "--iterations", "1", "--no-progress")
    assert ("--ways 5: the Omniglot test split has only 4 classes (1 character(s) × their rotations) with "
            "--omniglot-train-classes 1204 of the folder's 1205 characters; lower --omniglot-train-classes") in err


@pytest.mark.parametrize("algo", ["maml", "fomaml", "protonet", "matching", "siamese"])
def test_omniglot_protocol_end_to_end(capsys, omniglot_root, algo):
    summary = train(capsys, "--task", "omniglot", "--data-root", str(omniglot_root), "--algo", algo,
                    "--iterations", "3", "--meta-batch", "1", "--shots", "1", "--query", "1", "--test-tasks", "2",
                    *(("--eval-steps", "0,1") if algo in ("maml", "fomaml") else ()))
    gradient = algo in ("maml", "fomaml")
    check_summary(summary, 3, 2, steps=(0, 1) if gradient else None, accuracy=True)


# =============================================================================================
# Flags an algorithm would ignore, modes it cannot be trained in, and checkpoints it is rebuilt from
# =============================================================================================

@pytest.mark.parametrize(("args", "message"), [
    (("--algo", "protonet", "--inner-lr", "0.1"), "--inner-lr do not apply to protonet, which has no inner loop"),
    (("--algo", "matching", "--inner-steps", "3"), "--inner-steps do not apply to matching"),
    (("--algo", "metasgd", "--inner-lr", "0.5"), "--inner-lr does not apply to metasgd: its per-parameter inner"),
    (("--mode", "forward"), "--mode forward: forward mode differentiates the inner optimizer's hyperparameters only"),
    (("--mode", "implicit"), "--mode implicit: implicit differentiation needs a proximal term"),
    (("--algo", "anil", "--mode", "truncated"), "--mode truncated: truncated back-propagation needs truncate=k"),
    (("--resume",), "--resume continues the run saved at --checkpoint; give --checkpoint PATH"),
    (("--backend", "bogus"), "backend (--backend) must be one of auto, gloo, nccl, mpi, ucc, got 'bogus'"),
    # silently ignored before: the Omniglot flags on generated tasks, classes on regression, steps without a loop
    (("--task", "synthetic", "--data-root", "/nonexistent"), "--data-root applies only to --task omniglot"),
    (("--task", "glyphs", "--omniglot-train-classes", "7"), "--omniglot-train-classes applies only to --task omniglot"),
    (("--task", "sinusoid", "--ways", "3"), "--ways does not apply to sinusoid, a regression task"),
    (("--task", "synthetic", "--algo", "protonet", "--eval-steps", "7"),
     "--eval-steps do not apply to protonet, which has no inner loop"),
    (("--task", "synthetic", "--algo", "siamese", "--eval-steps", "0,1"), "--eval-steps do not apply to siamese"),
])
def test_a_flag_the_algorithm_would_ignore_or_a_mode_it_cannot_train_in_is_refused(capsys, args, message):
    """They had been ignored (Meta-SGD's --inner-lr, the metric learners' inner flags), or crashed with
    a traceback, or trained nothing (forward / implicit modes)."""
    err = fails(capsys, "train", *args, "--iterations", "1", "--test-tasks", "2")
    assert message in err


def test_mamlpp_takes_an_explicit_inner_steps_of_one(capsys, monkeypatch):
    """MAML++'s default is 5 inner steps; an explicit --inner-steps 1 had silently become 5."""
    from diffopt.cli import build_parser
    from diffopt.cli.train import settings_from_args

    def inner_steps(*args: str) -> int:
        parsed = build_parser().parse_args(["train", "--algo", "mamlpp", *args])
        return experiment.build(settings_from_args(parsed))[1].loop.steps

    assert inner_steps() == 5 and inner_steps("--inner-steps", "1") == 1 and inner_steps("--inner-steps", "3") == 3


@pytest.mark.parametrize("algo", ["fomaml", "imaml", "mamlpp", "reptile", "metasgd"])
def test_diagnose_reads_a_checkpoint_of_every_kind_of_algorithm(capsys, tmp_path, algo):
    """A fixed-mode algorithm's checkpoint records its mode, which diagnose had passed back as --mode
    (refused for fomaml, imaml and mamlpp); the rebuilt settings give each flag only to algorithms it applies to."""
    path = tmp_path / f"{algo}.pt"
    train(capsys, "--algo", algo, "--iterations", "1", "--test-tasks", "2", "--eval-steps", "0",
          "--checkpoint", str(path))
    assert main(["diagnose", str(path), "--tasks", "2", "--sigma", "0.5"]) == 0, capsys.readouterr().err


def test_the_omniglot_class_split_is_recorded_for_resume_and_diagnose(capsys, tmp_path, omniglot_root):
    """--omniglot-train-classes changes the split: it is in the checkpoint's configuration, so a resume
    with another value is refused and a rebuild (diagnose) uses the recorded one."""
    path = tmp_path / "omniglot.pt"
    common = ("--task", "omniglot", "--data-root", str(omniglot_root), "--algo", "protonet", "--meta-batch", "1",
              "--shots", "1", "--query", "1", "--test-tasks", "2", "--checkpoint", str(path))
    train(capsys, *common, "--iterations", "1", "--omniglot-train-classes", "1190")
    err = fails(capsys, "train", *common, "--iterations", "2", "--omniglot-train-classes", "1200", "--resume",
                "--no-progress")
    assert "omniglot_train_classes" in err
    config = torch.load(path, weights_only=True)["config"]
    settings = experiment.settings_from_checkpoint(config, tasks=2, data_root=str(omniglot_root))
    assert settings.omniglot_train_classes == 1190
    assert experiment.build(settings)[0].test.num_groups == 15


# =============================================================================================
# train-optimizer and diagnose: outputs checked before any work, bad input in one line
# =============================================================================================

TOPT = ("train-optimizer", "--rule", "hypergradient_sgd", "--task", "quadratic", "--task-option", "dim=3",
        "--unroll", "2", "--truncation", "2", "--meta-batch", "2", "--no-progress")


def status_and_error(capsys, *args: str) -> tuple[int, str]:
    """Run ``diffopt ARGS`` (returning, not exiting), the status and stderr, which has no traceback."""
    status = main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


def one_line(capsys, *args: str) -> str:
    status, err = status_and_error(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, err
    return lines[0]


def no_work(monkeypatch) -> None:
    """Any training or diagnosing from here on fails the test: the refusals come first."""
    from diffopt.cli import diagnose
    from diffopt.training import OptimizerTrainer

    monkeypatch.setattr(OptimizerTrainer, "fit", lambda self, *a: pytest.fail("meta-training started"))
    monkeypatch.setattr(diagnose, "rebuild", lambda *a: pytest.fail("diagnose started"))


def test_train_optimizer_refuses_to_replace_an_earlier_run_without_resume_or_overwrite(capsys, tmp_path, monkeypatch):
    out, ckpt, metrics = tmp_path / "rule.pt", tmp_path / "run.pt", tmp_path / "m.jsonl"
    run = (*TOPT, "-o", str(out), "--checkpoint", str(ckpt), "--metrics", str(metrics))
    assert main([*run, "--meta-iterations", "3"]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in (out, ckpt, metrics)}
    with monkeypatch.context() as patch:
        no_work(patch)
        line = one_line(capsys, *run, "--meta-iterations", "1")
        assert f"--checkpoint {ckpt} already exists" in line and "--resume" in line and "--overwrite" in line
        line = one_line(capsys, *TOPT, "-o", str(out), "--meta-iterations", "1")  # the rule file alone
        assert f"--output {out} already exists" in line and "another --output" in line
        line = one_line(capsys, *run, "--meta-iterations", "1", "--resume", "--overwrite")
        assert "give one of them" in line
    assert {p: p.read_bytes() for p in before} == before  # nothing cut back
    assert main([*run, "--meta-iterations", "4", "--resume"]) == 0  # continues: 3 + 1
    assert json.loads(capsys.readouterr().out)["meta_iterations"] == 4
    assert len(metrics.read_text().splitlines()) == 4
    assert main([*run, "--meta-iterations", "1", "--overwrite"]) == 0  # replaces: a fresh run of 1
    assert json.loads(capsys.readouterr().out)["meta_iterations"] == 1
    assert len(metrics.read_text().splitlines()) == 1
    assert torch.load(ckpt, weights_only=True)["iteration"] == 1


def test_train_optimizer_and_diagnose_check_every_output_path_before_any_work(capsys, tmp_path, monkeypatch):
    checkpoint = tmp_path / "maml.pt"
    train(capsys, "--iterations", "1", "--test-tasks", "2", "--checkpoint", str(checkpoint))
    a_file = tmp_path / "file"
    a_file.write_text("")
    no_work(monkeypatch)
    for flag, path, words in (("-o", tmp_path, "is a folder"), ("--checkpoint", tmp_path, "is a folder"),
                              ("--metrics", a_file / "m.jsonl", "is a file, not a folder")):
        extra = [] if flag == "-o" else ["-o", str(tmp_path / "rule.pt")]
        line = one_line(capsys, *TOPT, flag, str(path), *extra)
        assert ("--output" if flag == "-o" else flag) in line and words in line
    diagnose = ("diagnose", str(checkpoint), "--sigma", "0.5", "--tasks", "2")
    cases = (("--json", tmp_path, "diagnostics.json"), ("--plot", tmp_path, "diagnostics.png"),
             ("--json", a_file / "d.json", "is a file, not a folder"),
             ("--plot", tmp_path / "figure", "figure.png"),  # matplotlib would have saved figure.png
             ("--plot", tmp_path / "figure.nosuch", ".svg"))
    for flag, path, words in cases:
        line = one_line(capsys, *diagnose, flag, str(path))
        assert flag in line and words in line, line


def test_diagnose_writes_its_report_into_a_new_folder(capsys, tmp_path):
    checkpoint = tmp_path / "maml.pt"
    train(capsys, "--iterations", "1", "--test-tasks", "2", "--checkpoint", str(checkpoint))
    report, figure = tmp_path / "new" / "d.json", tmp_path / "other" / "d.svg"
    assert main(["diagnose", str(checkpoint), "--sigma", "0.5", "--tasks", "2", "--which", "kl",
                 "--json", str(report), "--plot", str(figure)]) == 0
    assert json.loads(report.read_text()) and figure.read_bytes().startswith(b"<?xml")


@pytest.mark.parametrize("option,words", [
    ("hidden=abc", 'hidden="abc": hidden takes a list of integers >= 1 like hidden=[20,20]'),
    ("hidden=5", "hidden=5: hidden takes a list of integers >= 1 like hidden=[20,20]"),
    ("hidden=[0]", "hidden=[0]: hidden takes a list of integers >= 1 like hidden=[20,20]"),
    ("points=2.5", "points=2.5: points takes an integer >= 1 such as points=20"),
    ("points=0", "points=0: points takes an integer >= 1 such as points=20"),  # was a ZeroDivisionError
    ("amplitude_range=[1]", "takes a list of 2 numbers like amplitude_range=[0.1,5.0]"),  # was an IndexError
    ("bogus=1", "the sinusoid family has no option 'bogus'; its options are hidden, points"),
])
def test_train_optimizer_task_option_of_the_wrong_kind_names_the_flag(capsys, tmp_path, monkeypatch, option, words):
    no_work(monkeypatch)
    line = one_line(capsys, "train-optimizer", "--task", "sinusoid", "--task-option", option, "-o",
                    str(tmp_path / "r.pt"))
    assert f"--task-option {option.split('=')[0]}" in line and words in line and "int()" not in line


@pytest.mark.parametrize("option,words", [("=1", "the KEY before '=' is empty"),
                                          ("bogus=1", "--rule-option: HypergradientSGD: unknown argument 'bogus'")])
def test_train_optimizer_rule_option_without_a_usable_key_names_the_flag(capsys, tmp_path, monkeypatch, option, words):
    no_work(monkeypatch)
    assert words in one_line(capsys, *TOPT, "--rule-option", option, "-o", str(tmp_path / "r.pt"))


def test_train_optimizer_stopped_by_sigterm_says_whether_a_checkpoint_exists(capsys, tmp_path, monkeypatch):
    import os
    import signal

    from diffopt.training import OptimizerTrainer

    train_iteration = OptimizerTrainer.train_iteration
    stop_at = {"iteration": 0}

    def stopping(self, i):
        if i == stop_at["iteration"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_iteration(self, i)

    monkeypatch.setattr(OptimizerTrainer, "train_iteration", stopping)
    ckpt = tmp_path / "run.pt"
    run = (*TOPT, "-o", str(tmp_path / "rule.pt"), "--checkpoint", str(ckpt), "--checkpoint-every", "2",
           "--meta-iterations", "5")
    status, err = status_and_error(capsys, *run)
    assert status == 128 + signal.SIGTERM and not ckpt.exists()
    assert "stopped by SIGTERM after 0 meta-iteration(s); no checkpoint was written yet" in err
    assert "is kept" not in err and len(err.strip().splitlines()) == 1
    stop_at["iteration"] = 3
    status, err = status_and_error(capsys, *run, "--resume")
    assert status == 128 + signal.SIGTERM
    assert f"the checkpoint {ckpt} (meta-iteration 2) is kept; continue with --resume" in err
    assert torch.load(ckpt, weights_only=True)["iteration"] == 2 and not (tmp_path / "rule.pt").exists()


# -- hypergradient SGD: its defaults meta-train, a divergence names the real options ----------------------------

def test_train_optimizer_hypergradient_sgd_defaults_meta_train_on_the_sinusoid(capsys, tmp_path):
    """With the rule's own β = 1e-3 every sinusoid task batch diverged within 3-36 steps, and Adam's first
    meta-update took β = 1e-5 to 3e-3; the trainer starts from β = 1e-6 and takes relative meta-steps."""
    from diffopt.training import OptimizerTrainer, TrainConfig

    config = TrainConfig(rule="hypergradient_sgd", task="sinusoid", unroll=12, truncation=4, iterations=3,
                         meta_batch=4)
    trainer = OptimizerTrainer(config, progress=False)
    lr, hyper_lr = (float(w.detach()) for w in trainer.meta_params)
    assert (lr, hyper_lr) == (pytest.approx(1e-2), pytest.approx(1e-6))
    seen = []
    trainer.fit(lambda t, record: seen.append([float(w.detach()) for w in t.meta_params]))
    assert all(np.isfinite(r["objective"]) and np.isfinite(r["final_loss"]) for r in trainer.history)
    for (lr0, beta0), (lr1, beta1) in zip([[lr, hyper_lr]] + seen, seen):  # 3 meta-updates per iteration
        assert 0 < beta1 and abs(beta1 / beta0 - 1) <= 3 * 3.2 * config.meta_lr  # Adam's step ≤ ~3.2·rate
        assert 0 < lr1 and abs(lr1 / lr0 - 1) <= 3 * 3.2 * config.meta_lr
    # and on the command line, with every default but the length
    out = tmp_path / "rule.pt"
    assert main(["train-optimizer", "--rule", "hypergradient_sgd", "--unroll", "12", "--truncation", "4",
                 "--meta-iterations", "2", "--meta-batch", "4", "-o", str(out), "--no-progress"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["last_final_loss"]) and out.is_file()


def test_train_optimizer_divergence_names_the_rules_step_size_options(capsys, tmp_path):
    line = one_line(capsys, "train-optimizer", "--rule", "hypergradient_sgd", "--rule-option", "hyper_lr=0.01",
                    "--unroll", "20", "--truncation", "10", "--meta-iterations", "1", "--meta-batch", "4",
                    "-o", str(tmp_path / "r.pt"), "--no-progress")
    assert "diverged under the hypergradient_sgd rule at meta-iteration 0" in line
    assert "--rule-option lr=" in line and "--rule-option hyper_lr=" in line
    assert "inner learning rate" not in line and not (tmp_path / "r.pt").exists()


def test_train_optimizer_hypergradient_rules_meta_train_with_pes(capsys, tmp_path):
    """PES perturbs each hypergradient tensor by σ·|w|·ε (an absolute σ = 0.01 put β = 1e-6 at ±1e-2: every
    optimizee diverged at once) and the run resumes exactly."""
    from diffopt.training import OptimizerTrainer, TrainConfig

    for rule in ("hypergradient_sgd", "hypergradient_adam"):
        config = TrainConfig(rule=rule, task="sinusoid", unroll=6, truncation=3, iterations=2, meta_batch=2,
                             mode="pes", pes_samples=2)
        trainer = OptimizerTrainer(config, progress=False)
        trainer.fit()
        assert all(np.isfinite(r["objective"]) for r in trainer.history)
        assert all(float(w.detach()) > 0 for w in trainer.meta_params)


@pytest.mark.parametrize("rule,option,words", [
    ("mlp", "hidden=abc", 'hidden="abc": hidden takes a list of integers >= 1 such as hidden=[32,32]'),
    ("lstm", "hidden_size=abc", 'hidden_size="abc": hidden_size takes an integer >= 1 such as hidden_size=20'),
    ("meta_sgd", "init=[1,2,3]", "init=[1,2,3]: init takes a number or a list of 2 numbers"),  # 'too many values'
])
def test_train_optimizer_rule_option_of_the_wrong_kind_names_the_flag(capsys, tmp_path, monkeypatch, rule, option,
                                                                       words):
    no_work(monkeypatch)
    line = one_line(capsys, "train-optimizer", "--rule", rule, "--rule-option", option, "-o", str(tmp_path / "r.pt"))
    assert f"--rule-option {words}" in line and "int()" not in line


def test_optimizer_trainer_divergence_is_a_non_finite_error_naming_the_options():
    from diffopt.errors import NonFiniteError
    from diffopt.training import OptimizerTrainer, TrainConfig

    config = TrainConfig(rule="hypergradient_sgd", task="sinusoid", unroll=20, truncation=10, iterations=1,
                         meta_batch=4, rule_options={"hyper_lr": 1e-3})  # the rule's own β: every batch diverges
    with pytest.raises(NonFiniteError, match=r"rule_options hyper_lr= \(--rule-option hyper_lr=\.\.\.\)"):
        OptimizerTrainer(config, progress=False).fit()
