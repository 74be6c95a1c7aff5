"""diffopt.diagnostics for meta-learners: diagnose(), headline(), DiagnosticsCallback and ``diffopt diagnose``.

* diagnose() adapts with the learner's own inner loop: on MAML, FOMAML, Meta-SGD (per-element rates),
  MAML++ (per-step rates), ANIL (head over features) and Reptile its values equal the underlying
  functions called with an independent reference adaptation written here (float64, 1e-10);
* bad input fails with a message naming the fix: regression without sigma, labels the head cannot
  produce, a metric learner, a second-order diagnostic on a model without second derivatives;
* DiagnosticsCallback: training with and without it gives bit-identical weights (torch.equal) and the
  same metrics apart from the added keys, on sinusoid and on the synthetic few-shot family;
* the CLI on a checkpoint written by ``diffopt train``; the headline's format.
"""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import diffopt.diagnostics as dg
from diagnostics_helpers import F64, gen
from diffopt.algorithms import ANIL, FOMAML, MAML, MAMLPlusPlus, MetaSGD, PrototypicalNetwork, Reptile
from diffopt.cli import diagnose as diag_cli
from diffopt.training.experiment import rebuild
from diffopt.recipes import EpisodeSource, SinusoidSource, make_learner, mlp_classifier, sinusoid_mlp
from diffopt.tasks import synthetic_vectors
from diffopt.training import Trainer

TOL = dict(rtol=1e-10, atol=1e-10)
pytestmark = [
    pytest.mark.usefixtures("single_thread", "float64_default"),
    # torch.func.hessian's forward-mode pass loads jit decompositions, which warn on torch 2.13
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]


def regression_tasks(T=3, n=6, m=5, seed=0):
    g = gen(seed)
    xs, xq = torch.randn(T, n, 1, generator=g), torch.randn(T, m, 1, generator=g)
    a = 1 + torch.rand(T, 1, 1, generator=g)
    return xs, a * torch.sin(2 * xs), xq, a * torch.sin(2 * xq)


def classification_tasks(T=3, n=6, m=5, d=4, N=3, seed=0):
    g = gen(seed)
    return (torch.randn(T, n, d, generator=g), torch.arange(n).remainder(N).repeat(T, 1),
            torch.randn(T, m, d, generator=g), torch.randint(0, N, (T, m), generator=g))


def reg_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))


def cls_net(seed=0, d=4, N=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, N))


class RefSGD:
    """An independent reference adaptation: ``steps`` of φ ← φ − α_k ⊙ ∇ loss(φ) with plain autograd.

    ``rate(step, name)`` gives the learning rate (number or per-element tensor); builds the second-order
    graph when the given weights require grad (so metagradients flow), none otherwise.
    """

    def __init__(self, model, loss_fn, rate, steps):
        self.model, self.loss_fn, self.rate, self.steps = model, loss_fn, rate, steps

    def __call__(self, params, x, y, steps=None):
        graph = torch.is_grad_enabled() and any(p.requires_grad for p in params.values())
        p = dict(params) if graph else {n: v.detach().requires_grad_(True) for n, v in params.items()}
        for k in range(self.steps if steps is None else steps):
            with torch.enable_grad():
                loss = self.loss_fn(functional_call(self.model, p, (x,)), y)
                gs = torch.autograd.grad(loss, list(p.values()), create_graph=graph)
            p = {n: v - self.rate(k, n) * g for (n, v), g in zip(p.items(), gs)}
            if not graph:
                p = {n: v.detach().requires_grad_(True) for n, v in p.items()}
        return p if graph else {n: v.detach() for n, v in p.items()}


def theta_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def stack(dicts):
    return {n: torch.stack([d[n] for d in dicts]) for n in dicts[0]}


def make_case(name):
    """(learner, model evaluated, reference adapt, tasks as seen by the model, raw tasks, sigma, steps)."""
    K = 2
    if name == "maml":
        learner = MAML(reg_net(), F.mse_loss, inner_lr=0.1, inner_steps=K)
        ref = RefSGD(learner.model, F.mse_loss, lambda k, n: 0.1, K)
        tasks, sigma = regression_tasks(), 0.5
    elif name == "fomaml":
        learner = FOMAML(cls_net(), F.cross_entropy, inner_lr=0.5, inner_steps=K)
        ref = RefSGD(learner.model, F.cross_entropy, lambda k, n: 0.5, K)
        tasks, sigma = classification_tasks(), None
    elif name == "metasgd":
        learner = MetaSGD(reg_net(), F.mse_loss, inner_steps=K, lr_init=(0.01, 0.3), generator=gen(3))
        rates = {n: lr.detach().clone() for (n, _), lr in zip(learner.model.named_parameters(), learner.inner_lrs)}
        assert len({float(r.flatten()[0]) for r in rates.values()}) > 1
        ref = RefSGD(learner.model, F.mse_loss, lambda k, n: rates[n], K)
        tasks, sigma = regression_tasks(), 0.5
    elif name == "mamlpp":
        learner = MAMLPlusPlus(reg_net(), F.mse_loss, inner_lr=0.1, inner_steps=K)
        per_step = [[0.05, 0.2], [0.15, 0.1], [0.08, 0.3], [0.12, 0.07]]  # rate of tensor j at step k
        with torch.no_grad():
            for j, lr in enumerate(learner.step_lrs):
                lr.copy_(torch.tensor(per_step[j]))
        names = [n for n, _ in learner.model.named_parameters()]
        ref = RefSGD(learner.model, F.mse_loss, lambda k, n: per_step[names.index(n)][k], K)
        tasks, sigma = regression_tasks(), 0.5
    elif name == "anil":
        torch.manual_seed(0)
        body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        head = nn.Linear(6, 3)
        learner = ANIL(body, head, F.cross_entropy, inner_lr=0.5, inner_steps=K)
        ref = RefSGD(head, F.cross_entropy, lambda k, n: 0.5, K)
        raw, sigma = classification_tasks(), None
        with torch.no_grad():
            feats = (body(raw[0]), raw[1], body(raw[2]), raw[3])
        return learner, head, ref, feats, raw, sigma, K
    elif name == "reptile":
        learner = Reptile(cls_net(), F.cross_entropy, inner_lr=0.3, inner_steps=K)
        ref = RefSGD(learner.model, F.cross_entropy, lambda k, n: 0.3, K)
        tasks, sigma = classification_tasks(), None
    else:
        raise KeyError(name)
    return learner, learner.model, ref, tasks, tasks, sigma, K


def per_task(d):
    return d.per_task


@pytest.mark.parametrize("name", ["maml", "fomaml", "metasgd", "mamlpp", "anil", "reptile"])
def test_diagnose_matches_the_functions_with_a_reference_adaptation(name):
    learner, model, ref, tasks, raw, sigma, K = make_case(name)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    rng = torch.get_rng_state()
    xs, ys, xq, yq = tasks
    T = xs.shape[0]
    lik = dict(likelihood="gaussian", sigma=sigma) if sigma is not None else {}
    th = theta_of(model)
    trajs = [[ref(th, xs[t], ys[t], steps=k) for t in range(T)] for k in range(K + 1)]
    phi = stack(trajs[K])
    rep = dg.diagnose(learner, raw, sigma=sigma, which=["kl", "entropy", "fisher", "weight_information",
                                                         "representation", "metagrad"])
    assert rep.settings["learner"] == type(learner).__name__ and rep.settings["inner_steps"] == K
    # 1: adaptation KL, at every inner step
    for k in range(K + 1):
        ref_kl = dg.adaptation_kl(model, th, stack(trajs[k]), xq, **lik)
        torch.testing.assert_close(rep.steps["kl/forward"][k].per_task, ref_kl["kl/forward"].per_task, **TOL)
    assert float(rep.steps["kl/forward"][0].value) == 0.0
    # 2: entropy / cross-entropy change
    ent = dg.entropy_change(model, th, phi, xq, yq, **lik)
    for key in ("entropy/delta", "cross_entropy/delta", "cross_entropy/phi"):
        torch.testing.assert_close(rep[key].per_task, ent[key].per_task, **TOL)
    # 3: Fisher at theta and phi on the support set; 3b: information in the weights
    f_theta = dg.fisher_information(model, th, xs, kind="true", batched=True, **lik)
    f_phi = dg.fisher_information(model, phi, xs, kind="true", **lik)
    torch.testing.assert_close(rep["fisher_theta/trace"].per_task, f_theta.per_task, **TOL)
    torch.testing.assert_close(rep["fisher_phi/trace"].per_task, f_phi.per_task, **TOL)
    assert rep["fisher_phi/trace"].by_layer.keys() == f_phi.by_layer.keys()
    wi = dg.adapted_weight_information(model, th, phi, xs, ys, fisher_kind="true", **lik)
    torch.testing.assert_close(rep["weight_information"].per_task, wi.per_task, **TOL)
    for k in range(K + 1):
        wik = dg.adapted_weight_information(model, th, stack(trajs[k]), xs, ys, fisher_kind="true", **lik)
        torch.testing.assert_close(rep.steps["weight_information"][k].per_task, wik.per_task, **TOL)
    # 6: representation change
    rc = dg.representation_change(model, th, phi, xq)
    for key in rc:
        torch.testing.assert_close(rep[key].per_task, rc[key].per_task, **TOL)
    # 8: first- vs second-order meta-gradient, through the learner's loop vs the reference unroll
    mg = dg.metagradient_discrepancy(model, th, xs, ys, xq, yq, adapt=ref, loss_fn=learner.loop.loss_fn,
                                     batched=True)
    for key in ("metagrad/cosine", "metagrad/relative_error"):
        torch.testing.assert_close(rep[key].per_task, mg[key].per_task, **TOL)
    torch.testing.assert_close(torch.tensor(float(rep["metagrad/variance_second_order"].value)),
                               torch.tensor(float(mg["metagrad/variance_second_order"].value)), **TOL)
    # 5, 4, 7 in calls of their own (each restarts the explicit generator from the seed)
    rep5 = dg.diagnose(learner, raw, sigma=sigma, which=["prequential"], orderings=2, seed=4)
    code = dg.prequential_code_length(model, th, xs, ys, ref, orderings=2, seed=4, batched=True, **lik)
    for key in code:
        torch.testing.assert_close(rep5[key].per_task, code[key].per_task, **TOL)
    rep4 = dg.diagnose(learner, raw, sigma=sigma, which=["alignment"], seed=5)
    al = dg.gradient_alignment(model, th, xs, ys, loss_fn=learner.loop.loss_fn, seed=5)
    torch.testing.assert_close(rep4["alignment/cosine_matrix"].value, al["alignment/cosine_matrix"].value, **TOL)
    torch.testing.assert_close(rep4["alignment/within_task_dot"].per_task, al["alignment/within_task_dot"].per_task,
                               **TOL)
    rep7 = dg.diagnose(learner, raw, sigma=sigma, which=["curvature"], power_iters=8, hutchinson_samples=3, seed=6)
    lr = learner.loop.optimizer.param_groups[0]["lr"]
    uniform = name in ("maml", "fomaml", "anil", "reptile")
    cv = dg.curvature(model, th, xs, ys, loss_fn=learner.loop.loss_fn, lr=lr if uniform else None, iters=8,
                      tol=1e-6, samples=3, seed=6, batched=True)
    for key in ("curvature/lambda_max", "curvature/hessian_trace") + (("curvature/stability_ratio",) if uniform else ()):
        torch.testing.assert_close(rep7[key].per_task, cv[key].per_task, **TOL)
    if not uniform:  # ρ = λ_max(D^½ H D^½) from an explicit Hessian
        rep7b = dg.diagnose(learner, raw, sigma=sigma, which=["curvature"], power_iters=300, power_tol=0.0,
                            hutchinson_samples=0)
        names = list(th)
        rates = torch.cat([dg.inner_learning_rates(learner.loop, 0)[n].reshape(-1) for n in names])
        sizes = [th[n].numel() for n in names]
        for t in range(T):
            def loss(flat):
                parts = dict(zip(names, [c.reshape(th[n].shape) for c, n in zip(flat.split(sizes), names)]))
                return learner.loop.loss_fn(functional_call(model, parts, (xs[t],)), ys[t])
            H = torch.func.hessian(loss)(torch.cat([th[n].reshape(-1) for n in names]))
            s = rates.sqrt()
            eig = torch.linalg.eigvalsh(s[:, None] * H * s[None, :])
            top = eig[eig.abs().argmax()].item()
            assert rep7b["curvature/stability_ratio"].per_task[t].item() == pytest.approx(top, rel=1e-4)
    if sigma is None:  # BALD over bootstrap resamples, members adapted by the learner's loop vs the reference
        rep2 = dg.diagnose(learner, raw, which=["bald"], bald_members=3, seed=7)
        g = gen(7)
        vals = []
        for t in range(T):
            members = []
            for _ in range(3):
                idx = torch.randint(0, xs.shape[1], (xs.shape[1],), generator=g)
                members.append(ref(th, xs[t][idx], ys[t][idx]))
            vals.append(float(dg.bald(model, members, xq[t])["bald"].value))
        torch.testing.assert_close(rep2["bald"].per_task, torch.tensor(vals), **TOL)
    # nothing the learner or training depends on moved
    after = learner.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng, torch.get_rng_state())
    if name == "anil":
        assert any("head" in n and "features" in n for n in rep.settings["notes"])
        assert "note: ANIL adapts only its head" in rep.to_table()


def test_diagnose_full_report_table_json_plot(tmp_path):
    learner, *_ = make_case("anil")
    rep = dg.diagnose(learner, classification_tasks(T=4), steps=3, orderings=1, power_iters=4, hutchinson_samples=2)
    for key in ("kl/forward", "kl/js", "entropy/delta", "cross_entropy/delta", "bald", "fisher_theta/trace",
                "fisher_phi/trace", "weight_information", "alignment/cosine_matrix", "alignment/gsnr", "code/savings",
                "code/switch", "cka/", "erank_phi/", "curvature/lambda_max", "curvature/stability_ratio",
                "metagrad/cosine"):
        assert key in rep, key
    assert len(rep.steps["kl/forward"]) == 4 and rep.skipped == {}
    data = json.loads(rep.to_json())
    assert data["settings"]["learner"] == "ANIL" and data["settings"]["inputs"] == "body features"
    assert len(data["steps"]["kl/forward"]) == 4
    table = rep.to_table()
    assert "per inner step" in table and "kl/forward" in table
    import matplotlib  # noqa: F401  (in the test extra: a missing matplotlib fails here, it is not skipped)
    rep.plot(str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 0


def test_diagnose_takes_a_task_source_and_lists_of_tasks():
    torch.manual_seed(0)
    learner = MAML(sinusoid_mlp(8).double(), F.mse_loss, inner_lr=0.01)
    source = SinusoidSource(test_tasks=7, dtype=F64)
    rep = dg.diagnose(learner, source, sigma=0.5, which=["kl"], max_tasks=3)
    assert rep.settings["tasks"] == 3
    sx, sy, qx, qy = next(iter(source.test_batches()))
    rep2 = dg.diagnose(learner, [(sx[t], sy[t], qx[t], qy[t]) for t in range(3)], sigma=0.5, which=["kl"])
    torch.testing.assert_close(rep["kl/forward"].per_task, rep2["kl/forward"].per_task, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def test_regression_without_sigma_names_the_fix():
    learner = MAML(reg_net(), F.mse_loss, inner_lr=0.1)
    with pytest.raises(ValueError, match=r"sigma=<float>.*--sigma"):
        dg.diagnose(learner, regression_tasks())
    with pytest.raises(ValueError, match="sigma="):
        dg.headline(learner, regression_tasks())


def test_labels_the_head_cannot_produce():
    learner = MAML(cls_net(N=3), F.cross_entropy, inner_lr=0.1)
    xs, ys, xq, yq = classification_tasks(N=3)
    ys = ys.clone()
    ys[1, 0] = 4  # a 5-way task on a 3-way head
    with pytest.raises(ValueError, match=r"model outputs 3 logits.*nn.Linear\(features, 5\)"):
        dg.diagnose(learner, (xs, ys, xq, yq), which=["kl"])
    with pytest.raises(ValueError, match=r"num_classes=5.*5-way head"):
        dg.diagnose(learner, classification_tasks(N=3), num_classes=5, which=["kl"])
    bad = MAML(nn.Sequential(nn.Linear(4, 1)), F.cross_entropy, inner_lr=0.1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        dg.diagnose(bad, classification_tasks(), which=["kl"])


def test_metric_learner_is_not_applicable():
    torch.manual_seed(0)
    proto = PrototypicalNetwork(nn.Sequential(nn.Linear(4, 8)))
    with pytest.raises(dg.NotApplicable, match=r"PrototypicalNetwork has none.*What applies.*gradient_alignment"):
        dg.diagnose(proto, classification_tasks())
    assert issubclass(dg.NotApplicable, ValueError)


class _OnceSquare(torch.autograd.Function):
    """x² whose backward cannot be differentiated again (torch.func-compatible, so first-order
    diagnostics with per-example gradients still run)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class OnceNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(_OnceSquare.apply(self.a(x)))


def test_second_order_diagnostic_without_second_derivatives():
    learner = MAML(OnceNet(), F.cross_entropy, inner_lr=0.1, vectorize=False)
    for which in (["curvature"], ["metagrad"]):
        with pytest.raises(dg.SecondOrderUnavailable, match=r"(?s)second derivatives.*Fix:.*which=\[\.\.\.\]"):
            dg.diagnose(learner, classification_tasks(), which=which)
    rep = dg.diagnose(learner, classification_tasks(), orderings=1)  # default: everything else, and why not
    assert {"curvature", "metagrad"} <= set(rep.skipped) and "once_differentiable" in rep.skipped["curvature"]
    assert "kl/forward" in rep and "fisher_phi/trace" in rep and "curvature/lambda_max" not in rep


# ----------------------------------------------------------------------------------------------
# the training callback: bit-identical training
# ----------------------------------------------------------------------------------------------
def _train(family, callback, tmp_path, tag):
    if family == "sinusoid":
        source = SinusoidSource(meta_batch=3, shots=5, query=5, test_tasks=4, dtype=torch.float32)
        torch.manual_seed(0)
        learner = MAML(sinusoid_mlp(16).float(), F.mse_loss, inner_lr=0.01, inner_steps=2)
        sigma = 0.5
    else:
        data = synthetic_vectors(seed=0)
        train, test = data.split([0.7, 0.3], seed=0)
        source = EpisodeSource(train, test, meta_batch=3, ways=3, shots=2, query=4, test_tasks=4, name="synthetic")
        torch.manual_seed(0)
        learner = make_learner("maml", mlp_classifier(train.example_shape[0], 3, hidden=16).float(),
                               classification=True, inner_lr=0.4, inner_steps=1)
        sigma = None
    callbacks = []
    if callback:
        callbacks = [dg.DiagnosticsCallback(source, every=2, which=list(dg.DIAGNOSTICS) if family != "sinusoid"
                                            else [w for w in dg.DIAGNOSTICS if w != "bald"], tasks=3, sigma=sigma,
                                            orderings=1, power_iters=3, hutchinson_samples=2, bald_members=2,
                                            layers=True)]
    metrics = tmp_path / f"{tag}.jsonl"
    trainer = Trainer(learner, source, torch.optim.Adam(learner.parameters(), lr=1e-3), iterations=4, seed=1,
                      log_every=2, eval_steps=(0, 1), metrics=metrics, callbacks=callbacks, progress=False)
    trainer.fit()
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    return learner, lines, callbacks


@pytest.mark.parametrize("family", ["sinusoid", "synthetic"])
def test_callback_leaves_training_bit_identical(family, tmp_path):
    torch.set_default_dtype(torch.float32)
    plain, lines_plain, _ = _train(family, False, tmp_path, "plain")
    rng_plain = torch.get_rng_state()
    diag, lines_diag, (cb,) = _train(family, True, tmp_path, "diag")
    assert torch.equal(rng_plain, torch.get_rng_state())
    for (k, a), (k2, b) in zip(plain.state_dict().items(), diag.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert len(lines_plain) == len(lines_diag)
    added = set()
    for a, b in zip(lines_plain, lines_diag):
        extra = {k for k in b if k.startswith("diagnostics/")}
        added |= extra
        strip = lambda r: {k: v for k, v in r.items() if k != "seconds" and k not in extra}  # noqa: E731
        assert strip(a) == strip(b)
    assert {"diagnostics/kl/forward", "diagnostics/kl/forward/ci95", "diagnostics/code/savings",
            "diagnostics/fisher_phi/trace/by_layer", "diagnostics/metagrad/cosine"} <= added
    logged = [r for r in lines_diag if "diagnostics/kl/forward" in r]
    assert [r["iteration"] for r in logged] == [2, 4]
    lo, hi = logged[0]["diagnostics/kl/forward/ci95"]
    assert lo <= logged[0]["diagnostics/kl/forward"] <= hi
    assert [i for i, _ in cb.history] == [2, 4]


def test_callback_state_untouched_with_batchnorm_and_dropout():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3))
    learner = ANIL(body, nn.Linear(6, 3), F.cross_entropy, inner_lr=0.5, inner_steps=1)
    learner.train()
    cb = dg.DiagnosticsCallback(classification_tasks(T=3), every=1, which=["kl", "fisher", "bald", "prequential"],
                                orderings=1, bald_members=2)
    state = {k: v.clone() for k, v in learner.state_dict().items()}
    flags = [m.training for m in learner.modules()]
    rng = torch.get_rng_state()
    trainer = argparse.Namespace(learner=learner, is_main=True, log_every=1)
    out = cb(trainer, 1)
    assert out["diagnostics/kl/forward"] >= 0
    assert all(torch.equal(state[k], v) for k, v in learner.state_dict().items())
    assert flags == [m.training for m in learner.modules()] and torch.equal(rng, torch.get_rng_state())
    assert cb(trainer, 2)["diagnostics/bald"] >= 0


# ----------------------------------------------------------------------------------------------
# the command line, on a checkpoint written by diffopt train
# ----------------------------------------------------------------------------------------------
def _parse(argv):
    parser = argparse.ArgumentParser(prog="diffopt")
    diag_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_diagnose_a_train_checkpoint(tmp_path, capsys):
    from diffopt.cli import main

    torch.set_default_dtype(torch.float32)
    ckpt = tmp_path / "maml.pt"
    assert main(["train", "--task", "sinusoid", "--algo", "maml", "--iterations", "2", "--test-tasks", "4",
                 "--eval-steps", "0,1", "--checkpoint", str(ckpt), "--no-progress"]) == 0
    capsys.readouterr()
    out_json, out_png = tmp_path / "d.json", tmp_path / "d.png"
    args = _parse(["diagnose", str(ckpt), "--tasks", "3", "--sigma", "0.5", "--which", "kl", "fisher",
                   "prequential", "--steps", "2", "--json", str(out_json)])
    assert diag_cli.run(args) == 0
    text = capsys.readouterr().out
    assert "MAML after 2 meta-iterations, 3 test tasks of sinusoid" in text
    assert "kl/forward" in text and "code/savings" in text and "per inner step" in text
    report = json.loads(out_json.read_text())
    assert report["settings"]["tasks"] == 3 and len(report["steps"]["kl/forward"]) == 3
    # the weights are the checkpoint's
    learner, _, payload = rebuild(str(ckpt), 3)
    assert all(torch.equal(v, payload["learner"][k]) for k, v in learner.state_dict().items())
    # regression without --sigma, and a missing file: one line naming the fix, status 2
    assert diag_cli.run(_parse(["diagnose", str(ckpt)])) == 2
    assert "--sigma S" in capsys.readouterr().err
    assert diag_cli.run(_parse(["diagnose", str(tmp_path / "nope.pt"), "--sigma", "1"])) == 2
    capsys.readouterr()
    import matplotlib  # noqa: F401  (in the test extra: a missing matplotlib fails here, it is not skipped)
    assert diag_cli.run(_parse(["diagnose", str(ckpt), "--tasks", "2", "--sigma", "0.5", "--which", "kl",
                                "--plot", str(out_png)])) == 0
    assert out_png.stat().st_size > 0
    # --power-iters reaches the curvature; too few iterations are flagged in the printed report
    with pytest.warns(dg.CurvatureConvergenceWarning, match="power_iters=1 Lanczos"):
        assert diag_cli.run(_parse(["diagnose", str(ckpt), "--tasks", "2", "--sigma", "0.5", "--which", "curvature",
                                    "--power-iters", "1", "--json", str(out_json)])) == 0
    assert "curvature/lambda_max is not converged on 2 of 2 tasks" in capsys.readouterr().out
    assert json.loads(out_json.read_text())["results"]["curvature/lambda_max"]["estimator"]["iterations"] == 1


def test_cli_metric_checkpoint_and_anil(tmp_path, capsys):
    from diffopt.cli import main

    torch.set_default_dtype(torch.float32)
    for algo in ("protonet", "anil"):
        steps = ["--eval-steps", "0,1"] if algo == "anil" else []  # protonet has no test-time steps
        assert main(["train", "--task", "synthetic", "--algo", algo, "--iterations", "1", "--test-tasks", "3",
                     *steps, "--checkpoint", str(tmp_path / f"{algo}.pt"), "--no-progress"]) == 0
    capsys.readouterr()
    assert diag_cli.run(_parse(["diagnose", str(tmp_path / "protonet.pt")])) == 2
    err = capsys.readouterr().err
    assert "PrototypicalNetwork has none" in err and "Traceback" not in err
    assert diag_cli.run(_parse(["diagnose", str(tmp_path / "anil.pt"), "--tasks", "3", "--which", "kl", "bald"])) == 0
    out = capsys.readouterr().out
    assert "ANIL adapts only its head" in out and "bald" in out


# ----------------------------------------------------------------------------------------------
# headline
# ----------------------------------------------------------------------------------------------
def test_headline_format():
    torch.manual_seed(0)
    learner = MAML(sinusoid_mlp(16).double(), F.mse_loss, inner_lr=0.01, inner_steps=1)
    source = SinusoidSource(test_tasks=6, dtype=F64)
    text = dg.headline(learner, source, sigma=0.5)
    lines = text.splitlines()
    assert len(lines) == 6 and lines[0].startswith("diagnostics of adaptation (MAML, 6 test tasks, 1 inner step(s)")
    assert "nats per query point" in lines[1] and "±" in lines[1]
    assert "bits per support set" in lines[2]
    assert "Fisher trace" in lines[3] and "theta" in lines[3] and "phi" in lines[3]
    assert "cosine" in lines[4]
    assert "stability ratio rho = lr * lambda_max" in lines[5] and "rho > 2" in lines[5]
    number = lines[1].split(":")[1].split("±")[0]
    assert math.isfinite(float(number)) and float(number) >= 0
    meta_sgd = MetaSGD(sinusoid_mlp(8).double(), F.mse_loss, generator=gen(0))
    assert "stability ratio" in dg.headline(meta_sgd, source, sigma=0.5).splitlines()[-1]


def test_headline_marks_an_unconverged_stability_ratio(monkeypatch):
    """headline's rho line says when lambda_max (Lanczos) stopped unconverged, for a uniform rate (lr *
    lambda_max) and per-element rates (MetaSGD's preconditioned Hessian) alike; at its own 20 iterations
    the same learners converge."""
    import diffopt.diagnostics.learner as learner_module

    source = SinusoidSource(test_tasks=3, dtype=F64)
    torch.manual_seed(0)
    learners = [MAML(sinusoid_mlp(16).double(), F.mse_loss, inner_lr=0.01, inner_steps=1),
                MetaSGD(sinusoid_mlp(8).double(), F.mse_loss, generator=gen(0))]
    for learner in learners:
        assert "NOT CONVERGED" not in dg.headline(learner, source, sigma=0.5).splitlines()[-1]
    original = learner_module.diagnose
    monkeypatch.setattr(learner_module, "diagnose", lambda *a, **k: original(*a, **{**k, "power_iters": 1}))
    for learner in learners:
        with pytest.warns(dg.CurvatureConvergenceWarning, match="power_iters=1"):
            last = dg.headline(learner, source, sigma=0.5).splitlines()[-1]
        assert "stability ratio" in last and "NOT CONVERGED on 3 of 3 tasks, a lower bound" in last, last


# ----------------------------------------------------------------------------------------------
# a bug found by the study: the true Fisher diagonal in float32
# ----------------------------------------------------------------------------------------------
def test_true_fisher_diagonal_is_nonnegative_in_float32():
    """diag(JᵀΛJ) with Λ = diag(p) − ppᵀ is a variance of J under p; computed as E[J²] − (E J)² it cancels
    to negative values in float32 when the classes' Jacobians are nearly equal (it did, mid meta-training,
    and the weight information then refused the negative diagonal). The centred form is ≥ 0 and accurate."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5))
    with torch.no_grad():
        model[2].weight.copy_(100 + 1e-3 * torch.randn(5, 8))
    x = torch.randn(30, 4)
    d32 = dg.fisher_information(model, None, x, kind="true")
    d64 = dg.fisher_information(model.double(), None, x.double(), kind="true")
    for k, v in d32.details["diagonal"].items():
        assert (v >= 0).all()
        ref = d64.details["diagonal"][k]
        assert torch.allclose(v.double(), ref, rtol=1e-2, atol=1e-4 * float(ref.abs().max())), k
    model.float()
    assert dg.adapted_weight_information(model, None, None, x, fisher_kind="true").value >= 0


def test_learners_declare_how_they_adapt_and_diagnose_reads_it():
    assert MAML.has_inner_loop and Reptile.has_inner_loop and not PrototypicalNetwork.has_inner_loop
    assert MAML.outer_update == "meta_gradient" and Reptile.outer_update == "towards_adapted"
    assert not MAML(cls_net(), F.cross_entropy).adapts_features
    body, head = nn.Sequential(nn.Linear(4, 6), nn.Tanh()), nn.Linear(6, 3)
    assert ANIL(body, head, F.cross_entropy).adapts_features
    assert not ANIL(body, head, F.cross_entropy, mode="es").adapts_features  # runs the whole model

    class TowardsAdapted(MAML):  # a user's learner declaring a Reptile-like outer step
        outer_update = "towards_adapted"

    rep = dg.diagnose(TowardsAdapted(cls_net(), F.cross_entropy, inner_lr=0.5), classification_tasks(), which=["kl"])
    assert any("TowardsAdapted itself follows neither" in n for n in rep.settings["notes"])
    plain = dg.diagnose(MAML(cls_net(), F.cross_entropy, inner_lr=0.5), classification_tasks(), which=["kl"])
    assert not any("follows neither" in n for n in plain.settings["notes"])
    with pytest.raises(ValueError, match="settings.likelihood is decided by the learner"):
        dg.diagnose(MAML(cls_net(), F.cross_entropy), classification_tasks(), which=["kl"],
                    settings=dg.DiagnosticSettings(likelihood="gaussian", sigma=1.0))
