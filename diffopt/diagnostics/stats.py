"""Small statistics on stacked gradients ``G`` of shape ``(M, P)`` (M tasks or examples, P parameters).

All free (no model calls).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "cosine_matrix",
    "conflict_rate",
    "gradient_diversity",
    "gsnr",
    "unbiased_sq_norm_of_mean",
    "confidence_interval",
]


def cosine_matrix(G: Tensor) -> Tensor:
    """Pairwise cosines ``(M, M)`` in ``[−1, 1]``; the diagonal is exactly 1 (NaN rows for zero gradients)."""
    G = G.reshape(G.shape[0], -1)
    norms = G.norm(dim=1)
    C = (G @ G.T) / (norms[:, None] * norms[None, :])
    C = C.clamp(-1.0, 1.0)
    idx = torch.arange(G.shape[0])
    C[idx, idx] = torch.where(norms > 0, torch.ones_like(norms), torch.full_like(norms, float("nan")))
    return C


def conflict_rate(C: Tensor) -> float:
    """Fraction of task pairs ``i < j`` whose gradients conflict (cosine < 0)."""
    M = C.shape[0]
    if M < 2:
        return float("nan")
    iu = torch.triu_indices(M, M, offset=1)
    return (C[iu[0], iu[1]] < 0).double().mean().item()


def gradient_diversity(G: Tensor) -> float:
    """``Σ‖g_i‖² / ‖Σ g_i‖²``: 1/M for identical gradients, 1 for orthogonal ones (inf if they cancel)."""
    G = G.reshape(G.shape[0], -1)
    return ((G * G).sum() / G.sum(0).pow(2).sum()).item()


def gsnr(G: Tensor, *, unbiased: bool = True) -> Tensor:
    """Per-parameter gradient signal-to-noise ratio ``(E g)² / Var g`` across the M rows of ``G``.

    ``Var`` is the sample variance (ddof=1). With ``unbiased=True`` the squared
    mean is the U-statistic ``ḡ² − s²/M`` (unbiased for ``(E g)²``; can be
    negative when the signal is below the noise). Parameters with zero
    variance give NaN. Invariant to scaling the loss.
    """
    G = G.reshape(G.shape[0], -1)
    M = G.shape[0]
    if M < 2:
        raise ValueError("GSNR needs gradients from at least 2 tasks")
    mean = G.mean(0)
    var = G.var(0, unbiased=True)
    num = mean * mean - (var / M if unbiased else 0.0)
    out = num / var
    return torch.where(var > 0, out, torch.full_like(out, float("nan")))


def unbiased_sq_norm_of_mean(G: Tensor) -> Tuple[float, Optional[float]]:
    """U-statistic for ``‖E g‖²``: ``(1/(M(M−1))) Σ_{i≠j} g_iᵀ g_j``, with its jackknife standard error.

    Unbiased (the naive ``‖ḡ‖²`` overestimates by ``tr Cov(g)/M``). The
    standard error is ``None`` for fewer than 3 rows.
    """
    G = G.reshape(G.shape[0], -1).to(torch.float64)
    M = G.shape[0]
    if M < 2:
        raise ValueError("the U-statistic for ||E g||^2 needs at least 2 gradients")
    K = G @ G.T
    off = K.sum() - K.diagonal().sum()
    U = (off / (M * (M - 1))).item()
    if M < 3:
        return U, None
    row = K.sum(1) - K.diagonal()
    loo = (off - 2 * row) / ((M - 1) * (M - 2))
    se = math.sqrt((M - 1) / M * ((loo - loo.mean()) ** 2).sum().item())
    return U, se


def confidence_interval(values: Tensor, z: float = 1.96) -> Tuple[float, float, float]:
    """``(mean, lo, hi)`` with ``lo, hi = mean ∓ z·sd/√n``."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    m = v.mean().item()
    if v.numel() < 2:
        return m, float("nan"), float("nan")
    h = z * v.std(unbiased=True).item() / math.sqrt(v.numel())
    return m, m - h, m + h
