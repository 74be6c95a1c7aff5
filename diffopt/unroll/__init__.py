"""The inner-loop engine: task-batched unrolls over functional models, and
meta-gradients in every mode (see :mod:`diffopt.unroll.engine`,
:mod:`diffopt.unroll.modes` and :mod:`diffopt.unroll.functional`)."""
from .adapters import LoRALinear, PaddedSequences, add_lora, select_parameters
from .attention import double_differentiable
from .carry import Adapted, Carry
from .engine import InnerLoop
from .functional import FunctionalModel, ParameterLayout
from .modes import (ES, MODES, PES, Checkpointed, FirstOrder, Forward, Implicit, Mode, SecondOrder, Truncated,
                    as_mode)
from .patched import BATCHNORM_POLICIES, PatchedModel, choose_vectorize
from .solvers import (CG, GMRES, MINRES, Dense, Neumann, NormalCG, SolveInfo, conjugate_gradient, neumann,
                      normal_conjugate_gradient)

__all__ = [
    "BATCHNORM_POLICIES", "CG", "Dense", "ES", "GMRES", "MINRES", "MODES", "PES", "Adapted", "Carry", "Checkpointed", "FirstOrder", "Forward",
    "FunctionalModel", "Implicit", "InnerLoop", "LoRALinear", "Mode", "Neumann", "NormalCG", "PaddedSequences",
    "ParameterLayout",
    "PatchedModel", "SecondOrder", "SolveInfo", "Truncated", "add_lora", "as_mode", "choose_vectorize",
    "conjugate_gradient", "double_differentiable", "neumann", "normal_conjugate_gradient", "select_parameters",
]
