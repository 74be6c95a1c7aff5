"""The reproduction scripts of benchmarks/ run end to end at tiny sizes and report what they promise.

* ``benchmarks/reproduce_sinusoid.py``: ``maml``, ``metasgd`` and ``family`` with a few iterations and
  test tasks; the printed table and the JSON file have the documented structure, and the test MSEs
  lie within the spread measured over seeds (``EXPECTED_*``).
* ``benchmarks/reproduce_omniglot.py``: every method in 5-way and 20-way 1-shot on a small
  Omniglot folder generated in the published layout (``images_background/<Alphabet>/<character>/*.png``
  and ``images_evaluation/...``), with 10 training characters instead of 1200.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fake_omniglot import write_fake_omniglot

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"_repro_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def finite_ci(entry: dict) -> bool:
    return np.isfinite(entry["mean"]) and entry["ci95"] >= 0


# Expected test MSEs at the tiny sizes the tests run: (mean, sd) over seeds 0-7, measured with the
# test's own command plus ``--seed s`` (torch 2.13, CPU, one thread). The tests run seed 0 and allow
# SPREAD standard deviations (a band of about ±16-20%): a wrong metric (RMSE would be ~1.9), a wrong
# amplitude or phase range, a loss summed instead of averaged, or adaptation on the wrong points is
# far outside it. The spread is that of the initialisation and the first meta-batches (a few
# iterations: the networks are nearly untrained); the test tasks are fixed.
SPREAD = 4.0
EXPECTED_MAML = {  # maml --iterations 5 --test-tasks 6
    ("MAML", "0"): (4.245, 0.211), ("MAML", "1"): (3.951, 0.172), ("MAML", "5"): (3.941, 0.144),
    ("MAML", "10"): (4.036, 0.157), ("pretrained", "0"): (4.287, 0.262), ("pretrained", "1"): (3.966, 0.172),
    ("pretrained", "5"): (3.944, 0.137), ("pretrained", "10"): (4.038, 0.152),
}
EXPECTED_METASGD = {  # metasgd --iterations 3 --test-tasks 4 --shots 5,10
    ("Meta-SGD", "5", "0"): (3.708, 0.193), ("Meta-SGD", "5", "1"): (4.168, 0.307),
    ("Meta-SGD", "10", "0"): (3.297, 0.133), ("Meta-SGD", "10", "1"): (3.422, 0.409),
    ("MAML", "5", "0"): (3.622, 0.150), ("MAML", "5", "1"): (3.672, 0.161),
    ("MAML", "10", "0"): (3.240, 0.101), ("MAML", "10", "1"): (3.073, 0.097),
}
EXPECTED_FAMILY = {  # family --iterations 3 --test-tasks 4
    ("MAML", "0"): (3.623, 0.143), ("MAML", "1"): (3.675, 0.154), ("MAML", "5"): (3.707, 0.177),
    ("MAML", "10"): (3.661, 0.160), ("FOMAML", "0"): (3.617, 0.138), ("FOMAML", "1"): (3.670, 0.150),
    ("FOMAML", "5"): (3.704, 0.176), ("FOMAML", "10"): (3.660, 0.164), ("ANIL", "0"): (3.622, 0.141),
    ("ANIL", "1"): (3.651, 0.150), ("ANIL", "5"): (3.738, 0.176), ("ANIL", "10"): (3.752, 0.184),
    ("Reptile", "0"): (3.488, 0.056), ("Reptile", "1"): (3.516, 0.100), ("Reptile", "5"): (3.560, 0.083),
    ("Reptile", "10"): (3.538, 0.096),
}


def assert_within_spread(results: dict, expected: dict) -> None:
    for path, (mean, sd) in expected.items():
        entry = results
        for key in path:
            entry = entry[key]
        value = entry["mean"]
        assert abs(value - mean) <= SPREAD * sd, f"{'/'.join(path)}: test MSE {value:.4f}, expected {mean} ± {SPREAD} × {sd}"


# =============================================================================================
# Sinusoid
# =============================================================================================

def test_sinusoid_maml(tmp_path, capsys):
    sinusoid = load("reproduce_sinusoid")
    path = tmp_path / "maml.json"
    sinusoid.main(["maml", "--iterations", "5", "--test-tasks", "6", "--json", str(path)])
    out = capsys.readouterr().out
    assert "| method | 0 steps | 1 step | 5 steps | 10 steps | paper (1 / 5 / 10) |" in out
    assert "| MAML |" in out and "| pretrained |" in out and "0.67 / 0.38 / 0.35" in out
    assert "wall time (s): MAML meta-training" in out
    data = json.loads(path.read_text())
    assert data["experiment"] == "maml" and data["iterations"] == 5 and data["test_tasks"] == 6
    assert set(data["results"]) == {"MAML", "pretrained"}
    for summary in data["results"].values():
        assert set(summary) == {"0", "1", "5", "10"}
        assert all(finite_ci(e) and e["tasks"] == 6 for e in summary.values())
    assert data["paper"]["pretrained"] == {"1": 2.41, "5": 2.23, "10": 2.19}
    assert data["machine"]["threads"] == 1 and data["machine"]["torch"] == torch.__version__
    assert data["seconds"]["MAML meta-training"] > 0
    assert_within_spread(data["results"], EXPECTED_MAML)
    assert data["results"]["MAML"]["1"]["mean"] < data["results"]["MAML"]["0"]["mean"]  # so in 8 seeds of 8


def test_sinusoid_metasgd(tmp_path, capsys):
    sinusoid = load("reproduce_sinusoid")
    path = tmp_path / "metasgd.json"
    sinusoid.main(["metasgd", "--iterations", "3", "--test-tasks", "4", "--shots", "5,10", "--json", str(path)])
    out = capsys.readouterr().out
    assert "| method | K = 5 | K = 10 |" in out
    assert "| Meta-SGD (paper) | 0.90 ± 0.16 | 0.53 ± 0.09 |" in out
    data = json.loads(path.read_text())
    assert set(data["results"]) == {"Meta-SGD", "MAML"}
    for method in ("Meta-SGD", "MAML"):
        assert set(data["results"][method]) == {"5", "10"}
        assert all(finite_ci(data["results"][method][k]["1"]) for k in ("5", "10"))
    assert set(data["metasgd_lower"]) == {"5", "10"}
    assert_within_spread(data["results"], EXPECTED_METASGD)


def test_sinusoid_family(tmp_path, capsys):
    sinusoid = load("reproduce_sinusoid")
    path = tmp_path / "family.json"
    sinusoid.main(["family", "--iterations", "3", "--test-tasks", "4", "--json", str(path)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "±" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["MAML", "FOMAML", "ANIL", "Reptile"]
    data = json.loads(path.read_text())
    assert list(data["results"]) == ["MAML", "FOMAML", "ANIL", "Reptile"]
    for summary in data["results"].values():
        assert set(summary) == {"0", "1", "5", "10"} and all(finite_ci(e) for e in summary.values())
    assert_within_spread(data["results"], EXPECTED_FAMILY)


def test_sinusoid_anil_stability(tmp_path, capsys):
    """The head's curvature bound alpha * lambda_max < 2 splits the test tasks, and the written-out
    gradient descent on the head equals ANIL's own fine-tuning (diffopt.training.evaluate)."""
    sinusoid = load("reproduce_sinusoid")
    path = tmp_path / "anil.json"
    sinusoid.main(["anil-stability", "--iterations", "20", "--test-tasks", "12", "--json", str(path)])
    out = capsys.readouterr().out
    assert "| alpha * lambda_max < 2 (stable) |" in out and "| alpha * lambda_max >= 2 (diverges) |" in out
    data = json.loads(path.read_text())["results"]
    assert len(data["curvature"]) == len(data["query_mse_10_steps"]) == 12
    assert all(c > 0 for c in data["curvature"])
    assert abs(data["mean_10_steps"] - data["mean_10_steps_library"]) <= 1e-5 * data["mean_10_steps_library"]


# =============================================================================================
# Omniglot on a generated folder
# =============================================================================================

@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory) -> Path:
    """16 characters (10 for training, 6 for testing: 24 test classes with rotations), 6 drawings each."""
    root = tmp_path_factory.mktemp("omniglot_repro")
    write_fake_omniglot(root, {"images_background": 2, "images_evaluation": 2}, characters=4, drawings=6)
    return root


def test_omniglot_all_methods_and_settings(tmp_path, capsys, omniglot_root):
    omniglot = load("reproduce_omniglot")
    path = tmp_path / "omniglot.json"
    omniglot.main(["--data-root", str(omniglot_root), "--omniglot-train-classes", "10", "--iterations", "1",
                   "--settings", "5w1s,20w1s",
                   "--test-tasks", "2", "--query", "1", "--meta-batch", "1", "--protonet-train-query", "1",
                   "--json", str(path)])
    out = capsys.readouterr().out
    header = "| method | 5-way 1-shot | 20-way 1-shot |"
    assert header in out
    data = json.loads(path.read_text())
    assert (data["train_characters"], data["test_characters"]) == (10, 6)
    assert len(data["rows"]) == 5 * 2
    for row in data["rows"]:
        assert row["method"] in omniglot.METHODS and row["setting"] in omniglot.SETTINGS
        assert 0.0 <= row["accuracy"]["mean"] <= 100.0 and row["accuracy"]["ci95"] >= 0
        assert row["accuracy"]["tasks"] == 2
        assert row["paper"] == omniglot.PAPER[row["method"]][row["setting"]][0]
    settings = {(r["method"], r["setting"]): r["settings"] for r in data["rows"]}
    assert settings["maml", "5w1s"]["inner_lr"] == 0.4 and settings["maml", "5w1s"]["test_steps"] == 3
    assert settings["maml", "20w1s"]["inner_lr"] == 0.1 and settings["maml", "20w1s"]["train_steps"] == 5
    assert settings["protonet", "5w1s"]["train_ways"] == 40  # min(60, 10 characters × 4 rotations)
    table_rows = [line for line in out.splitlines() if line.startswith("| ") and "paper" in line]
    assert len(table_rows) == 5 and "MAML | " in table_rows[0] and "(paper 98.7 ± 0.4)" in table_rows[0]


def test_omniglot_protocol_network_and_defaults():
    omniglot = load("reproduce_omniglot")
    net = omniglot.maml_network(20)
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 20)
    assert sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in net.modules()) == 4
    assert all(not m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert omniglot.maml_protocol(5) == {"inner_lr": 0.4, "train_steps": 1, "test_steps": 3, "meta_batch": 32}
    assert omniglot.maml_protocol(20) == {"inner_lr": 0.1, "train_steps": 5, "test_steps": 5, "meta_batch": 16}
    args = omniglot.parser().parse_args(["--data-root", "x"])
    assert args.iterations == 60000 and args.test_tasks == 600
