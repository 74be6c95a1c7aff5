"""The shape rule every per-task input obeys: ``(tasks, examples, *features)``.

A single task's tensors passed without the task dimension are the commonest port
error (learn2learn's and higher's scripts hold one task at a time): sine inputs
of shape ``(10, 1)`` would be read as ten tasks of one scalar each, and train
without a word. Floating-point inputs therefore need at least three dimensions;
integer inputs (token ids, shape ``(tasks, examples)``) may have two.
"""
from __future__ import annotations

from torch import Tensor

__all__ = ["no_example_dimension"]


def no_example_dimension(x: Tensor, what: str) -> None:
    """Refuse floating-point ``x`` of shape ``(a, b)``: it has no example dimension.

    Such a tensor is either one task's ``(examples, features)`` read as ``a`` tasks,
    or ``a`` tasks of ``b`` scalar examples; both are spelled with a trailing or
    leading dimension (``x[None]`` for one task, ``x[..., None]`` for scalar examples).
    """
    if x.dim() == 2 and (x.is_floating_point() or x.is_complex()):
        a, b = x.shape
        raise ValueError(
            f"{what}: floating-point inputs of shape {(a, b)} have no example dimension: they would be read "
            f"as {a} tasks of one {b}-feature input each. Inputs are (tasks, examples, *features): for a "
            f"single task of {a} examples pass x[None] (shape {(1, a, b)}), and its targets y[None]; for "
            f"{a} tasks of {b} scalar examples pass x[..., None] (shape {(a, b, 1)}). "
            "Integer token inputs may be (tasks, examples)."
        )
