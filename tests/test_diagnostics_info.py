"""diffopt.diagnostics (1) adaptation KL, (2) entropy / cross-entropy / BALD, units and result objects."""
from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import diffopt.diagnostics as dg
from diagnostics_helpers import F64, gen
from diagnostics_helpers import mlp as _mlp

clf_model = partial(_mlp, h=6)

pytestmark = pytest.mark.usefixtures("float64_default")



def logits(seed, shape, scale=3.0):
    return scale * torch.randn(*shape, generator=gen(seed), dtype=F64)


def clf_task(seed=0, n=8, m=7, d=3, N=4):
    g = gen(seed)
    return (torch.randn(n, d, generator=g), torch.randint(0, N, (n,), generator=g),
            torch.randn(m, d, generator=g), torch.randint(0, N, (m,), generator=g))


# ----------------------------------------------------------------------------------------
# (1) KL
# ----------------------------------------------------------------------------------------
@settings(max_examples=30)
@given(seed=st.integers(0, 10_000), N=st.integers(2, 9), scale=st.floats(0.01, 20.0))
def test_kl_nonnegative_and_js_bounded(seed, N, scale):
    p, q = logits(seed, (5, N), scale), logits(seed + 1, (5, N), scale)
    assert (dg.kl_categorical(p, q) >= 0).all()
    assert (dg.kl_categorical(q, p) >= 0).all()
    js = dg.js_categorical(p, q)
    assert (js >= 0).all() and (js <= math.log(2) + 1e-15).all()


def test_js_reaches_ln2_for_disjoint_supports():
    p = torch.tensor([[100.0, -100.0]])
    q = torch.tensor([[-100.0, 100.0]])
    assert dg.js_categorical(p, q).item() == pytest.approx(math.log(2), abs=1e-12)


@settings(max_examples=30)
@given(seed=st.integers(0, 10_000), N=st.integers(2, 9))
def test_kl_to_uniform_is_lnN_minus_entropy(seed, N):
    p = logits(seed, (6, N))
    uniform = torch.zeros(6, N)
    expected = math.log(N) - dg.entropy_categorical(p)
    torch.testing.assert_close(dg.kl_categorical(p, uniform), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=30)
@given(seed=st.integers(0, 10_000), N=st.integers(2, 9), shift=st.floats(-50, 50))
def test_kl_invariant_to_logit_shift(seed, N, shift):
    p, q = logits(seed, (4, N)), logits(seed + 7, (4, N))
    c = logits(seed + 3, (4, 1), 10.0) + shift  # a per-example constant added to all logits
    base = dg.kl_categorical(p, q)
    torch.testing.assert_close(dg.kl_categorical(p + c, q), base, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(dg.kl_categorical(p, q - c), base, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(dg.js_categorical(p + c, q), dg.js_categorical(p, q), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("steps,lr", [(0, 0.3), (3, 0.0)])
def test_adaptation_kl_exactly_zero_without_adaptation(steps, lr):
    model = clf_model()
    xs, ys, xq, _ = clf_task()
    adapt = dg.sgd_adapt(model, lr=lr, steps=steps)
    phi = adapt(dict(model.named_parameters()), xs, ys)
    res = dg.adaptation_kl(model, None, phi, xq)
    assert res["kl/forward"].value == 0.0
    assert res["kl/reverse"].value == 0.0
    assert res["kl/js"].value == 0.0
    assert res["kl/forward"].units == "nats"


def test_adaptation_kl_matches_definition_and_is_positive_after_adaptation():
    model = clf_model()
    xs, ys, xq, _ = clf_task()
    theta = {k: v.detach() for k, v in model.named_parameters()}
    phi = dg.sgd_adapt(model, lr=0.5, steps=2)(theta, xs, ys)
    res = dg.adaptation_kl(model, theta, phi, xq)
    lt = torch.func.functional_call(model, theta, (xq,)).log_softmax(-1)
    lp = torch.func.functional_call(model, phi, (xq,)).log_softmax(-1)
    fwd = (lp.exp() * (lp - lt)).sum(-1).mean().item()
    rev = (lt.exp() * (lt - lp)).sum(-1).mean().item()
    assert res["kl/forward"].value == pytest.approx(fwd, rel=1e-12) and fwd > 0
    assert res["kl/reverse"].value == pytest.approx(rev, rel=1e-12)
    assert res["kl/forward"].estimator["reduction"].startswith("mean")
    summed = dg.adaptation_kl(model, theta, phi, xq, reduction="sum")
    assert summed["kl/forward"].value == pytest.approx(fwd * xq.shape[0], rel=1e-12)


def test_gaussian_kl_closed_form():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 2)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    phi = {k: v + 0.1 * torch.randn_like(v) for k, v in theta.items()}
    sigma = 0.7
    res = dg.adaptation_kl(model, theta, phi, x, likelihood="gaussian", sigma=sigma)
    ft = torch.func.functional_call(model, theta, (x,))
    fp = torch.func.functional_call(model, phi, (x,))
    expected = ((fp - ft) ** 2).sum(-1).div(2 * sigma**2).mean().item()
    assert res["kl/forward"].value == pytest.approx(expected, rel=1e-12)
    # against torch.distributions
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(fp, sigma),
                                            torch.distributions.Normal(ft, sigma)).sum(-1).mean().item()
    assert res["kl/forward"].value == pytest.approx(ref, rel=1e-10)
    assert "kl/js" not in res


def test_adaptation_kl_per_task_with_confidence_interval():
    model = clf_model()
    T = 5
    theta = {k: v.detach() for k, v in model.named_parameters()}
    phis = {k: torch.stack([v + 0.3 * torch.randn(v.shape, generator=gen(t)) for t in range(T)])
            for k, v in theta.items()}
    xq = torch.randn(T, 7, 3, generator=gen(9))
    res = dg.adaptation_kl(model, theta, phis, xq)
    d = res["kl/forward"]
    per = torch.tensor([dg.adaptation_kl(model, theta, {k: v[t] for k, v in phis.items()}, xq[t])["kl/forward"].value
                        for t in range(T)])
    torch.testing.assert_close(d.per_task, per, rtol=1e-12, atol=0)
    mean, sd = per.mean().item(), per.std().item()
    assert d.value == pytest.approx(mean)
    assert d.stderr == pytest.approx(sd / math.sqrt(T))
    assert d.ci95 == pytest.approx((mean - 1.96 * sd / math.sqrt(T), mean + 1.96 * sd / math.sqrt(T)))
    # lists of per-task params in named_parameters() order are accepted too
    as_list = [phis[k] for k in theta]
    assert dg.adaptation_kl(model, None, as_list, xq)["kl/forward"].value == pytest.approx(d.value, rel=1e-12)


# ----------------------------------------------------------------------------------------
# bits and nats
# ----------------------------------------------------------------------------------------
@settings(max_examples=20)
@given(x=st.floats(0, 1e6))
def test_bits_are_nats_over_ln2(x):
    assert dg.nats_to_bits(x) == pytest.approx(x / math.log(2), rel=1e-15)
    assert dg.bits_to_nats(dg.nats_to_bits(x)) == pytest.approx(x, rel=1e-15)


def test_diagnostic_to_bits_converts_value_ci_and_layers():
    d = dg.Diagnostic.from_tasks("x", [1.0, 2.0, 4.0], "nats", {}, by_layer=[{"a": 1.0}, {"a": 2.0}, {"a": 3.0}])
    b = d.to_bits()
    assert b.units == "bits"
    assert b.value == pytest.approx(d.value / math.log(2))
    assert b.ci95 == pytest.approx(tuple(c / math.log(2) for c in d.ci95))
    torch.testing.assert_close(b.per_task, d.per_task / math.log(2))
    assert b.by_layer["a"] == pytest.approx(2.0 / math.log(2))
    f = dg.Diagnostic("f", 3.0, "nats^2/param^2", {}).to_bits()
    assert f.units == "bits^2/param^2" and f.value == pytest.approx(3.0 / math.log(2) ** 2)
    with pytest.raises(ValueError, match="nats"):
        dg.Diagnostic("c", 1.0, "1", {}).to_bits()


# ----------------------------------------------------------------------------------------
# (2) entropy, cross-entropy, BALD
# ----------------------------------------------------------------------------------------
@settings(max_examples=30)
@given(seed=st.integers(0, 10_000), N=st.integers(2, 10), scale=st.floats(0.0, 50.0))
def test_entropy_between_zero_and_lnN(seed, N, scale):
    h = dg.entropy_categorical(logits(seed, (5, N), scale))
    assert (h >= 0).all() and (h <= math.log(N)).all()


@pytest.mark.parametrize("N", [2, 3, 10])
def test_zero_logits_give_lnN(N):
    h = dg.entropy_categorical(torch.zeros(3, N))
    torch.testing.assert_close(h, torch.full((3,), math.log(N)), rtol=1e-14, atol=1e-14)


def test_entropy_change_and_cross_entropy():
    model = clf_model()
    xs, ys, xq, yq = clf_task()
    theta = {k: v.detach() for k, v in model.named_parameters()}
    phi = dg.sgd_adapt(model, lr=1.0, steps=3)(theta, xs, ys)
    res = dg.entropy_change(model, theta, phi, xq, yq)
    for k in ("cross_entropy/theta", "cross_entropy/phi"):
        assert res[k].value >= 0
    lt = torch.func.functional_call(model, theta, (xq,))
    lp = torch.func.functional_call(model, phi, (xq,))
    ce_t = nn.functional.cross_entropy(lt, yq).item()
    ce_p = nn.functional.cross_entropy(lp, yq).item()
    assert res["cross_entropy/delta"].value == pytest.approx(ce_t - ce_p, rel=1e-12)
    h_t = dg.entropy_categorical(lt).mean().item()
    h_p = dg.entropy_categorical(lp).mean().item()
    assert res["entropy/delta"].value == pytest.approx(h_t - h_p, rel=1e-12)
    for k in ("entropy/theta", "entropy/phi"):
        assert 0 <= res[k].value <= math.log(4)
    same = dg.entropy_change(model, theta, theta, xq, yq)
    assert same["entropy/delta"].value == 0.0 and same["cross_entropy/delta"].value == 0.0


@settings(max_examples=25)
@given(seed=st.integers(0, 10_000), J=st.integers(1, 6), N=st.integers(2, 8))
def test_bald_bounds(seed, J, N):
    b = dg.bald_from_logits(logits(seed, (J, 5, N), 5.0))
    assert (b >= 0).all() and (b <= math.log(N)).all()


def test_bald_zero_for_identical_members_and_positive_otherwise():
    one = logits(0, (1, 6, 5))
    torch.testing.assert_close(dg.bald_from_logits(one.expand(4, 6, 5)), torch.zeros(6), rtol=0, atol=1e-14)
    assert dg.bald_from_logits(logits(1, (4, 6, 5))).mean() > 0
    # maximal disagreement with confident members: ln N
    N = 3
    confident = torch.stack([100 * nn.functional.one_hot(torch.full((2,), j), N).double() for j in range(N)])
    torch.testing.assert_close(dg.bald_from_logits(confident), torch.full((2,), math.log(N)), rtol=1e-10, atol=1e-10)


def test_bald_on_model_members():
    model = clf_model()
    xs, ys, xq, _ = clf_task()
    theta = {k: v.detach() for k, v in model.named_parameters()}
    same = dg.bald(model, [theta, theta, theta], xq)["bald"]
    assert same.value == pytest.approx(0.0, abs=1e-14) and same.units == "nats"
    members = [dg.sgd_adapt(model, lr=1.0, steps=2)(theta, xs[idx], ys[idx])
               for idx in ([0, 1, 2, 3], [4, 5, 6, 7], [0, 2, 4, 6])]
    b = dg.bald(model, members, xq)["bald"]
    assert 0 < b.value <= math.log(4)


def test_report_objects_serialise():
    d = dg.Diagnostic.from_tasks("kl/forward", [0.1, 0.2, float("nan")], "nats", {"labels": "x"})
    js = json.loads(json.dumps(d.to_dict()))
    assert js["per_task"][2] is None and js["units"] == "nats"
    g = dg.DiagnosticGroup({"a": dg.Diagnostic("a", torch.eye(2), "1", {}), "b": dg.Diagnostic("b", 1.5, "nats", {})})
    table = g.to_table()
    assert "tensor(2x2)" in table and "nats" in table
    assert json.loads(g.to_json())["a"]["value"] == [[1.0, 0.0], [0.0, 1.0]]
