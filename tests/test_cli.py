"""The ``diffopt`` command line: ``--version``, ``--help`` and ``demo``, in-process and as ``python -m diffopt``."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import diffopt
from diffopt.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def run_module(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "diffopt", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def test_version_in_process(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"diffopt {diffopt.__version__}"
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?([.-]?\w+)*", diffopt.__version__)


def test_help_in_process_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: diffopt")
    assert "--version" in out and "demo" in out
    assert "Differentiable optimization for PyTorch" in out


def test_no_command_prints_help_and_succeeds(capsys):
    assert main([]) == 0
    assert "usage: diffopt" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err


def test_demo_help_documents_its_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--iterations", "--seed", "--plot"):
        assert option in out
    assert "demo" in build_parser().format_help()


def test_python_dash_m_diffopt_version():
    version = run_module("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"diffopt {diffopt.__version__}"


def test_demo_runs(capsys):
    """A shortened demo end to end (the full one is the README's first command; ``python -m diffopt``
    itself is exercised by the ``--version`` test above)."""
    assert main(["demo", "--iterations", "3", "--plot", "", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "diffopt demo" in out
    table = [line for line in out.splitlines() if line.startswith("| MAML") or line.startswith("| pretrained")]
    assert len(table) == 2
    for line in table:
        means = [float(cell.split("±")[0]) for cell in line.strip("|").split("|")[1:]]
        assert len(means) == 4 and all(m > 0 and m == m for m in means)
