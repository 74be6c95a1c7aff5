"""learn2learn's per-task API over diffopt: ``import diffopt.ports.learn2learn as l2l``.

``l2l.algorithms.MAML(model, lr, first_order=False, allow_unused=None, allow_nograd=False)``
and ``l2l.algorithms.MetaSGD(model, lr=1.0, first_order=False, lrs=None)`` behave as
learn2learn's (``clone()``, ``adapt(loss)``, ``learner(x)``, ``learner.module``); each
``adapt`` is one step of :class:`diffopt.optim.SGD` (Meta-SGD: of
:func:`diffopt.optim.learned.meta_sgd`'s rule), which never writes in place. Only these two
are ported: not learn2learn's ``GBML``, Lightning wrappers, ``maml_update`` / ``meta_sgd_update``,
``clone_module``, nor its data, vision and gym helpers.
"""
from . import algorithms
from .algorithms import MAML, MetaSGD

__all__ = ["MAML", "MetaSGD", "algorithms"]
