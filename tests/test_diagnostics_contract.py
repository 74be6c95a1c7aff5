"""diffopt.diagnostics: documented costs (counted), untouched state and RNG, clear errors, diagnose_adaptation."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

import diffopt.diagnostics as dg
from diagnostics_helpers import F64, gen, hand_ci95, mlp
from diagnostics_helpers import params_of as theta_of

pytestmark = pytest.mark.usefixtures("float64_default")



def bn_dropout_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 4)).double()


def tasks(T=3, n=6, m=5, N=4, seed=0):
    g = gen(seed)
    return (torch.randn(T, n, 3, generator=g), torch.randint(0, N, (T, n), generator=g),
            torch.randn(T, m, 3, generator=g), torch.randint(0, N, (T, m), generator=g))


def batched_phi(model, T, seed=1):
    return {k: torch.stack([v + 0.2 * torch.randn(v.shape, generator=gen(seed + t)) for t in range(T)])
            for k, v in theta_of(model).items()}


# ----------------------------------------------------------------------------------------
# documented costs, checked by counting
# ----------------------------------------------------------------------------------------
def counted(model, fn):
    with dg.count_costs(model) as c:
        fn()
    return c.as_dict()


@pytest.mark.parametrize("T", [1, 3])
def test_documented_costs_match_counts(T):
    model = mlp()
    xs, ys, xq, yq = tasks(T=T)
    if T == 1:
        xs, ys, xq, yq = xs[0], ys[0], xq[0], yq[0]
        phi = {k: v[0] for k, v in batched_phi(model, 1).items()}
    else:
        phi = batched_phi(model, T)
    th = theta_of(model)
    b = T > 1
    steps, K, O = 2, 3, 2
    adapt = dg.sgd_adapt(model, lr=0.3, steps=steps)
    cases = [
        (dg.adaptation_kl, "default", dict(tasks=T), lambda: dg.adaptation_kl(model, th, phi, xq)),
        (dg.entropy_change, "default", dict(tasks=T), lambda: dg.entropy_change(model, th, phi, xq, yq)),
        (dg.bald, "default", dict(tasks=T, members=3), lambda: dg.bald(model, [th, phi, phi], xq, batched=b)),
        (dg.fisher_information, "empirical", dict(tasks=T), lambda: dg.fisher_information(model, phi, xs, ys)),
        (dg.fisher_information, "true", dict(tasks=T, outputs=4),
         lambda: dg.fisher_information(model, phi, xs, kind="true", batched=b)),
        (dg.fisher_information, "mc", dict(tasks=T, samples=5),
         lambda: dg.fisher_information(model, phi, xs, kind="mc", samples=5, batched=b)),
        (dg.adapted_weight_information, "true", dict(tasks=T, outputs=4),
         lambda: dg.adapted_weight_information(model, th, phi, xs, ys)),
        (dg.representation_change, "default", dict(tasks=T), lambda: dg.representation_change(model, th, phi, xq)),
        (dg.curvature, "default", dict(tasks=T, iters=7, samples=3),
         lambda: dg.curvature(model, th, xs, ys, iters=7, tol=0.0, samples=3, batched=b)),
        (dg.prequential_code_length, "default",
         dict(tasks=T, orderings=O, blocks=K, adapt_forward=steps, adapt_backward=steps),
         lambda: dg.prequential_code_length(model, th, xs, ys, adapt, blocks=K, orderings=O, batched=b)),
        (dg.metagradient_discrepancy, "sgd", dict(tasks=T, steps=steps),
         lambda: dg.metagradient_discrepancy(model, th, xs, ys, xq, yq, lr=0.3, steps=steps, batched=b)),
        (dg.metagradient_discrepancy, "callable", dict(tasks=T, adapt_forward=steps, adapt_backward=steps),
         lambda: dg.metagradient_discrepancy(model, th, xs, ys, xq, yq, adapt=adapt, batched=b)),
    ]
    if T > 1:
        cases += [
            (dg.gradient_alignment, "default", dict(tasks=T), lambda: dg.gradient_alignment(model, th, xs, ys)),
            (dg.task_gradients, "default", dict(tasks=T), lambda: dg.task_gradients(model, th, xs, ys)),
        ]
    else:
        cases += [(dg.metagradients, "sgd", dict(steps=3),
                   lambda: dg.metagradients(model, th, xs, ys, xq, yq, lr=0.1, steps=3))]
        cases += [(dg.hessian_vector_product, "default", {},
                   lambda: dg.hessian_vector_product(model, th, xs, ys, torch.ones(sum(v.numel() for v in th.values()))))]
    for fn, variant, variables, call in cases:
        assert "Cost" in fn.__doc__, fn.__name__
        expected = fn.__cost__[variant].evaluate(**variables)
        assert counted(model, call) == expected, (fn.__name__, variant)


def test_sgd_adapt_cost_and_jacrev_cost():
    model = mlp()
    xs, ys, _, _ = tasks(T=1)
    adapt = dg.sgd_adapt(model, lr=0.1, steps=4)
    assert counted(model, lambda: adapt(theta_of(model), xs[0], ys[0])) == dict(forward=4, backward=4, hvp=0, adapt=1)
    n = xs.shape[1]
    got = counted(model, lambda: dg.fisher_information(model, None, xs[0], ys[0], per_example="jacrev"))
    assert got == dict(forward=1, backward=n, hvp=0, adapt=0)  # "backward is multiplied by n" for jacrev


# ----------------------------------------------------------------------------------------
# state: weights, buffers, training flags and the global RNG stream are untouched
# ----------------------------------------------------------------------------------------
def snapshot(model):
    return ([p.detach().clone() for p in model.parameters()], [b.clone() for b in model.buffers()],
            [m.training for m in model.modules()], torch.get_rng_state().clone())


def assert_same(model, snap):
    params, bufs, flags, rng = snap
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(bufs, model.buffers()))
    assert flags == [m.training for m in model.modules()]
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
def test_diagnostics_leave_weights_buffers_flags_and_rng_untouched(bn_mode):
    model = bn_dropout_net()
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        model(torch.randn(16, 3))
    xs, ys, xq, yq = tasks()
    th = theta_of(model)
    phi = batched_phi(model, 3)
    adapt = dg.sgd_adapt(model, lr=0.3, steps=2, bn_mode=bn_mode)
    kw = dict(bn_mode=bn_mode)
    calls = [
        lambda: dg.adaptation_kl(model, th, phi, xq, **kw),
        lambda: dg.entropy_change(model, th, phi, xq, yq, **kw),
        lambda: dg.bald(model, [th, phi], xq, batched=True, **kw),
        lambda: dg.fisher_information(model, phi, xs, ys, **kw),
        lambda: dg.fisher_information(model, phi, xs, kind="mc", samples=2, **kw),
        lambda: dg.fisher_information(model, th, xs, kind="true", batched=True, **kw),
        lambda: dg.adapted_weight_information(model, th, phi, xs, ys, **kw),
        lambda: dg.gradient_alignment(model, th, xs, ys, **kw),
        lambda: dg.prequential_code_length(model, th, xs, ys, adapt, orderings=2, batched=True, **kw),
        lambda: dg.representation_change(model, th, phi, xq, **kw),
        lambda: dg.curvature(model, th, xs, ys, iters=3, samples=2, batched=True, **kw),
        lambda: dg.metagradient_discrepancy(model, th, xs, ys, xq, yq, adapt=adapt, batched=True, **kw),
        lambda: dg.diagnose_adaptation(model, th, adapt, (xs, ys, xq, yq), orderings=1, power_iters=3,
                                       hutchinson_samples=2, **kw),
    ]
    for call in calls:
        snap = snapshot(model)
        call()
        assert_same(model, snap)


def test_training_is_bit_identical_with_diagnostics_on_and_off():
    def train(with_diagnostics):
        model = bn_dropout_net(seed=3)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(123)
        for _ in range(3):
            x, y = torch.randn(8, 3), torch.randint(0, 4, (8,))
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if with_diagnostics:
                adapt = dg.sgd_adapt(model, lr=0.5, steps=1)
                dg.diagnose_adaptation(model, None, adapt, tasks(T=2), which=["kl", "fisher", "bald", "prequential"],
                                       fisher_kind="mc", orderings=1)
        return [t.clone() for t in list(model.parameters()) + list(model.buffers())]

    for a, b in zip(train(False), train(True)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------
# clear errors
# ----------------------------------------------------------------------------------------
def test_regression_without_sigma_names_the_fix():
    model = nn.Linear(2, 1).double()
    x = torch.randn(4, 2)
    for call in (lambda: dg.adaptation_kl(model, None, None, x, likelihood="gaussian"),
                 lambda: dg.fisher_information(model, None, x, torch.randn(4), likelihood="regression"),
                 lambda: dg.curvature(model, None, x, torch.randn(4), likelihood="gaussian")):
        with pytest.raises(ValueError, match=r"pass sigma=<float>"):
            call()
    with pytest.raises(ValueError, match="positive"):
        dg.adaptation_kl(model, None, None, x, likelihood="gaussian", sigma=0.0)


def test_wrong_number_of_classes_names_the_fix():
    model = mlp(N=4)
    xs, ys, xq, yq = [t[0] for t in tasks()]
    with pytest.raises(ValueError, match=r"outputs 4 logits per example but num_classes=5"):
        dg.adaptation_kl(model, None, None, xq, num_classes=5)
    with pytest.raises(ValueError, match=r"outputs 4 logits per example but num_classes=3"):
        dg.fisher_information(model, None, xs, ys, num_classes=3)
    bad = ys.clone()
    bad[0] = 6
    for call in (lambda: dg.fisher_information(model, None, xs, bad),
                 lambda: dg.entropy_change(model, None, None, xs, bad),
                 lambda: dg.gradient_alignment(model, None, torch.stack([xs, xs]), torch.stack([bad, ys])),
                 lambda: dg.curvature(model, None, xs, bad)):
        with pytest.raises(ValueError, match=r"labels range over \[\d+, 6\] but the model outputs 4 logits"):
            call()
    with pytest.raises(ValueError, match="integer class labels"):
        dg.fisher_information(model, None, xs, ys.double())
    with pytest.raises(ValueError, match="at least 2 classes"):
        dg.adaptation_kl(mlp(N=1), None, None, xq)


class CdistNet(nn.Module):
    """Logits = −distance to learned prototypes: torch.cdist has no double backward."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4).double()
        self.protos = nn.Parameter(torch.randn(3, 4, dtype=F64))

    def forward(self, x):
        return -torch.cdist(self.embed(x), self.protos)


def test_op_without_double_backward_raises_second_order_unavailable():
    torch.manual_seed(0)
    model = CdistNet()
    xs, ys, xq, yq = [t[0] for t in tasks(N=3)]
    with pytest.raises(dg.SecondOrderUnavailable, match=r"(?s)cdist.*Fix:"):
        dg.curvature(model, None, xs, ys, iters=2, samples=0)
    with pytest.raises(dg.SecondOrderUnavailable, match="Fix:"):
        dg.metagradient_discrepancy(model, None, xs, ys, xq, yq, lr=0.1)
    assert dg.fisher_information(model, None, xs, ys).value > 0  # first order is fine


def test_weights_with_wrong_names_or_shapes():
    model = mlp()
    x = torch.randn(4, 3)
    with pytest.raises(KeyError, match="named_parameters"):
        dg.adaptation_kl(model, {"nope": torch.zeros(1)}, None, x)
    with pytest.raises(ValueError, match="named_parameters"):
        dg.adaptation_kl(model, [torch.zeros(1)], None, x)
    with pytest.raises(ValueError, match="shape"):
        dg.adaptation_kl(model, {"0.weight": torch.zeros(2, 2)}, None, x)


# ----------------------------------------------------------------------------------------
# diagnose_adaptation and its report
# ----------------------------------------------------------------------------------------
def test_diagnose_adaptation_report(tmp_path):
    model = mlp()
    data = tasks(T=3)
    adapt = dg.sgd_adapt(model, lr=0.5, steps=3)
    rep = dg.diagnose_adaptation(model, None, adapt, data, orderings=2, power_iters=10, hutchinson_samples=3)
    expected = ["kl/forward", "kl/js", "entropy/delta", "cross_entropy/delta", "weight_information", "cka/0",
                "erank_phi/2", "bald", "fisher_theta/trace", "fisher_phi/trace", "alignment/cosine_matrix",
                "alignment/sq_norm_mean_grad", "code/L_preq", "code/switch", "curvature/lambda_max",
                "curvature/stability_ratio", "metagrad/cosine", "metagrad/variance_second_order"]
    for key in expected:
        assert key in rep, key
    assert rep["kl/forward"].per_task.shape == (3,)
    assert rep["kl/forward"].ci95 == pytest.approx(hand_ci95(rep["kl/forward"].per_task), rel=1e-12)
    # per inner step: θ, φ_1, φ_2, φ_3
    assert len(rep.steps["kl/forward"]) == 4 and rep.steps["kl/forward"][0].value == 0.0
    xs, ys, xq, _ = data
    phis = {k: torch.stack([adapt(theta_of(model), xs[t], ys[t])[k] for t in range(3)]) for k in theta_of(model)}
    direct = dg.adaptation_kl(model, None, phis, xq)
    torch.testing.assert_close(rep["kl/forward"].per_task, direct["kl/forward"].per_task, rtol=1e-12, atol=0)
    assert rep["curvature/stability_ratio"].value == pytest.approx(0.5 * rep["curvature/lambda_max"].value)
    table = rep.to_table()
    assert "kl/forward" in table and "per inner step" in table and "step 3" in table
    parsed = json.loads(rep.to_json(str(tmp_path / "r.json")))
    assert parsed["results"]["kl/forward"]["units"] == "nats"
    assert len(parsed["steps"]["kl/forward"]) == 4
    assert json.loads((tmp_path / "r.json").read_text()) == parsed


def test_diagnose_adaptation_variants():
    model = mlp()
    xs, ys, xq, yq = tasks(T=2)
    as_dicts = [dict(x_support=xs[t], y_support=ys[t], x_query=xq[t], y_query=yq[t]) for t in range(2)]
    step = dg.sgd_adapt(model, lr=0.5, steps=1)
    plain = lambda p, x, y: step(p, x, y)  # noqa: E731  (no .step/.steps: final values only)
    rep = dg.diagnose_adaptation(model, None, plain, as_dicts, which=["kl", "entropy"], inner_steps=2)
    assert len(rep.steps["kl/forward"]) == 3
    rep2 = dg.diagnose_adaptation(model, None, dg.sgd_adapt(model, lr=0.5, steps=2), as_dicts, which=["kl"])
    assert rep2["kl/forward"].value == pytest.approx(rep["kl/forward"].value, rel=1e-12)
    rep3 = dg.diagnose_adaptation(model, None, plain, as_dicts, which=["kl"])
    assert rep3.steps == {}
    with pytest.raises(ValueError, match="unknown diagnostics"):
        dg.diagnose_adaptation(model, None, plain, as_dicts, which=["nope"])
    # regression: BALD is skipped, σ is required
    reg = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    rt = (xs, torch.randn(2, 6), xq, torch.randn(2, 5))
    adapt = dg.sgd_adapt(reg, lr=0.1, steps=2, likelihood="gaussian", sigma=0.5)
    with pytest.raises(ValueError, match="sigma="):
        dg.diagnose_adaptation(reg, None, adapt, rt, likelihood="gaussian")
    rr = dg.diagnose_adaptation(reg, None, adapt, rt, likelihood="gaussian", sigma=0.5,
                                which=["kl", "entropy", "fisher", "curvature", "metagrad"])
    assert rr["entropy/delta"].value == 0.0 and rr["kl/forward"].value > 0
    full = dg.diagnose_adaptation(reg, None, adapt, rt, likelihood="gaussian", sigma=0.5, orderings=1,
                                  power_iters=3, hutchinson_samples=1)
    assert "bald" in full.skipped and "bald" not in full


def test_diagnose_with_batchnorm_in_batch_mode():
    model = bn_dropout_net()
    data = tasks(T=2)
    adapt = dg.sgd_adapt(model, lr=0.3, steps=2, bn_mode="batch")
    rep = dg.diagnose_adaptation(model, None, adapt, data, bn_mode="batch", orderings=1, power_iters=3,
                                 hutchinson_samples=2, which=["kl", "fisher", "alignment", "curvature", "metagrad"])
    assert rep["fisher_theta/trace"].estimator["per_example"] == "jacrev"
    assert rep.settings["bn_mode"] == "batch"


def test_plot_needs_matplotlib(tmp_path, monkeypatch):
    model = mlp()
    rep = dg.diagnose_adaptation(model, None, dg.sgd_adapt(model, lr=0.5, steps=2), tasks(T=2), which=["kl"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'diffopt\[plot\]'"):
        rep.plot(str(tmp_path / "r.png"))


def test_plot_when_matplotlib_is_installed(tmp_path):
    import matplotlib  # noqa: F401  (in the test extra: a missing matplotlib fails here, it is not skipped)
    model = mlp()
    rep = dg.diagnose_adaptation(model, None, dg.sgd_adapt(model, lr=0.5, steps=2), tasks(T=2), which=["kl", "entropy"])
    assert (tmp_path / "r.png").exists() is False
    rep.plot(str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 0
    dg.plot_history([rep, rep], str(tmp_path / "h.png"), keys=["kl/forward"])
    assert (tmp_path / "h.png").exists()


# ----------------------------------------------------------------------------------------
# one settings object
# ----------------------------------------------------------------------------------------
def test_settings_object_equals_keyword_arguments_and_keywords_override_it():
    model = mlp()
    xs, ys, xq, yq = tasks(T=3)
    th, phi = theta_of(model), batched_phi(model, 3)
    a = dg.adaptation_kl(model, th, phi, xq, settings=dg.DiagnosticSettings(num_classes=4))
    b = dg.adaptation_kl(model, th, phi, xq, num_classes=4)
    assert a.to_dict() == b.to_dict()
    f_settings = dg.fisher_information(model, th, xs[0], ys[0], kind="mc", settings=dg.DiagnosticSettings(seed=5))
    f_keyword = dg.fisher_information(model, th, xs[0], ys[0], kind="mc", seed=5)
    f_override = dg.fisher_information(model, th, xs[0], ys[0], kind="mc", settings=dg.DiagnosticSettings(seed=1),
                                       seed=5)
    f_other = dg.fisher_information(model, th, xs[0], ys[0], kind="mc", seed=1)
    assert f_settings.value == f_keyword.value == f_override.value != f_other.value
    adapt = dg.sgd_adapt(model, lr=0.3, steps=2)
    which = ["kl", "prequential", "fisher"]
    r_settings = dg.diagnose_adaptation(model, th, adapt, tasks(), which=which,
                                        settings=dg.DiagnosticSettings(orderings=3, seed=2, fisher_kind="empirical"))
    r_keyword = dg.diagnose_adaptation(model, th, adapt, tasks(), which=which, orderings=3, seed=2,
                                       fisher_kind="empirical")
    assert r_settings.to_json() == r_keyword.to_json()
    assert r_settings["code/L_preq"].estimator["orderings"] == 3


def test_settings_errors_and_signatures():
    import dataclasses
    import inspect

    s = dg.DiagnosticSettings(sigma=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.sigma = 1.0  # type: ignore[misc]
    assert s.replace(orderings=4).orderings == 4 and s.orderings == 2
    with pytest.raises(TypeError, match="did you mean 'orderings'"):
        s.replace(ordering=4)
    model = mlp()
    adapt = dg.sgd_adapt(model, lr=0.3)
    with pytest.raises(TypeError, match="diagnose_adaptation.*'ordrings'; did you mean 'orderings'"):
        dg.diagnose_adaptation(model, theta_of(model), adapt, tasks(), which=["kl"], ordrings=3)
    with pytest.raises(TypeError, match="adaptation_kl.*'per_example'"):  # a field this diagnostic does not read
        dg.adaptation_kl(model, None, None, tasks()[2][0], per_example="loop")
    with pytest.raises(TypeError, match="settings must be a DiagnosticSettings"):
        dg.adaptation_kl(model, None, None, tasks()[2][0], settings={"bn_mode": "eval"})
    # the signatures still list every keyword users pass (help(), IDEs)
    for fn, names in [(dg.diagnose_adaptation, ("orderings", "sigma", "bn_mode", "seed", "settings", "which")),
                      (dg.diagnose, ("sigma", "num_classes", "power_iters", "settings", "steps")),
                      (dg.adaptation_kl, ("likelihood", "sigma", "bn_mode", "batched", "reduction", "settings"))]:
        assert set(names) <= set(inspect.signature(fn).parameters), fn.__name__
    assert "likelihood" not in inspect.signature(dg.diagnose).parameters  # decided from the labels
