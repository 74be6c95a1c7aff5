r"""Meta-Curvature (Park & Oliva, 2019): gradient descent with a learned Kronecker-factored preconditioner.

For a weight of shape ``(out, d_1, ..., d_k)``, viewed as the matrix
:math:`W \in \mathbb{R}^{out \times in}` with :math:`in = d_1 \cdots d_k` (a
convolution kernel ``(out, c, kh, kw)`` becomes ``(out, c·kh·kw)``):

.. math::
    W \leftarrow W - \gamma\, M_{out}\, G\, M_{in},
    \qquad M = \exp\!\bigl(\tfrac12 (B + B^\top)\bigr),

i.e. the preconditioner :math:`M_{in}^\top \otimes M_{out}` acts on
:math:`\mathrm{vec}(G)`. A bias (any 1-D parameter) uses one full matrix
:math:`M = \exp(\mathrm{sym}(B))` (``bias="full"``) or a diagonal
:math:`\mathrm{diag}(e^{s})` (``bias="diagonal"``); a scalar parameter uses
:math:`e^{s}`.

Why this parametrisation: the matrix exponential of a symmetric matrix is
symmetric positive definite for every ``B``, so the preconditioner is always
invertible and never flips a descent direction (:math:`\langle G, M_{out} G M_{in}\rangle > 0`
for ``G ≠ 0``), whatever meta-training does to ``B``; ``B = 0`` gives
:math:`M = I`, plain gradient descent, so meta-training starts from SGD.
``torch.linalg.matrix_exp`` is differentiable to every order, so second-order
and forward-mode meta-gradients reach ``B``. (The paper uses unconstrained
matrices initialised at the identity; those can become singular.)

The learned tensors are ``curvature=PerParameter([(B_out, B_in), (B_bias,), ...])``
— one tuple per parameter — and receive gradients in every engine mode. A
parameter whose ``in`` exceeds ``max_factor`` (default 4096) is refused at
construction: its ``in × in`` factor would not fit; pass that parameter in
a group of its own to a different optimizer.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._hyper import PerParameter, resolve
from .._rule import Hyper, State
from ._base import LearnedOptimizer, LearnedRule

__all__ = ["MetaCurvature", "MetaCurvatureRule", "precondition", "spd_exp"]

DEFAULT_MAX_FACTOR = 4096


def spd_exp(raw: Tensor) -> Tensor:
    """``exp(sym(raw))`` for a square matrix, ``exp(raw)`` (element-wise) for a vector."""
    if raw.dim() == 2:
        return torch.linalg.matrix_exp(0.5 * (raw + raw.transpose(-1, -2)))
    return torch.exp(raw)


def factor_shapes(shape: torch.Size | tuple[int, ...], bias: str) -> list[tuple[int, ...]]:
    """The learned tensors' shapes for a parameter of ``shape`` (no task dimension)."""
    if len(shape) == 0:
        return [(1,)]
    if len(shape) == 1:
        return [(shape[0], shape[0])] if bias == "full" else [(shape[0],)]
    rest = math.prod(shape[1:])
    return [(shape[0], shape[0]), (rest, rest)]


def precondition(grad: Tensor, factors: tuple[Tensor, ...], base_dim: int) -> Tensor:
    """``M_out G M_in`` (or ``M g`` / ``e^s ⊙ g``) on the last ``base_dim`` dims of ``grad``."""
    mats = [spd_exp(f) for f in factors]
    batch = grad.shape[: grad.dim() - base_dim]
    if base_dim == 0:
        return grad * mats[0].reshape(())
    if base_dim == 1:
        m = mats[0]
        return grad * m if m.dim() == 1 else (grad.unsqueeze(-2) @ m.transpose(-1, -2)).squeeze(-2)
    shape = grad.shape[grad.dim() - base_dim:]
    matrix = grad.reshape(*batch, shape[0], math.prod(shape[1:]))  # (not -1: a weight may have 0 rows)
    return (mats[0] @ matrix @ mats[1]).reshape(grad.shape)


class MetaCurvatureRule(LearnedRule):
    name = "meta_curvature"
    defaults = {"lr": 0.01, "curvature": None, "weight_decay": 0.0, "maximize": False}
    flags = frozenset({"maximize"})
    structured = ("curvature",)

    def init_state(self, param: Tensor, hp: Hyper) -> State:
        return {}

    def update_one(self, param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
        g = -grad if hp["maximize"] else grad
        if isinstance(hp["weight_decay"], Tensor) or hp["weight_decay"] != 0:
            g = g + hp["weight_decay"] * param
        base_dim = param.dim() - hp["batch_dims"]
        return param - hp["lr"] * precondition(g, tuple(hp["curvature"]), base_dim), state

    def validate_group(self, group: Mapping[str, Any], where: str) -> None:
        super().validate_group(group, where)
        if not isinstance(group.get("curvature"), PerParameter):
            raise TypeError(f"{where}: curvature must be PerParameter([...]) with one tuple of tensors per parameter")

    def check_param(self, group: Mapping[str, Any], param: Tensor, position: int, where: str) -> None:
        factors = resolve(group["curvature"], "curvature", position, 0)
        if not isinstance(factors, tuple) or not all(isinstance(f, Tensor) for f in factors):
            raise TypeError(f"{where}: curvature[{position}] must be a tuple of tensors, got {type(factors).__name__}")
        dims = [tuple(f.shape) for f in factors]
        shape = tuple(param.shape)
        if param.dim() >= 2:
            out, rest = shape[0], math.prod(shape[1:])
            expected = [[(out, out), (rest, rest)]]
            hint = f"(M_out {out}×{out}, M_in {rest}×{rest}; the parameter is viewed as ({out}, {rest}))"
        elif param.dim() == 1:
            expected = [[(shape[0], shape[0])], [(shape[0],)]]
            hint = f"(a full {shape[0]}×{shape[0]} matrix or a diagonal of {shape[0]})"
        else:
            expected = [[(1,)], [()]]
            hint = "(one scalar)"
        if dims not in expected:
            raise ValueError(
                f"{where}: the Meta-Curvature factors for parameter {position} of shape {shape} have shapes "
                f"{dims}; expected {hint}. The learned preconditioner belongs to a model with other shapes."
            )


class MetaCurvature(LearnedOptimizer):
    """Gradient descent with a learned Kronecker-factored preconditioner per parameter (module docstring).

    Args:
        params: the parameters (a flat list or groups; ``curvature`` is built per parameter).
        lr: γ, a number or a tensor.
        curvature: the learned factors, ``PerParameter([(B_out, B_in), ...])``; default
            zeros (the identity preconditioner), as ``nn.Parameter`` s.
        bias: ``"full"`` or ``"diagonal"`` preconditioner for 1-D parameters.
        max_factor: the largest factor side accepted (a clear error above it).
        weight_decay, maximize: as in SGD.
    """
    supports_complex = False  # (its state or network is built for real tensors)

    rule_class = MetaCurvatureRule
    kind = "meta_curvature"

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 0.01, *, curvature: PerParameter | None = None,
                 bias: str = "full", max_factor: int = DEFAULT_MAX_FACTOR, weight_decay: float | Tensor = 0.0,
                 maximize: bool = False, requires_grad: bool = True, **options: Any) -> None:
        if bias not in ("full", "diagonal"):
            raise ValueError(f"MetaCurvature: bias must be 'full' or 'diagonal', got {bias!r}")
        self.bias = bias
        groups = self._groups_from(params)
        self.factors: list[tuple[nn.Parameter, ...]] = []
        for k, group in enumerate(groups):
            raw = group["params"]
            raw = [raw] if isinstance(raw, Tensor) else list(raw)
            group["params"] = raw
            if curvature is not None:
                if len(groups) != 1:
                    raise ValueError("MetaCurvature: curvature=... needs a flat list of parameters (one group)")
                group["curvature"] = curvature
                self.factors = [tuple(v) for v in curvature.values]
                continue
            built = []
            for j, item in enumerate(raw):
                p = item[1] if isinstance(item, tuple) else item
                if not isinstance(p, Tensor):
                    raise TypeError(f"MetaCurvature parameter group {k}: params[{j}] is not a tensor")
                shapes = factor_shapes(p.shape, bias)
                too_big = [s[0] for s in shapes if s[0] > max_factor]
                if too_big:
                    raise ValueError(
                        f"MetaCurvature: parameter group {k} params[{j}] has shape {tuple(p.shape)}, viewed as "
                        f"({p.shape[0]}, {math.prod(p.shape[1:])}); its {too_big[0]}×{too_big[0]} factor exceeds "
                        f"max_factor={max_factor}. Raise max_factor, or optimise that parameter with another "
                        "optimizer."
                    )
                built.append(tuple(
                    nn.Parameter(torch.zeros(s, dtype=p.dtype, device=p.device), requires_grad=requires_grad)
                    for s in shapes
                ))
            self.factors.extend(built)
            group["curvature"] = PerParameter(built)
        super().__init__(groups, lr=lr, weight_decay=weight_decay, maximize=maximize, **options)

    def config(self) -> dict[str, Any]:
        group = self.param_groups[0]
        return {"bias": self.bias, "lr": _plain(group["lr"]), "weight_decay": _plain(group["weight_decay"]),
                "maximize": group["maximize"]}


def _plain(value: Any) -> Any:
    return float(value.detach()) if isinstance(value, Tensor) and value.numel() == 1 else value

