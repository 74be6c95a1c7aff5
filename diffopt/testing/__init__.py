"""Prove gradients right: checks, closed-form references and hypothesis strategies.

* :func:`check_hypergradient`, :func:`check_optimizer`, :func:`check_modes` — each
  returns :class:`Report` objects (``passed``, ``worst_error``, ``where``, notes).
* :mod:`diffopt.testing.closed_form` — exact hypergradients of quadratic inner
  problems under SGD with momentum, and of ridge regression (implicit).
* :mod:`diffopt.testing.strategies` — hypothesis strategies (needs ``hypothesis``).
* :mod:`diffopt.testing.faulty` — known-wrong optimizers the checks must flag.

On the command line: ``diffopt check`` (``--thorough``; ``--optimizer module:Class``).
"""
from .checks import Report, check_hypergradient, check_modes, check_optimizer
from .closed_form import QuadraticHypergradients, RidgeHypergradients, quadratic_sgd, ridge
from .finite_differences import central_difference, relative_error

__all__ = [
    "QuadraticHypergradients", "Report", "RidgeHypergradients", "central_difference", "check_hypergradient",
    "check_modes", "check_optimizer", "quadratic_sgd", "relative_error", "ridge",
]


def __getattr__(name: str) -> object:
    # ``diffopt.testing.strategies`` (needs hypothesis) and ``faulty`` load on first use.
    if name in ("strategies", "faulty"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'diffopt.testing' has no attribute {name!r}")
