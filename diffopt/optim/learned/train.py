"""Compatibility shim: meta-training of learned rules moved to :mod:`diffopt.training.learned_optimizers`.

``diffopt.optim.learned.train`` was its path before the layers were separated;
this module is loaded only when imported by that name (never by
``import diffopt.optim``), so the optimizers still import nothing above them.
"""
from ...training.learned_optimizers import *  # noqa: F401,F403
from ...training.learned_optimizers import __all__  # noqa: F401
