"""Shared pytest configuration for the diffopt test suite.

* hypothesis profiles: ``default`` (no deadline: first calls into torch are slow),
  ``ci`` (derandomized, reproducible) and ``thorough``; pick one with the
  ``HYPOTHESIS_PROFILE`` environment variable (``ci`` is the default when ``CI`` is
  set). The whole session runs with one intra-op thread. Tests set their own modest
  ``max_examples``; scale them with ``DIFFOPT_TEST_SCALE`` (see tests/strategies.py).
* every test runs with torch's default dtype restored afterwards;
  ``default_dtype`` parametrizes a test over float64 and float32 defaults;
  ``single_thread`` runs a test with one intra-op thread (tiny tensors).
* ``DIFFOPT_ERROR_REPORT=1`` prints the worst parity / finite-difference errors
  that the tests recorded (``strategies.record``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

settings.register_profile("default", deadline=None, print_blob=True)
settings.register_profile("ci", deadline=None, print_blob=True, derandomize=True)
settings.register_profile(
    "thorough", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
# CI (CI=true) runs derandomized so that a landing never depends on the draw; locally each run
# searches new examples.
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default"))


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """The suite's tensors are tiny: one intra-op thread is faster, and steady on a shared machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    """Whatever a test does to torch's default dtype is undone afterwards."""
    saved = torch.get_default_dtype()
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


@pytest.fixture
def single_thread():
    """Run the test with one intra-op thread (restored after).

    Tests on tiny tensors gain nothing from torch's thread pool, and on a shared
    2-core machine waking it costs 10-300x per op (measured: cross_entropy forward
    + backward on a 6x5 tensor, 0.6 ms with 2 threads under load vs 0.04 ms with 1).
    Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(params=[torch.float64, torch.float32], ids=["default-f64", "default-f32"])
def default_dtype(request):
    """Run the test with torch's default dtype set to float64, then to float32 (restored after)."""
    torch.set_default_dtype(request.param)
    return request.param


@pytest.fixture
def float64_default():
    """Run the test with torch's default dtype set to float64 (restored after)."""
    torch.set_default_dtype(torch.float64)
    return torch.float64


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if os.environ.get("DIFFOPT_ERROR_REPORT") != "1":
        return
    try:
        from strategies import COUNTS, MEASURED
    except ImportError:
        return
    if not MEASURED and not COUNTS:
        return
    terminalreporter.section("worst measured errors")
    for (kind, name), value in sorted(MEASURED.items()):
        terminalreporter.write_line(f"{kind:<34} {name:<10} {value:.3e}")
    for (kind, name), count in sorted(COUNTS.items()):
        terminalreporter.write_line(f"{kind:<34} {name:<10} {count} example(s)")
