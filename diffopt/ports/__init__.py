"""Peers' APIs over diffopt's optimizers, so that a peer's script ports by its import line.

* :mod:`diffopt.ports.learn2learn` — learn2learn's ``algorithms.MAML`` / ``algorithms.MetaSGD``
  (``clone()``, ``adapt(loss)``, ``learner(x)``): ``import diffopt.ports.learn2learn as l2l``.

higher's ``innerloop_ctx`` is :func:`diffopt.innerloop` (no port needed), and torchopt's
stateful differentiable optimizers are :mod:`diffopt.optim`'s; the porting guides
(``docs/porting/``) map every idiom. These ports are the familiar path; the
task-batched :class:`diffopt.algorithms.MAML` ``.meta_loss`` is the fast one.

The classes live here, not in :mod:`diffopt.algorithms`, because they keep the peer's
names and signatures (``MAML(model, lr)``), which differ from diffopt's
(``MAML(model, loss_fn, inner_lr=...)``), and because the package mirrors the peer's
module layout (``l2l.algorithms.MAML``) one to one.
"""
from . import learn2learn

__all__ = ["learn2learn"]
