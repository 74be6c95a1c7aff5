"""Diagnostics at the edges a review found them wrong at (float64, against closed forms): a class of
probability 0, ``to_bits`` on a result with details, an empty set, a Hessian whose eigenvalue of
largest magnitude is negative."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import diffopt.diagnostics as D

F64 = torch.float64


class Masked(nn.Module):
    """Three classes, the last one masked by a -inf logit (probability exactly 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3).to(F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).masked_fill(torch.tensor([False, False, True]), -math.inf)


def test_a_class_of_probability_zero_contributes_nothing_instead_of_nan():
    g = torch.Generator().manual_seed(0)
    model = Masked()
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    phi = {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=F64) for k, v in theta.items()}
    x, y = torch.randn(6, 3, generator=g, dtype=F64), torch.randint(0, 2, (6,), generator=g)
    live_theta, live_phi = (functional_call(model, w, (x,))[:, :2] for w in (theta, phi))
    p_theta, p_phi = live_theta.softmax(-1), live_phi.softmax(-1)
    kl_forward = (p_phi * (p_phi.log() - p_theta.log())).sum(-1).mean()
    entropy_theta = -(p_theta * p_theta.log()).sum(-1).mean()
    kl = D.adaptation_kl(model, theta, phi, x)
    entropy = D.entropy_change(model, theta, phi, x, y)
    assert abs(kl["kl/forward"].value - float(kl_forward)) < 1e-12
    assert abs(entropy["entropy/theta"].value - float(entropy_theta)) < 1e-12
    assert all(math.isfinite(v.value) for v in (*kl.values(), *entropy.values()))
    logits = torch.tensor([[0.3, -1.0, -math.inf]], dtype=F64)
    assert math.isfinite(float(D.bald_from_logits(torch.stack([logits, logits + 0.1]))))
    # p > 0 where q = 0: the KL is infinite, not NaN
    assert float(D.kl_categorical(torch.zeros(1, 3, dtype=F64), logits)) == math.inf


def test_to_bits_converts_the_details_with_the_value():
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 4).to(F64)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = torch.randn(6, 3, generator=g, dtype=F64), torch.randint(0, 4, (6,), generator=g)
    bits = D.fisher_information(model, theta, x, y, kind="true", matrix=True).to_bits()
    diagonal = sum(float(v.sum()) for v in bits.details["diagonal"].values())
    assert abs(diagonal - bits.value) < 1e-10 and abs(float(bits.details["matrix"].trace()) - bits.value) < 1e-10


def test_an_empty_set_is_an_error_not_a_nan_or_a_zero():
    model = nn.Linear(3, 4).to(F64)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = torch.zeros(0, 3, dtype=F64), torch.zeros(0, dtype=torch.long)
    for call in (lambda: D.adaptation_kl(model, theta, theta, x), lambda: D.fisher_information(model, theta, x, y),
                 lambda: D.curvature(model, theta, x, y, iters=3, samples=2)):
        with pytest.raises(ValueError, match=r"x has no examples \(shape \(0, 3\)\)"):
            call()


def test_lambda_max_is_the_largest_eigenvalue_not_the_largest_in_magnitude():
    """The Hessian in the weights is diag(−3, 1): λ_max = 1 (power iteration alone gave −3)."""
    model = nn.Linear(2, 1, bias=False).to(F64)
    weights = {"weight": torch.tensor([[0.3, -0.2]], dtype=F64)}
    x, y = torch.eye(2, dtype=F64), torch.zeros(2, 1, dtype=F64)

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -1.5 * out[0, 0] ** 2 + 0.5 * out[1, 0] ** 2

    result = D.curvature(model, weights, x, y, loss_fn=loss, lr=0.1, samples=0, iters=200)
    assert abs(result["curvature/lambda_max"].value - 1.0) < 1e-8
    assert abs(result["curvature/stability_ratio"].value - 0.1) < 1e-9
