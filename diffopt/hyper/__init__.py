"""Hypergradients inside ordinary training loops.

* :class:`OnlineTuner` — tune an optimizer's learning rate, weight decay, momentum / betas (global,
  per group or per element) or a scheduler's parameters by hypergradients of a validation loss while
  it trains (reverse mode, forward mode or PES over truncated windows); :func:`hypergradient` and
  :func:`window_loss`, the same hypergradient of one window as a function.
* :mod:`diffopt.hyper.reweight` — learning to reweight training examples from a small clean set:
  :class:`LearningToReweight` (Ren et al. 2018) and :class:`MetaWeightNet` (Shu et al. 2019), each a
  learner with ``step(x, y)`` for your own model, optimizer and data.
"""
from ._hyperparameters import Tuned
from ._window import hypergradient, window_loss
from .reweight import LearningToReweight, MetaWeightNet, ReweightStep, WeightNet
from .tuner import LinearWarmup, OnlineTuner

__all__ = ["LearningToReweight", "LinearWarmup", "MetaWeightNet", "OnlineTuner", "ReweightStep", "Tuned", "WeightNet",
           "hypergradient", "window_loss"]
