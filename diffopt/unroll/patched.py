"""The functional model under the inner loop (kept for its import path).

Everything here lives in :mod:`diffopt.unroll.functional`, the one functional-model
stack shared by the engine and the diagnostics. ``PatchedModel`` is
:class:`~diffopt.unroll.functional.FunctionalModel` (higher's monkeypatched
copy by default, ``torch.func.functional_call`` with ``backend="functional_call"``).
"""
from __future__ import annotations

from .functional import (
    BATCHNORM_POLICIES,
    BUFFER_NAMES,
    UNBATCHABLE,
    FunctionalModel,
    choose_vectorize,
    count_convolutions,
    describe_vmap_failure,
    vectorization_blockers,
)

PatchedModel = FunctionalModel

__all__ = [
    "BATCHNORM_POLICIES", "BUFFER_NAMES", "UNBATCHABLE", "PatchedModel", "choose_vectorize", "count_convolutions",
    "describe_vmap_failure", "vectorization_blockers",
]
