"""Meta-learning algorithms built on the inner-loop engine.

Gradient-based: :class:`MAML` (any engine mode), :class:`FOMAML`, :class:`iMAML`,
:class:`MetaSGD`, :class:`MAMLPlusPlus`, :class:`ANIL`, :class:`Reptile`.
Metric-based: :class:`PrototypicalNetwork`, :class:`MatchingNetwork`, :class:`SiameseNetwork`.
Every learner takes tensors with a leading task dimension.
"""
from ._base import InnerLoopLearner, MetaLearner, accuracy
from .anil import ANIL
from .maml import FOMAML, MAML, MAMLPlusPlus, MetaSGD, iMAML
from .metric import MatchingNetwork, PrototypicalNetwork, SiameseNetwork
from .reptile import Reptile

__all__ = [
    "ANIL", "FOMAML", "InnerLoopLearner", "MAML", "MAMLPlusPlus", "MatchingNetwork", "MetaLearner", "MetaSGD",
    "PrototypicalNetwork", "Reptile", "SiameseNetwork", "accuracy", "iMAML",
]
