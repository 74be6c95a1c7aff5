"""(6) Representation change: per-layer linear CKA between features under θ and φ, and effective rank.

Features are the outputs of chosen submodules (forward hooks) on the same
inputs, flattened to ``(n, features)``. CKA ≈ 1: the layer's representation is
reused (feature reuse); CKA well below 1: the layer adapts (rapid learning).
Effective rank ``exp(−Σ p_k ln p_k)``, ``p_k = σ_k/Σσ`` (singular values).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ._cost import Cost, documented_cost
from ._functional import ParamsLike, as_weights, call_model, split_tasks
from .settings import DiagnosticSettings, diagnostic
from ._result import DiagnosticGroup
from .kl import aggregate

__all__ = ["linear_cka", "effective_rank", "representation_change", "default_layers", "layer_features"]


def linear_cka(X: Tensor, Y: Tensor) -> Tensor:
    """Linear CKA between feature matrices ``X (n, p)`` and ``Y (n, q)`` on the same n inputs, in [0, 1].

    Columns are centred; ``CKA = ⟨K_X, K_Y⟩_F / (‖K_X‖_F ‖K_Y‖_F)`` with
    ``K = X Xᵀ`` — equal to ``‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)``. Symmetric, 1 for
    ``Y = X``, invariant to orthogonal transforms and isotropic scaling of
    either side. NaN if either side is constant over the inputs.
    """
    X = X.reshape(X.shape[0], -1)
    Y = Y.reshape(Y.shape[0], -1)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"CKA needs features of the same inputs: {X.shape[0]} vs {Y.shape[0]} rows")
    X = X - X.mean(0, keepdim=True)
    Y = Y - Y.mean(0, keepdim=True)
    Kx, Ky = X @ X.T, Y @ Y.T
    den = Kx.norm() * Ky.norm()
    cka = (Kx * Ky).sum() / den
    return torch.where(den > 0, cka.clamp(0.0, 1.0), torch.full_like(cka, float("nan")))


def effective_rank(X: Tensor, *, center: bool = False) -> Tensor:
    """Effective rank ``exp(H(p))`` of ``X (n, p)``, ``p_k = σ_k/Σσ``; singular values below
    ``max(n, p)·eps·σ_max`` count as zero. ``erank(I_d) = d``; rank one gives 1; scale invariant.
    """
    X = X.reshape(X.shape[0], -1)
    if center:
        X = X - X.mean(0, keepdim=True)
    s = torch.linalg.svdvals(X)
    if s.numel() == 0 or s.max() == 0:
        return torch.tensor(0.0, dtype=X.dtype)
    tol = max(X.shape) * torch.finfo(s.dtype).eps * s.max()
    s = torch.where(s > tol, s, torch.zeros_like(s))
    p = s / s.sum()
    return torch.exp(-torch.special.xlogy(p, p).sum())


def default_layers(model: nn.Module) -> List[str]:
    """Leaf submodules that own parameters (their outputs are the features), in module order."""
    names = [n for n, m in model.named_modules()
             if n and not list(m.children()) and list(m.parameters(recurse=False))]
    return names or [""]


def layer_features(model: nn.Module, params: Dict[str, Tensor], x: Tensor, layers: Sequence[str],
                   bn_mode: str = "eval") -> Dict[str, Tensor]:
    """Outputs of the named submodules (forward hooks) on one functional forward; ``name -> (n, features)``."""
    modules = dict(model.named_modules())
    missing = [l for l in layers if l not in modules]
    if missing:
        raise KeyError(f"no submodule named {missing}; choose among {[n for n in modules if n]}")
    feats: Dict[str, Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            feats[name] = out.detach().reshape(out.shape[0], -1)
        return hook

    handles = [modules[l].register_forward_hook(hook_for(l)) for l in layers]
    try:
        with torch.no_grad():
            call_model(model, {k: v.detach() for k, v in params.items()}, x, bn_mode)
    finally:
        for h in handles:
            h.remove()
    return feats


def representation_single(model: nn.Module, theta: Dict[str, Tensor], phi: Dict[str, Tensor], x: Tensor,
                          layers: Sequence[str], bn_mode: str = "eval", center_erank: bool = False) -> Dict[str, float]:
    ft = layer_features(model, theta, x, layers, bn_mode)
    fp = layer_features(model, phi, x, layers, bn_mode)
    vals = {}
    for l in layers:
        vals[f"cka/{l}"] = linear_cka(ft[l], fp[l]).item()
    for l in layers:
        vals[f"erank_theta/{l}"] = effective_rank(ft[l], center=center_erank).item()
        vals[f"erank_phi/{l}"] = effective_rank(fp[l], center=center_erank).item()
    return vals


@documented_cost(where="tasks = 1 when nothing is task-batched.", default=Cost(forward="2*tasks"))
@diagnostic("bn_mode", "batched")
def representation_change(
    model: nn.Module,
    theta: ParamsLike,
    phi: ParamsLike,
    x: Any,
    *,
    layers: Optional[Sequence[str]] = None,
    center_erank: bool = False,
    settings: DiagnosticSettings,
) -> DiagnosticGroup:
    """Per-layer linear CKA between features under θ and φ on the same inputs, and their effective ranks.

    Args:
        layers: submodule names (``model.named_modules()``) whose outputs are the
            features; default every leaf module with parameters.
        center_erank: centre features before the effective rank.

    Returns:
        group ``cka/<layer>`` (unitless, [0, 1]), ``erank_theta/<layer>``, ``erank_phi/<layer>``.
    """
    th, ph = as_weights(model, theta), as_weights(model, phi)
    layers = list(layers) if layers is not None else default_layers(model)
    T, views = split_tasks(model, {"theta": th, "phi": ph}, {"x": x}, settings.batched)
    vals = [representation_single(model, p["theta"], p["phi"], d["x"], layers, settings.bn_mode, center_erank)
            for p, d in views]
    est = {"features": "outputs of " + ", ".join(l or "<model>" for l in layers), "cka": "linear, centred",
           "erank": "exp entropy of normalised singular values" + (", centred" if center_erank else ""),
           "bn_mode": settings.bn_mode}
    return aggregate(vals, T, "1", est)
