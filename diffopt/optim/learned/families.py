"""Compatibility shim: the learned-optimizer task families moved to :mod:`diffopt.training.families`.

``diffopt.optim.learned.families`` was their path before the layers were
separated; this module is loaded only when imported by that name (never by
``import diffopt.optim``), so the optimizers still import nothing above them.
"""
from ...training.families import *  # noqa: F401,F403
from ...training.families import __all__  # noqa: F401
