"""The inner-loop engine: task-batched unrolls over higher's patched models, and
meta-gradients in every mode (see :mod:`diffopt.unroll.engine`)."""
from .carry import Carry
from .engine import MODES, Adapted, InnerLoop
from .functional import FunctionalModel, ParameterLayout
from .patched import BATCHNORM_POLICIES, PatchedModel, choose_vectorize
from .solvers import SolveInfo, conjugate_gradient, neumann

__all__ = [
    "BATCHNORM_POLICIES", "MODES", "Adapted", "Carry", "FunctionalModel", "InnerLoop", "ParameterLayout",
    "PatchedModel", "SolveInfo",
    "choose_vectorize", "conjugate_gradient", "neumann",
]
