"""Every exception diffopt raises on purpose, in one place.

``from diffopt.errors import NonFiniteError, CheckpointError`` works wherever an error
comes from; each is also importable from the module that raises it. Built-in
exceptions (``ValueError`` for a bad argument, ``TypeError`` for a wrong type) are used
as Python does; the classes here are for conditions a caller may want to catch apart.
All of them subclass the built-in a caller would otherwise catch, so ``except
ValueError`` still catches a :class:`CheckpointError`.
"""
from __future__ import annotations

__all__ = [
    "CheckpointError", "DistributedError", "LearnedRuleError", "LinearSolveError", "LinearSolveWarning",
    "NonFiniteError", "NotApplicable", "OmniglotLayoutError", "OptimalityResidualError",
    "OptimalityResidualWarning", "PeerFailure", "PngError", "SecondOrderUnavailable",
]


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or infinite during an inner step."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this run (format, version or configuration)."""


class LearnedRuleError(ValueError):
    """A saved learned rule that cannot be used here (format, version, kind, features or shapes)."""


class SecondOrderUnavailable(RuntimeError):
    """The model's loss cannot be differentiated twice (needed by curvature and meta-gradient diagnostics)."""


class NotApplicable(ValueError):
    """The learner has no inner loop (metric-based): the adaptation diagnostics are undefined for it."""


class DistributedError(RuntimeError):
    """A configuration problem between ranks (world size, seed, configuration, backend)."""


class PeerFailure(RuntimeError):
    """Another rank died or stopped responding."""


class OmniglotLayoutError(FileNotFoundError):
    """The Omniglot folder is missing or not in the published layout."""


class PngError(ValueError):
    """A PNG file is malformed or uses a feature this reader does not support."""


class LinearSolveError(RuntimeError):
    """An implicit-differentiation linear solve stopped above its tolerance (``on_fail="raise"``)."""


class LinearSolveWarning(RuntimeWarning):
    """An implicit-differentiation linear solve stopped above its tolerance (``on_fail="warn"``)."""


class OptimalityResidualError(ValueError):
    """A solver returned a point where its optimality condition is far from zero (``on_residual="raise"``)."""


class OptimalityResidualWarning(RuntimeWarning):
    """A solver returned a point where its optimality condition is far from zero (``on_residual="warn"``)."""
