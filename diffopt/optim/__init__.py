"""Differentiable optimizers: exact, differentiable twins of ``torch.optim``.

Each optimizer is a pure update rule (``init_state`` / ``update_one`` over
tensors, nothing in place, plus ``update_group``: the same step for a whole
parameter group in multi-tensor ``torch._foreach_*`` operations, taken when the
group's hyperparameters are plain numbers and bit-identical to torch.optim in
float32 and float64) wrapped by a thin stateful class whose ``step(loss)``
returns the new parameters on the autograd graph::

    opt = diffopt.optim.Adam(params, lr=torch.tensor(1e-2, requires_grad=True))
    for _ in range(50):
        params = opt.step(loss_fn(params))
    loss_fn(params).backward()   # gradients reach the initial params and lr
"""
from ._hyper import PerParameter, Schedule
from ._rule import UpdateRule, safe_sqrt, safe_sqrt_all
from .adadelta import Adadelta, AdadeltaRule
from .adafactor import Adafactor, AdafactorRule
from .adagrad import Adagrad, AdagradRule
from .adam import Adam, AdamRule, AdamW
from .adamax import Adamax, AdamaxRule
from .asgd import ASGD, ASGDRule
from .convert import TWINS, from_torch
from .lbfgs import LBFGS, lbfgs_solve
from .nadam import NAdam, NAdamRule
from .muon import Muon, MuonRule, newton_schulz
from .optimizer import DifferentiableOptimizer, NonFiniteError
from .radam import RAdam, RAdamRule
from .rmsprop import RMSprop, RMSpropRule
from .rprop import Rprop, RpropRule
from .sgd import SGD, SGDRule
from .transforms import clip_grad_norm, clip_grad_value
from . import lr_scheduler  # noqa: E402  (differentiable twins of torch.optim.lr_scheduler)

OPTIMIZERS: dict[str, type[DifferentiableOptimizer]] = {
    cls.__name__: cls for cls in (SGD, Adam, AdamW, Adagrad, Adadelta, Adamax, NAdam, RAdam, RMSprop, Rprop, ASGD,
                                 Adafactor, Muon)
}

__all__ = [
    "ASGD", "ASGDRule", "Adadelta", "AdadeltaRule", "Adafactor", "AdafactorRule", "Adagrad", "AdagradRule", "Adam",
    "AdamRule", "AdamW", "Adamax", "AdamaxRule", "DifferentiableOptimizer", "LBFGS", "Muon", "MuonRule", "NAdam",
    "NAdamRule", "NonFiniteError", "OPTIMIZERS", "PerParameter", "RAdam", "RAdamRule", "RMSprop", "RMSpropRule",
    "Rprop", "RpropRule", "SGD", "SGDRule", "Schedule", "TWINS", "UpdateRule", "clip_grad_norm", "clip_grad_value",
    "from_torch", "lbfgs_solve", "lr_scheduler", "newton_schulz", "safe_sqrt", "safe_sqrt_all",
]


def __getattr__(name: str) -> object:
    # ``diffopt.optim.learned`` loads on first use, so ``import diffopt`` then
    # ``diffopt.optim.learned.load(...)`` works as the README writes it.
    if name == "learned":
        import importlib

        return importlib.import_module(".learned", __name__)
    raise AttributeError(f"module 'diffopt.optim' has no attribute {name!r}")
