"""Meta-training: the loop, evaluation with confidence intervals, atomic checkpoints
and exact resume (:mod:`.trainer`); meta-training learned optimizers and their task
families (:mod:`.learned_optimizers`, :mod:`.families`); building and running what
``diffopt train`` asks for (:mod:`.experiment`) and the sinusoid demonstration
(:mod:`.demo`).

Everything ``diffopt.training`` exported as a module is exported here.
"""
from .families import FAMILIES, FewShotFamily, QuadraticFamily, SinusoidFamily, TaskBatch, TaskFamily, family
from .learned_optimizers import OBJECTIVES, OptimizerTrainer, TrainConfig, Unroll, loss_curves
from .trainer import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    Batch,
    CheckpointError,
    TaskSource,
    Trainer,
    config_differences,
    evaluate,
    iteration_generator,
    load_checkpoint,
    outer_adam,
    save_checkpoint,
    summary_text,
)

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "FAMILIES", "OBJECTIVES", "Batch",
    "CheckpointError", "FewShotFamily", "OptimizerTrainer", "QuadraticFamily", "SinusoidFamily", "TaskBatch",
    "TaskFamily", "TaskSource", "TrainConfig", "Trainer", "Unroll", "config_differences", "evaluate", "family",
    "iteration_generator", "load_checkpoint", "loss_curves", "outer_adam", "save_checkpoint", "summary_text",
]
