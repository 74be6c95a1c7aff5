"""Learned rules outside the engine: save/load, the drop-in torch.optim optimizer,
meta-training with truncated unrolls (exact resume), and the ``train-optimizer`` command."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import Tensor, nn

import diffopt.optim.learned as L
from diffopt.optim import SGD, Adam
from diffopt.cli import train_optimizer as cli
from diffopt.optim.learned.serialization import FORMAT, VERSION
from diffopt.training import CheckpointError

F64 = torch.float64


def make_model(seed: int = 0, dtype: torch.dtype = F64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def batch(seed: int = 0, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, generator=g, dtype=dtype), torch.randn(8, 2, generator=g, dtype=dtype)


def perturbed(opt, seed: int = 0, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in L.serialization.live_tensors(opt).values():
            t.add_(scale * torch.randn(t.shape, generator=g, dtype=t.dtype))
    return opt


def rule(kind: str, params):
    params = list(params)
    g = torch.Generator().manual_seed(3)
    if kind == "lstm":
        return perturbed(L.LSTMOptimizer(params, hidden_size=4, generator=g))
    if kind == "mlp":
        return perturbed(L.MLPOptimizer(params, hidden=(6,), lr=0.02, generator=g))
    if kind == "meta_curvature":
        return perturbed(L.MetaCurvature(params, 0.1))
    if kind == "meta_sgd":
        return L.meta_sgd(params, (0.01, 0.1), generator=g, momentum=0.5)
    if kind == "per_layer_per_step":
        return perturbed(L.per_layer_per_step(params, 2, 0.05), scale=0.01)
    if kind == "hypergradient_sgd":
        return L.HypergradientSGD(params, lr=0.05, hyper_lr=0.01)
    return L.make_rule("hypergradient_adam", params, lr=0.01, hyper_lr=1e-4)


KINDS = list(L.serialization.KINDS)


def run_functional(opt, model: nn.Module, steps: int) -> list[Tensor]:
    """The rule applied by its own pure update on plain gradients."""
    params = [p.detach().clone() for p in model.parameters()]
    states: list = [None] * len(params)
    x, y = batch()
    for step in range(steps):
        leaves = [p.requires_grad_() for p in params]
        out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], leaves)), (x,))
        grads = torch.autograd.grad(((out - y) ** 2).mean(), leaves)
        with torch.no_grad():
            params, states = opt.update([p.detach() for p in leaves], list(grads), states, step)
        params = [p.detach() for p in params]
    return params


def run_dropin(opt: torch.optim.Optimizer, model: nn.Module, steps: int) -> list[Tensor]:
    x, y = batch(dtype=next(model.parameters()).dtype)
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


# -- drop-in -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_dropin_makes_the_same_updates_as_the_functional_rule(kind):
    model = make_model()
    functional = rule(kind, model.parameters())
    reference = run_functional(functional, make_model(), 4)
    dropin = L.DropInOptimizer(rule(kind, model.parameters()))
    assert isinstance(dropin, torch.optim.Optimizer)
    ours = run_dropin(dropin, model, 4)
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_and_state_dict_resume(kind, tmp_path):
    model = make_model()
    original = rule(kind, model.parameters())
    path = tmp_path / f"{kind}.pt"
    L.save(original, path, metadata={"note": "test"})
    payload = torch.load(path, weights_only=True)  # plain data: nothing is unpickled
    assert payload["format"] == FORMAT and payload["version"] == VERSION and payload["kind"] == kind
    saved = L.read(path)
    for name, tensor in L.serialization.live_tensors(original).items():
        assert torch.equal(saved.tensors[name], tensor.detach())
    assert saved.metadata == {"note": "test"}
    # loaded into a fresh model: same updates as the original rule
    reference = run_functional(original, make_model(), 5)
    fresh = make_model()
    opt = L.load(path, fresh.parameters())
    run_dropin(opt, fresh, 3)
    state = opt.state_dict()
    torch.save(state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    # resume in another optimizer and model: 3 + 2 steps equal 5 uninterrupted steps
    resumed_model = make_model()
    with torch.no_grad():
        for p, q in zip(resumed_model.parameters(), fresh.parameters()):
            p.copy_(q)
    resumed = L.load(path, resumed_model.parameters())
    resumed.load_state_dict(state)
    ours = run_dropin(resumed, resumed_model, 2)
    # Bit for bit against the saved rule run functionally (the file's rates are constants there too)
    # and against the original rule, whose rates are learnable tensors: a constant 0-dim rate takes
    # torch.optim's add(alpha=-lr), a learnable one torch.optim's addcmul, which round alike.
    constants = run_functional(L.load_differentiable(path, make_model().parameters()), make_model(), 5)
    for a, b, c in zip(ours, constants, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_load_into_float32_model_runs_a_float64_rule(tmp_path):
    path = tmp_path / "mlp.pt"
    L.save(rule("mlp", make_model().parameters()), path)
    model = make_model(dtype=torch.float32)
    opt = L.load(path, model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    run_dropin(opt, model, 2)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_dropin_closure_unused_parameters_and_fixed_groups():
    model = make_model()
    extra = nn.Parameter(torch.ones(3, dtype=F64))
    opt = L.DropInOptimizer(L.MLPOptimizer(list(model.parameters()) + [extra], lr=0.01))
    x, y = batch()

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, Tensor)
    assert torch.equal(extra.detach(), torch.ones(3, dtype=F64))  # no gradient: untouched, no state
    assert extra not in opt.state or not opt.state[extra]
    with pytest.raises(TypeError, match="fixed set of parameters"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


def test_dropin_of_a_plain_diffopt_optimizer_equals_torch_adam():
    model, twin = make_model(), make_model()
    ours = L.DropInOptimizer(Adam(model.parameters(), lr=0.01))
    reference = torch.optim.Adam(twin.parameters(), lr=0.01)
    a, b = run_dropin(ours, model, 4), run_dropin(reference, twin, 4)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert ours.state_dict()["learned"] is None


# -- refusals ----------------------------------------------------------------------------
def _saved(tmp_path, kind: str = "mlp") -> dict:
    path = tmp_path / "rule.pt"
    L.save(rule(kind, make_model().parameters()), path)
    return torch.load(path, weights_only=True)


def _write(tmp_path, payload: dict):
    path = tmp_path / "edited.pt"
    torch.save(payload, path)
    return path


def test_refuses_another_format_version(tmp_path):
    payload = _saved(tmp_path)
    payload["version"] = VERSION + 1
    with pytest.raises(L.LearnedRuleError, match=f"format version {VERSION + 1}.*reads version {VERSION}"):
        L.load(_write(tmp_path, payload), make_model().parameters())


def test_refuses_files_that_are_not_learned_rules(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(L.LearnedRuleError, match="not a diffopt learned-rule file"):
        L.read(path)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(L.LearnedRuleError, match="is not a diffopt learned-rule file \\(not a torch.save file\\)"):
        L.read(tmp_path / "junk.pt")
    payload = _saved(tmp_path)
    payload["kind"] = "transformer"
    with pytest.raises(L.LearnedRuleError, match="unknown kind 'transformer'"):
        L.read(_write(tmp_path, payload))


def test_refuses_a_different_feature_set(tmp_path):
    payload = _saved(tmp_path, "mlp")
    # a file from a diffopt whose MLP computes a feature this one does not
    edited = dict(payload, features=payload["features"] + ["rms"])
    config = json.loads(payload["config"])
    config["features"] = config["features"] + ["rms"]
    edited["config"] = json.dumps(config)
    with pytest.raises(L.LearnedRuleError, match="computes only"):
        L.read(_write(tmp_path, edited))
    # header and config disagree
    with pytest.raises(L.LearnedRuleError, match="trained on features"):
        L.read(_write(tmp_path, dict(payload, features=["grad"])))
    # the caller expects another feature set
    path = _write(tmp_path, payload)
    with pytest.raises(L.LearnedRuleError, match="not the expected \\['grad'\\]"):
        L.load(path, make_model().parameters(), features=["grad"])
    assert L.read(path, features=list(L.MLP_FEATURES)).kind == "mlp"
    # an LSTM file claiming other inputs than log-magnitude and sign
    lstm = _saved(tmp_path, "lstm")
    with pytest.raises(L.LearnedRuleError, match="trained on features \\['grad'\\]"):
        L.read(_write(tmp_path, dict(lstm, features=["grad"])))


def test_refuses_tensors_that_do_not_match_the_config(tmp_path):
    payload = _saved(tmp_path, "lstm")
    tensors = dict(payload["tensors"])
    tensors["out_weight"] = torch.zeros(1, 7)
    with pytest.raises(L.LearnedRuleError, match="out_weight.*shape \\(1, 7\\)"):
        L.load(_write(tmp_path, dict(payload, tensors=tensors)), make_model().parameters())


@pytest.mark.parametrize("kind", ["meta_sgd", "meta_curvature", "per_layer_per_step"])
def test_per_parameter_rules_refuse_other_shapes(kind, tmp_path):
    path = tmp_path / "rule.pt"
    L.save(rule(kind, make_model().parameters()), path)
    other = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    with pytest.raises(L.LearnedRuleError, match="only applies to the model it was trained for"):
        L.load(path, other.parameters())


def test_dropin_refuses_a_state_dict_of_another_rule(tmp_path):
    model = make_model()
    a = L.DropInOptimizer(rule("mlp", model.parameters()))
    b = L.DropInOptimizer(L.MLPOptimizer(model.parameters(), hidden=(3,)))
    with pytest.raises(L.LearnedRuleError, match="state dict is for a mlp rule"):
        b.load_state_dict(a.state_dict())


def test_save_refuses_an_optimizer_that_is_not_learned(tmp_path):
    with pytest.raises(TypeError, match="not a learned rule"):
        L.save(Adam(make_model().parameters()), tmp_path / "x.pt")


# -- meta-training -----------------------------------------------------------------------
def tiny(**overrides) -> L.TrainConfig:
    base = dict(rule="mlp", task="quadratic", unroll=6, truncation=3, iterations=4, meta_batch=3, meta_lr=1e-2,
                rule_options={"hidden": [4], "lr": 0.05}, task_options={"dim": 4, "rows": 6})
    base.update(overrides)
    return L.TrainConfig(**base)


def weights(trainer: L.OptimizerTrainer) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in L.serialization.live_tensors(trainer.optimizer).items()}


def test_truncations_carry_weights_and_rule_state():
    """Two truncations of 3 steps are one unroll of 6 steps (same rule, state carried)."""
    fam = L.QuadraticFamily(dim=4, rows=6)
    model = fam.model(F64)
    opt = rule("lstm", model.parameters())
    tasks = fam.sample(3, torch.Generator().manual_seed(0), dtype=F64)
    unroll = L.Unroll(model, opt, fam.loss_fn)
    carry = unroll.start(tasks)
    carry, _, _ = unroll.truncation(carry, tasks, 3, "full")
    carry, _, split = unroll.truncation(carry, tasks, 3, "first_order")
    _, _, whole = unroll.truncation(unroll.start(tasks), tasks, 6, "none")
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-14)
    assert carry.states[0]["step"] == 6


@pytest.mark.parametrize("mode", ["first_order", "second_order", "pes"])
def test_meta_training_updates_once_per_truncation(mode):
    config = tiny(mode=mode, iterations=2, unroll=7, pes_samples=2)
    trainer = L.OptimizerTrainer(config, progress=False)
    before = weights(trainer)
    trainer.fit()
    after = weights(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    state = trainer.meta_optimizer.state_dict()["state"]
    assert int(state[0]["step"]) == 2 * 3  # ceil(7 / 3) truncations per unroll
    assert len(trainer.history) == 2 and all(json.dumps(r) for r in trainer.history)


@pytest.mark.parametrize("kind", ["lstm", "meta_curvature", "hypergradient_adam"])
def test_other_rules_meta_train(kind):
    options = {"lstm": {"hidden_size": 3, "layers": 1}, "meta_curvature": {"lr": 0.05},
               "hypergradient_adam": {"lr": 0.05, "hyper_lr": 1e-4}}[kind]
    trainer = L.OptimizerTrainer(tiny(rule=kind, rule_options=options, iterations=1), progress=False)
    trainer.fit()
    assert len(trainer.history) == 1


def test_meta_training_reduces_the_objective_on_quadratics():
    config = tiny(iterations=12, unroll=8, truncation=4, meta_batch=8, meta_lr=5e-2,
                  rule_options={"hidden": [8], "lr": 0.01})
    trainer = L.OptimizerTrainer(config, progress=False)
    trainer.fit()
    first = sum(r["objective"] for r in trainer.history[:3]) / 3
    last = sum(r["objective"] for r in trainer.history[-3:]) / 3
    assert last < first - 0.3, (first, last)


def test_checkpoint_resume_is_exact(tmp_path):
    uninterrupted = L.OptimizerTrainer(tiny(iterations=4), progress=False)
    uninterrupted.fit()
    ckpt = tmp_path / "run.ckpt"
    L.OptimizerTrainer(tiny(iterations=2), checkpoint=ckpt, progress=False).fit()  # "crashes" after 2
    resumed = L.OptimizerTrainer(tiny(iterations=4), checkpoint=ckpt, resume=True, progress=False)
    resumed.fit()
    assert resumed.history == uninterrupted.history
    a, b = weights(resumed), weights(uninterrupted)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(CheckpointError, match="meta_lr differs"):
        L.OptimizerTrainer(tiny(meta_lr=0.5), checkpoint=ckpt, resume=True, progress=False).fit()


def test_train_config_validation():
    with pytest.raises(ValueError, match="truncation \\(5\\) must not exceed"):
        tiny(unroll=4, truncation=5).validate()
    with pytest.raises(ValueError, match="rule='adam'"):
        tiny(rule="adam").validate()
    with pytest.raises(ValueError, match="mode='implicit'"):
        tiny(mode="implicit").validate()


def test_loss_curves_and_transfer_to_another_family():
    fam = L.SinusoidFamily(hidden=(8,), points=6, eval_points=6)
    model = fam.model()
    trained = L.OptimizerTrainer(tiny(iterations=1), progress=False).fit()
    opt = L.transfer(trained, model.parameters())
    assert opt.net is trained.net  # the shared network, not a copy
    tasks = fam.sample(4, torch.Generator().manual_seed(0), "test")
    curves = L.loss_curves(opt, model, fam, tasks, 5)
    assert curves["train"].shape == (6, 4) and curves["eval"].shape == (6, 4)
    diverging = L.loss_curves(SGD(model.parameters(), lr=1e3), model, fam, tasks, 5)
    dead = torch.isinf(diverging["train"])
    assert dead[-1].any() and (dead[1:] >= dead[:-1]).all()  # once diverged, reported as inf from then on


def test_fewshot_family_tasks_are_class_disjoint_between_splits():
    fam = L.FewShotFamily(ways=3, shots=2, query=2, hidden=(4,), dim=8)
    train = fam.sample(2, torch.Generator().manual_seed(0), "train")
    test = fam.sample(2, torch.Generator().manual_seed(0), "test")
    assert train.x.shape == (2, 6, 8) and train.y.dtype == torch.int64
    assert not torch.equal(train.x, test.x)
    assert [tuple(t.shape) for t in train.init] == [(2,) + tuple(p.shape) for p in fam.model().parameters()]


# -- the command line --------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="diffopt")
    cli.add_parser(top.add_subparsers(dest="command"))
    return top


def test_cli_trains_saves_and_resumes(tmp_path, capsys):
    out, ckpt = tmp_path / "rule.pt", tmp_path / "run.ckpt"

    def argv(iterations: int) -> list[str]:
        return ["train-optimizer", "--rule", "mlp", "--task", "quadratic", "--unroll", "4", "--truncation", "2",
                "--meta-iterations", str(iterations), "--meta-batch", "2", "--output", str(out), "--checkpoint",
                str(ckpt), "--checkpoint-every", "1", "--rule-option", "hidden=[4]", "--task-option", "dim=3",
                "--no-progress"]

    assert cli.run(parser().parse_args(argv(2))) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["meta_iterations"] == 2 and out.exists()
    model = L.QuadraticFamily(dim=3).model()
    opt = L.load(out, model.parameters())
    assert opt.functional.net.hidden == (4,)
    assert cli.run(parser().parse_args(argv(3) + ["--resume"])) == 0
    assert json.loads(capsys.readouterr().out)["meta_iterations"] == 3
    assert L.read(out).metadata["iterations"] == 3


def test_cli_reports_bad_input(tmp_path, capsys):
    args = parser().parse_args(["train-optimizer", "--unroll", "3", "--truncation", "5", "-o", str(tmp_path / "x")])
    assert cli.run(args) == 2
    assert "truncation (5) must not exceed" in capsys.readouterr().err
    args = parser().parse_args(["train-optimizer", "--rule-option", "nonsense", "-o", str(tmp_path / "x")])
    assert cli.run(args) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
