"""The examples run as written (at small sizes) and show what they claim."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_example_is_covered() -> None:
    covered = {"tune_learning_rate", "maml_sinusoid", "custom_training_loop", "implicit_ridge", "check_my_optimizer",
               "learn_onecycle_peak_lr"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == covered


def test_tune_learning_rate(capsys: pytest.CaptureFixture[str]) -> None:
    result = load("tune_learning_rate").run(steps=20, tuning_steps=3)
    assert result["relative_error"] < 1e-6
    assert result["final_loss"] < result["initial_loss"]


def test_learn_onecycle_peak_lr(capsys: pytest.CaptureFixture[str]) -> None:
    """The digits run (scikit-learn's bundled data): the hypergradient of the validation loss w.r.t. the
    log peak lr matches finite differences, and a few hypergradient steps raise the too-small peak and
    lower the validation cross-entropy (0.537 -> 0.268 in two steps, measured)."""
    pytest.importorskip("sklearn")
    result = load("learn_onecycle_peak_lr").run(steps=60, tuning_steps=2)
    assert result["relative_error"] < 1e-6
    assert result["final_peak"] > 2 * result["initial_peak"]
    assert result["final_loss"] < 0.6 * result["initial_loss"]


def test_maml_sinusoid_in_checkpointed_mode() -> None:
    losses = load("maml_sinusoid").main(iterations=30, mode="checkpointed", inner_steps=2)
    assert set(losses) == {"0", "1", "10"}


def test_custom_training_loop(capsys: pytest.CaptureFixture[str]) -> None:
    load("custom_training_loop").main(steps=3)
    out = capsys.readouterr().out
    assert "meta-gradient norm" in out and "d(validation)/d(lr)" in out


def test_implicit_ridge_matches_the_closed_form() -> None:
    assert load("implicit_ridge").main() < 1e-10


def test_check_my_optimizer_flags_the_leaky_rule() -> None:
    assert load("check_my_optimizer").main()
