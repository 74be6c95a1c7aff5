"""ES and PES meta-gradient estimators of diffopt.unroll are unbiased (float64).

The problems are chosen so that the meta-losses are exactly quadratic in the
perturbed tensors (a linear model, a squared-error inner loss and a fixed
learning rate make the adapted weights affine in θ, also through iMAML's
proximal term; one step makes them affine in the learning rate), so antithetic
estimates have no smoothing bias and their mean must equal the true gradient.
The true gradients come from second order: for ES, of the meta-loss; for PES, of
the mean over truncation ends of the query loss. Standard errors are computed
per coordinate from independent repeated estimates drawn from a seeded generator.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffopt.optim import SGD
from diffopt.unroll import InnerLoop
from strategies import record
from test_unroll import single_threaded, F64, grads_of, hyper  # noqa: F401 (the fixture)

REPEATS, SAMPLES, SIGMAS = 30, 8, 3.0


def quadratic_problem(seed: int, n_tasks: int = 2, d: int = 2):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(n_tasks, 6, d, generator=g, dtype=F64)
    qx = torch.randn(n_tasks, 6, d, generator=g, dtype=F64)
    sy = torch.randn(n_tasks, 6, 1, generator=g, dtype=F64)
    qy = torch.randn(n_tasks, 6, 1, generator=g, dtype=F64)
    torch.manual_seed(seed)
    model = nn.Linear(d, 1, bias=False).to(F64)
    return model, (sx, sy, qx, qy)


def repeated_estimates(loop: InnerLoop, data, wrt: list[Tensor]) -> tuple[Tensor, list[float], float]:
    """REPEATS independent estimates (rows), the reported standard errors and the loss value."""
    rows, reported = [], []
    for _ in range(REPEATS):
        loss = loop.meta_loss(*data)
        rows.append(torch.cat([g.reshape(-1) for g in grads_of(loss, wrt)]))
        reported.append(loop.last_info["estimate_standard_error"])
    return torch.stack(rows), reported, float(loss.detach())


def check_unbiased(estimates: Tensor, truth: Tensor, reported: list[float], name: str) -> None:
    mean = estimates.mean(0)
    standard_error = estimates.std(0, unbiased=True) / math.sqrt(estimates.shape[0])
    z = ((mean - truth).abs() / standard_error).max()
    record("ES/PES |mean - truth| / SE", name, float(z))
    assert float(z) <= SIGMAS, f"{name}: mean {mean.tolist()} vs truth {truth.tolist()} (SE {standard_error.tolist()})"
    # the estimate is informative: its standard error is small next to the gradient
    assert float(standard_error.norm()) <= 0.25 * float(truth.norm())
    # the engine's reported standard error (of one call's mean over its samples) agrees with
    # the spread of the repeated estimates
    spread = math.sqrt(float(estimates.var(0, unbiased=True).sum()))
    ratio = sum(reported) / len(reported) / spread
    assert 0.5 <= ratio <= 2.0, f"reported standard error off by a factor {ratio:.2f}"


def test_es_is_unbiased_for_theta():
    """(The task loop gives the same estimates: see test_unroll_vectorize.py.)"""
    model, data = quadratic_problem(1)
    options = dict(steps=2, proximal=0.5)
    truth_loop = InnerLoop(model, SGD(model.parameters(), lr=0.3), **options)
    truth_loss = truth_loop.meta_loss(*data)
    truth = grads_of(truth_loss, [model.weight])[0].reshape(-1)
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.3), mode="es", es_samples=SAMPLES, es_sigma=0.05,
                     generator=torch.Generator().manual_seed(2), **options)
    estimates, reported, value = repeated_estimates(loop, data, [model.weight])
    assert abs(value - float(truth_loss.detach())) <= 1e-12  # the value is the unperturbed meta-loss
    assert loop.last_info["truncations"] == 1 and loop.last_info["es_samples"] == SAMPLES
    check_unbiased(estimates, truth, reported, "es theta")


def test_es_is_unbiased_for_the_learning_rate():
    """One inner step: the adapted weights are affine in lr, the meta-loss quadratic."""
    model, data = quadratic_problem(3, d=3)
    lr = hyper(0.4)
    truth = grads_of(InnerLoop(model, SGD(model.parameters(), lr=lr), steps=1).meta_loss(*data), [lr])[0]
    loop = InnerLoop(model, SGD(model.parameters(), lr=lr), steps=1, mode="es", es_wrt=[lr], es_samples=SAMPLES,
                     es_sigma=0.05, generator=torch.Generator().manual_seed(4))
    estimates, reported, _ = repeated_estimates(loop, data, [lr])
    check_unbiased(estimates, truth.reshape(1), reported, "es lr")
    assert model.weight.grad is None  # only es_wrt is estimated


def test_pes_is_unbiased_for_the_mean_over_truncations(truncation=2, steps=3):
    """PES estimates ∇ mean_s L_s, L_s the query loss at the end of truncation s (the last one
    is shorter here); θ enters every truncation through the proximal term."""
    model, data = quadratic_problem(5)
    ends = [min(start + truncation, steps) for start in range(0, steps, truncation)]
    per_end = [InnerLoop(model, SGD(model.parameters(), lr=0.3), steps=end, proximal=0.5).meta_loss(*data)
               for end in ends]
    target = torch.stack(per_end).mean()
    truth = grads_of(target, [model.weight])[0].reshape(-1)
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.3), steps=steps, mode="pes", proximal=0.5,
                     pes_truncation=truncation, es_samples=SAMPLES, es_sigma=0.05,
                     generator=torch.Generator().manual_seed(6))
    estimates, reported, value = repeated_estimates(loop, data, [model.weight])
    assert loop.last_info["truncations"] == len(ends)
    assert abs(value - float(target.detach())) <= 1e-12  # the value is the mean of the truncation losses
    check_unbiased(estimates, truth, reported, f"pes {truncation}/{steps}")


def test_es_is_deterministic_under_a_seeded_generator():
    model, data = quadratic_problem(7)
    results = []
    for _ in range(2):
        loop = InnerLoop(model, SGD(model.parameters(), lr=0.3), steps=2, mode="pes", pes_truncation=1,
                         es_samples=4, generator=torch.Generator().manual_seed(8))
        results.append(grads_of(loop.meta_loss(*data), [model.weight])[0])
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("mode", ["es", "pes"])
def test_es_leaves_earlier_graphs_of_a_meta_parameter_usable(mode):
    """ES/PES perturbed meta-parameters in place: a graph built before the meta-loss that saved one (a
    regulariser of a learned loss weight) failed with 'modified by an inplace operation'. The estimate
    reaching the meta-parameter is the same with and without that graph."""
    from diffopt.unroll import ES, PES

    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    w = torch.ones(1, requires_grad=True)
    sx, qx = torch.randn(2, 3, 4, 2)
    sy, qy = torch.randn(2, 3, 4, 1)

    def meta_gradient(with_penalty: bool) -> torch.Tensor:
        mode_object = (ES if mode == "es" else PES)(samples=2, generator=torch.Generator().manual_seed(1))
        loop = InnerLoop(model, SGD(model.parameters(), lr=0.1), lambda o, y: F.mse_loss(o * w, y), steps=2,
                         mode=mode_object, meta_parameters=[w])
        penalty = (w ** 2).sum() if with_penalty else 0.0
        (loop.meta_loss(sx, sy, qx, qy) + penalty).backward()
        grad, w.grad = w.grad.clone(), None
        return grad

    alone = meta_gradient(False)
    assert torch.equal(w.detach(), torch.ones(1))  # the perturbations are undone
    torch.testing.assert_close(meta_gradient(True), alone + 2 * w.detach(), rtol=1e-6, atol=0)
