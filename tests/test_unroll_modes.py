"""Modes as objects: each object equals its name-plus-keywords form exactly, owns the
validation of its options, and unknown options are named with the closest one."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffopt.optim import SGD
from diffopt.unroll import (CG, ES, MODES, PES, Checkpointed, FirstOrder, Forward, Implicit, InnerLoop, Neumann,
                            SecondOrder, Truncated, as_mode)

F64 = torch.float64


def problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).to(F64)
    g = torch.Generator().manual_seed(seed)
    data = [torch.randn(3, n, d, generator=g, dtype=F64) for n, d in ((6, 2), (6, 1), (7, 2), (7, 1))]
    return model, data


def meta_gradient(mode, **options):
    model, data = problem()
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    loop = InnerLoop(model, SGD(model.parameters(), lr=lr), steps=4, mode=mode, proximal=0.5, **options)
    wrt = [*model.parameters(), lr]
    return torch.autograd.grad(loop.meta_loss(*data), wrt, allow_unused=True), loop


@pytest.mark.parametrize("name, options, obj", [
    ("second_order", {}, SecondOrder()),
    ("first_order", {}, FirstOrder()),
    ("truncated", {"truncate": 2}, Truncated(2)),
    ("checkpointed", {"segment": 3}, Checkpointed(3)),
    ("implicit", {"solver": "neumann", "solver_iterations": 7, "neumann_alpha": 0.2, "damping": 0.1},
     Implicit(Neumann(iterations=7, alpha=0.2), damping=0.1)),
    ("implicit", {"solver_iterations": 9, "solver_tol": 1e-12}, Implicit(CG(9, 1e-12))),
    ("forward", {}, Forward()),
])
def test_an_object_is_its_name_and_keywords(name, options, obj):
    by_name, loop = meta_gradient(name, **options)
    by_object, _ = meta_gradient(obj)
    assert loop.mode == name and str(loop.mode) == name and type(loop.mode) is type(obj)
    for a, b in zip(by_name, by_object):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("cls", [ES, PES])
def test_zero_order_objects_equal_their_keywords(cls):
    options = {"es_samples": 3, "es_sigma": 0.05}
    if cls is PES:
        options["pes_truncation"] = 2
    by_name, _ = meta_gradient(cls.name, generator=torch.Generator().manual_seed(4), **options)
    kwargs = {"samples": 3, "sigma": 0.05, "generator": torch.Generator().manual_seed(4)}
    if cls is PES:
        kwargs["truncation"] = 2
    by_object, loop = meta_gradient(cls(**kwargs))
    for a, b in zip(by_name, by_object):
        assert torch.equal(a, b)
    assert loop.last_info["mode"] == cls.name and loop.last_info["es_samples"] == 3


def test_every_name_is_a_mode_class():
    assert MODES == ("second_order", "first_order", "truncated", "checkpointed", "implicit", "forward", "es", "pes")
    for name in MODES:
        assert as_mode(name, truncate=1).name == name


def test_bad_options_are_named():
    with pytest.raises(TypeError, match=r"unknown mode option 'segmnet' \(did you mean 'segment'\?\)"):
        as_mode("checkpointed", segmnet=2)
    with pytest.raises(TypeError, match="give truncate to it"):
        as_mode(Truncated(2), truncate=3)
    with pytest.raises(ValueError, match=r"did you mean 'checkpointed'"):
        as_mode("checkpointd")
    with pytest.raises(ValueError, match="solver='lu': choose one of 'cg', 'normal_cg', 'neumann', 'gmres', 'minres', 'dense'"):
        Implicit("lu")
    with pytest.raises(ValueError, match="iterations .*must be a positive integer"):
        CG(iterations=0)
    with pytest.raises(ValueError, match="alpha"):
        Neumann(alpha=-1.0)
    with pytest.raises(ValueError, match="truncate=k with 0 <= k <= steps"):
        InnerLoop(problem()[0], steps=2, mode=Truncated(True))
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        InnerLoop(problem()[0], steps=True)


def test_implicit_reports_its_solve_in_last_info():
    _, loop = meta_gradient(Implicit(CG(50, 1e-12)))
    assert loop.last_info["solver"] == "cg" and loop.last_info["solve"].iterations <= 50


def _ridge_with_weight_decay(decay):
    """A linear head adapted by SGD with weight decay ``decay`` to the stationary point of the inner
    objective; the engine's implicit meta-loss and the closed form of that point."""
    from diffopt.unroll import Dense
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(3)
    x, y, qx, qy = (torch.randn(1, n, d, generator=g, dtype=F64) for n, d in ((6, 3), (6, 1), (7, 3), (7, 1)))
    lam = 0.7
    model = nn.Linear(3, 1, bias=False).to(F64)
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.3, weight_decay=decay), F.mse_loss, steps=1500,
                     mode="implicit", solver=Dense(), proximal=lam)
    engine = loop.meta_loss(x, y, qx, qy)
    # SGD stops where 2/n Xᵀ(Xφ − y) + λ(φ − θ) + ω φ = 0
    a = 2 / 6 * x[0].T @ x[0] + (lam + decay) * torch.eye(3, dtype=F64)
    phi = torch.linalg.solve(a, 2 / 6 * x[0].T @ y[0] + lam * model.weight.T)
    return model, engine, F.mse_loss(qx[0] @ phi, qy[0])


@pytest.mark.parametrize("learnable", [False, True])
def test_implicit_accounts_for_a_coupled_weight_decay(learnable):
    """The implicit gradient differentiates the optimizer's own stationary point: with a weight decay
    ω that is ℓ + ω/2 ‖φ‖² (before: ω was left out of the Hessian, 9-36% off); a learnable ω gets its
    hypergradient through the same solve."""
    decay = torch.tensor(0.3, dtype=F64, requires_grad=True) if learnable else 0.3
    model, engine, closed = _ridge_with_weight_decay(decay)
    wrt = [model.weight] + ([decay] if learnable else [])
    assert abs(float(engine) - float(closed)) < 1e-12
    for ours, reference in zip(torch.autograd.grad(engine, wrt), torch.autograd.grad(closed, wrt)):
        assert torch.allclose(ours, reference, rtol=1e-10, atol=1e-13), (ours, reference)


def test_implicit_refuses_a_decoupled_weight_decay():
    from diffopt.optim import AdamW

    model = problem()[0]
    loop = InnerLoop(model, AdamW(model.parameters(), lr=0.01), steps=2, mode="implicit", proximal=0.5)
    with pytest.raises(ValueError, match=r"decoupled weight decay \(weight_decay=0.01, AdamW\).*proximal=λ"):
        loop.meta_loss(*problem()[1])
    loop = InnerLoop(model, AdamW(model.parameters(), lr=0.01, weight_decay=0.0), steps=2, mode="implicit",
                     proximal=0.5)
    loop.meta_loss(*problem()[1]).backward()  # without the decay it runs


def test_forward_mode_checks_its_wrt_when_built():
    """``Forward(wrt=[0.1])`` used to fail with an AttributeError inside meta_loss (review)."""
    with pytest.raises(TypeError, match=r"Forward\(wrt=...\): entry 0 is float 0.1, not a tensor"):
        Forward(wrt=[0.1])
    with pytest.raises(TypeError, match="a sequence of tensors, e.g. wrt=\\[lr\\]"):
        Forward(wrt=torch.tensor(0.1))
    with pytest.raises(TypeError, match="entry 0 is float"):
        InnerLoop(problem()[0], steps=1, mode="forward", forward_wrt=[0.1])
