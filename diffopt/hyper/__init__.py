"""Hypergradients inside ordinary training loops.

:mod:`diffopt.hyper.reweight`: learning to reweight training examples from a small clean set —
:class:`LearningToReweight` (Ren et al. 2018) and :class:`MetaWeightNet` (Shu et al. 2019), each a
learner with ``step(x, y)`` for your own model, optimizer and data.
"""
from .reweight import LearningToReweight, MetaWeightNet, ReweightStep, WeightNet

__all__ = ["LearningToReweight", "MetaWeightNet", "ReweightStep", "WeightNet"]
