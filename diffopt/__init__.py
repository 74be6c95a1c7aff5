"""diffopt: differentiable optimization for PyTorch.

Optimization steps that autograd can see through, so a loss after training can
be differentiated with respect to what came before it: initial weights,
learning rates and other hyperparameters, or a learned update rule.
"""
from . import optim
from ._version import __version__
from .innerloop import innerloop

__all__ = ["__version__", "innerloop", "optim"]
