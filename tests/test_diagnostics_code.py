"""diffopt.diagnostics (5) prequential code length of the support set."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import diffopt.diagnostics as dg
from diagnostics_helpers import gen, hand_ci95, mlp, params_of
from diagnostics_helpers import data as _data

data = partial(_data, n=10)

pytestmark = pytest.mark.usefixtures("float64_default")



def test_block_ends():
    assert dg.block_ends(10) == [1, 2, 4, 8, 10]
    assert dg.block_ends(8) == [1, 2, 4, 8]
    assert dg.block_ends(1) == [1]
    assert dg.block_ends(10, 3) == [4, 7, 10]
    assert dg.block_ends(10, [2, 5]) == [2, 5, 10]
    with pytest.raises(ValueError):
        dg.block_ends(10, [5, 3])


def test_prequential_code_equals_per_example_nll_sum_in_bits():
    model = mlp()
    x, y = data()
    theta = params_of(model)
    adapt = dg.sgd_adapt(model, lr=0.5, steps=2)
    res = dg.prequential_code_length(model, theta, x, y, adapt, blocks=[2, 5], shuffle=False)
    # independent reference: blocks [0,2) by θ, [2,5) by adapt on S[:2], [5,10) by adapt on S[:5]
    total = 0.0
    for s, e in [(0, 2), (2, 5), (5, 10)]:
        w = theta if s == 0 else adapt(theta, x[:s], y[:s])
        for i in range(s, e):
            total += -functional_call(model, w, (x[i : i + 1],)).log_softmax(-1)[0, y[i]].item()
    assert res["code/L_preq"].value == pytest.approx(total / math.log(2), rel=1e-10)
    assert res["code/L_preq"].units == "bits"
    l_theta = nn.functional.cross_entropy(functional_call(model, theta, (x,)), y, reduction="sum").item()
    assert res["code/L_theta"].value == pytest.approx(l_theta / math.log(2), rel=1e-10)
    assert res["code/savings"].value == pytest.approx(res["code/L_theta"].value - res["code/L_preq"].value)
    assert res["code/L_unif"].value == pytest.approx(10 * math.log2(4))
    assert sum(res["code/L_preq"].details["block_bits"]) == pytest.approx(res["code/L_preq"].value, rel=1e-12)


@pytest.mark.parametrize("blocks", [None, 3, [1, 2, 3]])
def test_zero_learning_rate_gives_L_preq_equal_to_L_theta_exactly(blocks):
    model = mlp()
    x, y = data()
    res = dg.prequential_code_length(model, None, x, y, dg.sgd_adapt(model, lr=0.0, steps=3), blocks=blocks,
                                     orderings=3, generator=gen(1))
    assert res["code/L_preq"].value == res["code/L_theta"].value
    assert res["code/savings"].value == 0.0
    for a, b in zip(res["code/L_preq"].details["per_ordering"], res["code/L_theta"].details["per_ordering"]):
        assert a == b


def test_uniform_head_codes_first_block_at_t1_log2_N():
    model = mlp(N=5)
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
    x, y = data(N=5)
    res = dg.prequential_code_length(model, None, x, y, dg.sgd_adapt(model, lr=0.5), blocks=[3, 6])
    assert res["code/L_preq"].details["block_bits"][0] == pytest.approx(3 * math.log2(5), rel=1e-12)
    assert res["code/L_theta"].value == pytest.approx(10 * math.log2(5), rel=1e-12)


@settings(max_examples=10)
@given(seed=st.integers(0, 1000), lr=st.sampled_from([0.0, 0.3, 5.0, 50.0]), n=st.integers(1, 9))
def test_switch_code_at_most_uniform_plus_one(seed, lr, n):
    model = mlp(seed=seed % 5)
    x, y = data(seed, n=n)
    res = dg.prequential_code_length(model, None, x, y, dg.sgd_adapt(model, lr=lr), generator=gen(seed))
    assert res["code/switch"].value <= res["code/L_unif"].value + 1 + 1e-12
    assert res["code/switch"].value <= res["code/L_preq"].value + 1 + 1e-12
    # note: L_preq <= L_unif is not a theorem and is deliberately not asserted


def test_orderings_spread_and_tasks():
    model = mlp()
    T = 3
    g = gen(4)
    x, y = torch.randn(T, 8, 3, generator=g), torch.randint(0, 4, (T, 8), generator=g)
    adapt = dg.sgd_adapt(model, lr=1.0, steps=2)
    res = dg.prequential_code_length(model, None, x, y, adapt, orderings=3, batched=True, generator=gen(0))
    d = res["code/L_preq"]
    assert d.per_task.shape == (T,) and d.ci95 == pytest.approx(hand_ci95(d.per_task), rel=1e-12)
    assert len(d.details["per_ordering"]) == T and d.details["per_ordering"][0].shape == (3,)
    assert all(s > 0 for s in d.details["sd_over_orderings"])
    single = dg.prequential_code_length(model, None, x[1], y[1], adapt, orderings=3, generator=gen(0))
    # the generator stream differs per task, so compare L_theta (order independent up to rounding)
    assert single["code/L_theta"].value == pytest.approx(res["code/L_theta"].per_task[1].item(), rel=1e-12)


def test_regression_code_length_needs_sigma_and_has_no_uniform_code():
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()
    x, y = torch.randn(6, 2), torch.randn(6)
    with pytest.raises(ValueError, match="sigma="):
        dg.prequential_code_length(model, None, x, y, dg.sgd_adapt(model, lr=0.1, loss_fn=nn.functional.mse_loss),
                                   likelihood="gaussian")
    res = dg.prequential_code_length(model, None, x, y, dg.sgd_adapt(model, lr=0.0, likelihood="gaussian", sigma=0.5),
                                     likelihood="gaussian", sigma=0.5)
    assert "code/L_unif" not in res and "code/switch" not in res
    assert res["code/L_preq"].value == res["code/L_theta"].value
