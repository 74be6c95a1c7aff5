"""The examples run as written (at small sizes) and show what they claim."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import copy

import pytest
import torch
from torch import nn

from test_unroll import finite_difference

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_example_is_covered() -> None:
    covered = {"tune_learning_rate", "maml_sinusoid", "custom_training_loop", "implicit_ridge", "check_my_optimizer",
               "learn_onecycle_peak_lr", "lora_meta_init", "reweight_noisy_labels", "implicit_regularization",
               "online_lr_tuning"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == covered


def test_tune_learning_rate(capsys: pytest.CaptureFixture[str]) -> None:
    result = load("tune_learning_rate").run(steps=20, tuning_steps=3)
    assert result["relative_error"] < 1e-6
    assert result["final_loss"] < result["initial_loss"]


def test_implicit_regularization(capsys: pytest.CaptureFixture[str]) -> None:
    """Per-feature L2 weights of a logistic regression (scipy's L-BFGS-B inner solver, breast-cancer data)
    tuned by custom_root's hypergradient: the validation loss falls (measured 0.0755 -> 0.0610 in 8 steps,
    -> 0.0272 in the full 100), and the linear solves converge."""
    pytest.importorskip("sklearn")
    result = load("implicit_regularization").main(steps=8)
    assert result["final_validation"] < 0.9 * result["initial_validation"]
    assert 1 <= result["linear_solve_iterations"] <= 100
    assert "validation loss" in capsys.readouterr().out


def test_learn_onecycle_peak_lr(capsys: pytest.CaptureFixture[str]) -> None:
    """The digits run (scikit-learn's bundled data): the hypergradient of the validation loss w.r.t. the
    log peak lr matches finite differences, and a few hypergradient steps raise the too-small peak and
    lower the validation cross-entropy (0.537 -> 0.268 in two steps, measured)."""
    pytest.importorskip("sklearn")
    result = load("learn_onecycle_peak_lr").run(steps=60, tuning_steps=2)
    assert result["relative_error"] < 1e-6
    assert result["final_peak"] > 2 * result["initial_peak"]
    assert result["final_loss"] < 0.6 * result["initial_loss"]


def test_reweight_noisy_labels(capsys: pytest.CaptureFixture[str]) -> None:
    """Digits with 40% wrong labels, 3 epochs of SGD with momentum 0.9: both reweighting learners give the
    wrong labels less than the right ones (measured L2RW 0.57 vs 1.29, MWN 0.44 vs 1.38, in units of plain
    training's weight) and Meta-Weight-Net trains to over 90% test accuracy (measured 0.942; plain 0.920,
    L2RW 0.540 — see the example's docstring)."""
    pytest.importorskip("sklearn")
    results = load("reweight_noisy_labels").main(epochs=3)
    for method in ("L2RW", "MWN"):
        assert results[method]["weight_wrong"] < 0.6 * results[method]["weight_right"], method
    assert results["MWN"]["accuracy"] > 0.9
    assert "MWN: test accuracy" in capsys.readouterr().out


def test_online_lr_tuning(capsys: pytest.CaptureFixture[str]) -> None:
    """The digits run from an lr 10x too low: the tuner raises the lr and the tuned run's test loss beats
    the fixed-lr run's (measured at 120 steps: lr 3e-4 -> 1.1e-3, test 1.47 vs 1.82)."""
    pytest.importorskip("sklearn")
    result = load("online_lr_tuning").run(steps=120, every=10, window=3)
    assert result["final_lr"] > 2 * 3e-4
    assert result["tuned_test"] < result["fixed_test"]
    assert "test loss: fixed lr" in capsys.readouterr().out


def test_lora_meta_init() -> None:
    """Meta-learning the LoRA adapters' initialisation (base frozen) beats LoRA's default start
    on held-out bigram languages, before and after adaptation (measured at 20 iterations, 2 inner
    steps, 16 test tasks: unadapted 2.89 -> 2.67, adapted 2.83 -> 2.47 nats), and adaptation helps."""
    results = load("lora_meta_init").main(iterations=20, inner_steps=2, test_tasks=16)
    default, learned = results["LoRA default init (B = 0)"], results["meta-learned LoRA init"]
    assert learned["unadapted"][0] < default["unadapted"][0]
    assert learned["adapted"][0] < default["adapted"][0]
    assert learned["adapted"][0] < learned["unadapted"][0]


def test_maml_sinusoid_in_checkpointed_mode() -> None:
    """The example trains the same model in checkpointed as in second-order mode (the modes give
    the same meta-gradient): its test losses agree to float32 rounding (measured: bit for bit,
    relative difference 0, at 30 iterations), and one adaptation step lowers the test loss
    (measured 3.636 -> 3.556)."""
    example = load("maml_sinusoid")
    losses = example.main(iterations=30, mode="checkpointed", inner_steps=2)
    assert set(losses) == {"0", "1", "10"}
    reference = example.main(iterations=30, mode="second_order", inner_steps=2)
    for steps, value in losses.items():
        assert abs(value - reference[steps]) <= 1e-6 * reference[steps], (steps, value, reference[steps])
    assert losses["1"] < losses["0"]


def test_custom_training_loop(capsys: pytest.CaptureFixture[str], float64_default) -> None:
    """In float64, against references written here: the example's validation loss after 3
    differentiable Adam steps equals torch.optim.Adam continuing from the warm-up (1e-12), its
    meta-gradient for the first layer matches finite differences of that torch.optim run along a
    random direction, and d(validation)/d(lr) matches finite differences of hand-written SGD with
    momentum (relative 1e-6, the suite's finite-difference tolerance)."""
    steps = 3
    result = load("custom_training_loop").main(steps=steps)
    out = capsys.readouterr().out
    assert "meta-gradient norm" in out and "d(validation)/d(lr)" in out
    mse = nn.functional.mse_loss

    torch.manual_seed(0)  # the example's set-up, drawn in the same order
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    x_train, y_train = torch.randn(32, 3), torch.randn(32, 1)
    x_valid, y_valid = torch.randn(32, 3), torch.randn(32, 1)
    warm = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        warm.zero_grad()
        mse(model(x_train), y_train).backward()
        warm.step()
    g = torch.Generator().manual_seed(0)

    direction = torch.randn(model[0].weight.shape, generator=g, dtype=torch.float64)

    def adam_validation(eps: float) -> float:
        copied = copy.deepcopy(model)
        with torch.no_grad():
            copied[0].weight.add_(eps * direction)
        adam = torch.optim.Adam(copied.parameters(), lr=1e-2)
        adam.load_state_dict(copy.deepcopy(warm.state_dict()))  # load_state_dict shares the state tensors
        for _ in range(steps):
            adam.zero_grad()
            mse(copied(x_train), y_train).backward()
            adam.step()
        with torch.no_grad():
            return float(mse(copied(x_valid), y_valid))

    assert abs(float(result["validation"]) - adam_validation(0.0)) <= 1e-12
    analytic = float((result["weight_grad"] * direction).sum())
    numeric = finite_difference(adam_validation)
    assert abs(analytic - numeric) <= 1e-6 * abs(numeric), (analytic, numeric)

    lr0 = torch.full_like(model[2].weight, 1e-2)
    lr_direction = torch.rand(lr0.shape, generator=g, dtype=torch.float64)

    def momentum_validation(eps: float) -> float:
        with torch.no_grad():
            lr, w, buffer = lr0 + eps * lr_direction, model[2].weight.clone(), None
            for _ in range(steps):
                with torch.enable_grad():
                    w_ = w.requires_grad_()
                    (grad,) = torch.autograd.grad(mse(model[1](model[0](x_train)) @ w_.T + model[2].bias, y_train), w_)
                buffer = grad if buffer is None else 0.9 * buffer + grad
                w = w.detach() - lr * buffer
            return float(mse(model[1](model[0](x_valid)) @ w.T + model[2].bias, y_valid))

    assert abs(float(result["lr_validation"]) - momentum_validation(0.0)) <= 1e-12
    analytic = float((result["lr_grad"] * lr_direction).sum())
    numeric = finite_difference(momentum_validation)
    assert abs(analytic - numeric) <= 1e-6 * abs(numeric), (analytic, numeric)


def test_implicit_ridge_matches_the_closed_form() -> None:
    assert load("implicit_ridge").main() < 1e-10


def test_check_my_optimizer_flags_the_leaky_rule() -> None:
    assert load("check_my_optimizer").main()
