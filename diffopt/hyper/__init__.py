"""Hypergradients inside ordinary training loops.

* :class:`OnlineTuner` — tune an optimizer's learning rate, weight decay, momentum / betas (global,
  per group or per element) or a scheduler's parameters by hypergradients of a validation loss while
  it trains (reverse mode, forward mode or PES over truncated windows); :func:`hypergradient` and
  :func:`window_loss`, the same hypergradient of one window as a function.
"""
from ._hyperparameters import Tuned
from ._window import hypergradient, window_loss
from .tuner import OnlineTuner

__all__ = ["OnlineTuner", "Tuned", "hypergradient", "window_loss"]
