"""Learned update rules and learned optimizers: ``diffopt.optim.learned``.

Update rules (pure, differentiable, vectorised over tasks; each a
:class:`~diffopt.optim.DifferentiableOptimizer` whose learned tensors are
tensor hyperparameters, so every :class:`diffopt.unroll.InnerLoop` mode
differentiates them):

* :func:`meta_sgd` / :func:`per_layer_per_step` — learned per-element (Meta-SGD)
  and per-layer per-step (MAML++) learning rates of SGD;
* :class:`MetaCurvature` — a learned Kronecker-factored preconditioner per layer;
* :class:`LSTMOptimizer` — the coordinate-wise LSTM of Andrychowicz et al. (2016);
* :class:`MLPOptimizer` — a per-coordinate MLP on gradient-history features;
* :class:`HypergradientSGD` / :class:`HypergradientAdam` — learning rates adapted
  online by their hypergradient (Baydin et al., 2018).

Saving (:func:`save`) in a versioned, code-free format, and use in a plain
loop like a torch.optim optimizer::

    opt = diffopt.optim.learned.load("rule.pt", model.parameters())
    loss.backward(); opt.step(); opt.zero_grad()

Meta-training learned rules (:class:`~diffopt.training.OptimizerTrainer`,
``diffopt train-optimizer``) and its task families live one layer up, in
:mod:`diffopt.training.learned_optimizers` and :mod:`diffopt.training.families`
(they run the inner-loop engine and draw tasks, which the optimizers must not
import). Their names stay importable from here as a compatibility re-export:
they are resolved on first access by the module-level ``__getattr__`` below,
so ``import diffopt.optim`` never loads the training stack.
"""
import importlib
from typing import Any

from ._base import LearnedOptimizer, LearnedRule
from .curvature import MetaCurvature, MetaCurvatureRule
from .dropin import DropInOptimizer, load
from .factory import RULES, make_rule
from .hypergradient import HypergradientAdam, HypergradientAdamRule, HypergradientSGD, HypergradientSGDRule
from .lr import LearnedSGD, meta_sgd, per_layer_per_step
from .lstm import LSTM_FEATURES, LSTMOptimizer, LSTMRule, LSTMRuleNet, preprocess_gradient
from .mlp import MLP_FEATURES, MLPOptimizer, MLPRule, MLPRuleNet
from .serialization import (FORMAT, VERSION, LearnedRuleError, SavedRule, build, load_differentiable, read, save,
                            transfer)

# Compatibility re-export (see the module docstring): legacy name -> the module that now defines it.
_MOVED = {
    **dict.fromkeys(("MODES", "OBJECTIVES", "OptimizerTrainer", "TrainConfig", "Unroll", "loss_curves"),
                    "diffopt.training.learned_optimizers"),
    **dict.fromkeys(("FAMILIES", "FewShotFamily", "QuadraticFamily", "SinusoidFamily", "TaskBatch", "TaskFamily",
                     "family"), "diffopt.training.families"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        value = getattr(importlib.import_module(_MOVED[name]), name)
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MOVED))


# The moved names stay in __all__ (a star import keeps giving them, and loads diffopt.training then).
__all__ = [
    "FAMILIES", "FORMAT", "MODES", "RULES", "VERSION", "DropInOptimizer", "FewShotFamily",
    "HypergradientAdam", "HypergradientAdamRule", "HypergradientSGD", "HypergradientSGDRule", "LSTM_FEATURES",
    "LSTMOptimizer", "LSTMRule", "LSTMRuleNet", "LearnedOptimizer", "LearnedRule", "LearnedRuleError", "LearnedSGD",
    "MLPOptimizer", "MLPRule", "MLPRuleNet", "MLP_FEATURES", "MetaCurvature", "MetaCurvatureRule", "OptimizerTrainer",
    "QuadraticFamily", "SavedRule", "SinusoidFamily", "TaskBatch", "TaskFamily", "TrainConfig", "Unroll", "build",
    "family", "load", "load_differentiable", "loss_curves", "make_rule", "meta_sgd", "per_layer_per_step",
    "preprocess_gradient", "read", "save", "transfer",
]
