"""The training loop (diffopt.training.Trainer), its checkpoints, evaluate(), and the recipes' task sources.

* resume: an interrupted run resumed from its checkpoint ends with the same
  weights (``torch.equal``) and the same metric lines as an uninterrupted one;
* checkpoints are written atomically (no temporary files; a failing save keeps
  the previous checkpoint), read with ``weights_only`` (pickled code is refused),
  and refused when written by another configuration (naming the field);
* ``evaluate`` reports the mean and 95% CI of ``diffopt.tasks.mean_ci95`` over
  per-task values computed by hand;
* ``SinusoidSource`` and ``EpisodeSource``: shapes, determinism, test sets.

Seeded runs that must learn are in ``test_algorithms_training.py``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffopt.algorithms import MAML, MetaSGD, PrototypicalNetwork, Reptile
from diffopt.recipes import EpisodeSource, SinusoidSource, sinusoid_mlp
from diffopt.tasks import FewShotDataset, mean_ci95, synthetic_vectors
from diffopt.training import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    Trainer,
    evaluate,
    iteration_generator,
    load_checkpoint,
    save_checkpoint,
    summary_text,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """The machine is shared: one thread is faster and deterministic timing is not the point here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# =============================================================================================
# Set-ups: each builds a fresh (learner, source, optimizer) from the same seed
# =============================================================================================

def sinusoid_source() -> SinusoidSource:
    return SinusoidSource(meta_batch=4, shots=5, query=5, test_tasks=6, test_shots=5, test_query=10)


def vectors_source(meta_batch: int = 3, test_tasks: int = 6) -> EpisodeSource:
    data = synthetic_vectors(num_classes=30, examples_per_class=8, dim=8, informative_dim=3, seed=0)
    train, test = data.split([0.6, 0.4], seed=0)
    return EpisodeSource(train, test, meta_batch=meta_batch, ways=3, shots=2, query=2, test_tasks=test_tasks)


def setup(name: str, **learner_options):
    torch.manual_seed(123)
    if name == "maml":
        learner = MAML(sinusoid_mlp(hidden=8), F.mse_loss, inner_lr=0.01, inner_steps=1, **learner_options)
        return learner, sinusoid_source(), torch.optim.Adam(learner.parameters(), lr=1e-2)
    if name == "metasgd":
        learner = MetaSGD(sinusoid_mlp(hidden=8), F.mse_loss, generator=torch.Generator().manual_seed(1))
        return learner, sinusoid_source(), torch.optim.Adam(learner.parameters(), lr=1e-2)
    if name == "reptile":
        learner = Reptile(sinusoid_mlp(hidden=8), inner_lr=0.02, inner_steps=2, outer_lr=0.5, outer_lr_final=0.0)
        return learner, sinusoid_source(), torch.optim.SGD(learner.parameters(), lr=0.5)
    if name == "protonet_dropout":  # dropout draws from the global RNG: the checkpoint must carry it
        encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 8))
        learner = PrototypicalNetwork(encoder)
        return learner, vectors_source(), torch.optim.Adam(learner.parameters(), lr=1e-2)
    raise KeyError(name)


class Crash(RuntimeError):
    pass


def crash_at(iteration: int):
    def callback(trainer: Trainer, i: int):
        if i == iteration:
            raise Crash(f"simulated crash at iteration {i}")
        return None
    return callback


def metric_lines(path: Path) -> list[dict]:
    """Metric records without their wall-clock field."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        line.pop("seconds", None)
    return lines


def weights(learner: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in learner.state_dict().values()]


# =============================================================================================
# Resume
# =============================================================================================

@pytest.mark.parametrize("name", ["maml", "metasgd", "reptile", "protonet_dropout"])
@pytest.mark.parametrize("crash", [5, 4])
def test_resume_reproduces_the_uninterrupted_run(name, crash, tmp_path):
    """checkpoint_every=2: a crash at 5 resumes from 4; a crash at 4 (before its save) resumes
    from 2 and drops the metric line of iteration 3 written after that checkpoint."""
    total = 7
    options = dict(iterations=total, seed=5, checkpoint_every=2, log_every=1, eval_every=3, eval_steps=(0, 1),
                   progress=False)
    learner, source, optimizer = setup(name)
    reference = Trainer(learner, source, optimizer, checkpoint=tmp_path / "a.pt", metrics=tmp_path / "a.jsonl",
                        **options)
    reference.fit()

    learner, source, optimizer = setup(name)
    interrupted = Trainer(learner, source, optimizer, checkpoint=tmp_path / "b.pt", metrics=tmp_path / "b.jsonl",
                          callbacks=[crash_at(crash)], **options)
    with pytest.raises(Crash):
        interrupted.fit()
    assert torch.load(tmp_path / "b.pt", weights_only=True)["iteration"] == ((crash - 1) // 2) * 2
    torch.manual_seed(999)  # whatever happened to the global RNG in between
    for _ in range(3):
        torch.rand(10)
    learner, source, optimizer = setup(name)
    resumed = Trainer(learner, source, optimizer, checkpoint=tmp_path / "b.pt", metrics=tmp_path / "b.jsonl",
                      resume=True, **options)
    resumed.fit()

    assert resumed.iteration == total
    assert all(torch.equal(a, b) for a, b in zip(weights(reference.learner), weights(resumed.learner)))
    assert metric_lines(tmp_path / "a.jsonl") == metric_lines(tmp_path / "b.jsonl")
    final_a = torch.load(tmp_path / "a.pt", weights_only=True)
    final_b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert final_a["iteration"] == final_b["iteration"] == total
    assert all(torch.equal(final_a["learner"][k], final_b["learner"][k]) for k in final_a["learner"])
    assert torch.equal(final_a["rng"], final_b["rng"])


def test_resume_in_a_new_trainer_without_a_crash_and_a_missing_checkpoint_starts_fresh(tmp_path):
    """Stop by building a new Trainer over the same checkpoint; resume=True with no checkpoint starts at 0."""
    options = dict(iterations=4, seed=1, checkpoint_every=1, log_every=1, eval_steps=(0,), progress=False)
    learner, source, optimizer = setup("maml")
    reference = Trainer(learner, source, optimizer, **options)
    reference.fit()

    learner, source, optimizer = setup("maml")
    fresh = Trainer(learner, source, optimizer, checkpoint=tmp_path / "c.pt", resume=True, **options)
    assert not (tmp_path / "c.pt").exists()
    fresh.fit()  # nothing to resume from: a fresh start, then a complete run
    assert all(torch.equal(a, b) for a, b in zip(weights(reference.learner), weights(fresh.learner)))
    # rewind the checkpoint to iteration 2 by hand, then resume in a new Trainer
    learner, source, optimizer = setup("maml")
    partial = Trainer(learner, source, optimizer, checkpoint=tmp_path / "d.pt", callbacks=[crash_at(3)], **options)
    with pytest.raises(Crash):
        partial.fit()
    learner, source, optimizer = setup("maml")
    again = Trainer(learner, source, optimizer, checkpoint=tmp_path / "d.pt", resume=True, **options)
    history = again.fit()
    assert again.iteration == 4 and [r["iteration"] for r in history] == [3, 4, 4]
    assert all(torch.equal(a, b) for a, b in zip(weights(reference.learner), weights(again.learner)))


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    options = dict(iterations=3, seed=2, log_every=1, eval_steps=(0,), progress=False, checkpoint=tmp_path / "f.pt",
                   metrics=tmp_path / "f.jsonl")
    learner, source, optimizer = setup("maml")
    Trainer(learner, source, optimizer, **options).fit()
    lines, finished = metric_lines(tmp_path / "f.jsonl"), weights(learner)
    learner, source, optimizer = setup("maml")
    again = Trainer(learner, source, optimizer, resume=True, **options)
    history = again.fit()
    assert again.iteration == 3 and [r.get("final") for r in history] == [True]
    assert all(torch.equal(a, b) for a, b in zip(finished, weights(learner)))
    assert metric_lines(tmp_path / "f.jsonl") == lines  # one final record, not two


def test_without_resume_an_existing_run_is_restarted(tmp_path):
    options = dict(iterations=3, seed=2, log_every=1, eval_steps=(0,), progress=False)
    learner, source, optimizer = setup("maml")
    Trainer(learner, source, optimizer, checkpoint=tmp_path / "e.pt", metrics=tmp_path / "e.jsonl", **options).fit()
    first = metric_lines(tmp_path / "e.jsonl")
    learner, source, optimizer = setup("maml")
    Trainer(learner, source, optimizer, checkpoint=tmp_path / "e.pt", metrics=tmp_path / "e.jsonl", **options).fit()
    assert metric_lines(tmp_path / "e.jsonl") == first  # the old lines were replaced, not appended to


# =============================================================================================
# Atomic, safe checkpoints
# =============================================================================================

def payload(iteration: int) -> dict:
    return {"format": CHECKPOINT_FORMAT, "version": 1, "config": {"a": 1}, "iteration": iteration,
            "weights": torch.arange(5.0) * iteration}


def test_checkpoint_is_written_atomically_and_a_failed_save_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "deep" / "run.pt"
    save_checkpoint(path, payload(1))
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.pt"]
    before = path.read_bytes()

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # half the work is done ...
        raise OSError("disk full")          # ... then the disk fills up

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, payload(2))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.pt"]  # no temporary file left
    assert load_checkpoint(path)["iteration"] == 1

    def interrupted(obj, f, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, payload(3))
    monkeypatch.undo()
    assert path.read_bytes() == before and len(list(path.parent.iterdir())) == 1


def test_a_failing_save_during_training_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    learner, source, optimizer = setup("maml")
    trainer = Trainer(learner, source, optimizer, iterations=5, checkpoint=tmp_path / "t.pt", checkpoint_every=1,
                      eval_steps=(0,), progress=False)
    calls = {"n": 0}
    real_save = torch.save

    def third_fails(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            f.write(b"garbage")
            raise OSError("no space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", third_fails)
    with pytest.raises(OSError, match="no space left"):
        trainer.fit()
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["t.pt"]
    assert load_checkpoint(tmp_path / "t.pt", trainer.config)["iteration"] == 2


class Exploit:
    """An object whose unpickling would run code."""

    ran: list[str] = []

    def __reduce__(self):
        return (Exploit.ran.append, ("code ran",))


def test_loading_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    evil = payload(1)
    evil["extra"] = Exploit()
    torch.save(evil, path)  # written with full pickle, as a hostile file would be
    with pytest.raises(CheckpointError, match="refused: it contains code") as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value)  # never torch's advice to load it unsafely
    assert Exploit.ran == []
    # and through the trainer's resume
    learner, source, optimizer = setup("maml")
    trainer = Trainer(learner, source, optimizer, iterations=2, checkpoint=path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="refused: it contains code"):
        trainer.fit()
    assert Exploit.ran == [] and trainer.iteration == 0


def test_foreign_and_wrong_version_checkpoints_are_refused(tmp_path):
    torch.save({"state": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt is not a diffopt checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="is not a diffopt checkpoint"):
        load_checkpoint(tmp_path / "tensor.pt")
    future = payload(1)
    future["version"] = 99
    save_checkpoint(tmp_path / "future.pt", future)
    with pytest.raises(CheckpointError, match="checkpoint version 99, this diffopt reads version 1"):
        load_checkpoint(tmp_path / "future.pt")


@pytest.mark.parametrize("change,field", [
    ({"inner_steps": 2}, r"learner\.inner_steps differs \(checkpoint 1, now 2\)"),
    ({"mode": "first_order"}, r"learner\.mode differs \(checkpoint 'second_order', now 'first_order'\)"),
    ({"seed": 4}, r"seed differs \(checkpoint 3, now 4\)"),
    ({"meta_batch": 5}, r"tasks\.meta_batch differs \(checkpoint 4, now 5\)"),
    ({"hidden": 9}, r"learner\.parameters differs"),
    ({"optimizer": "SGD"}, r"optimizer differs \(checkpoint 'Adam', now 'SGD'\)"),
    ({"algorithm": "MetaSGD"}, r"learner\.algorithm differs \(checkpoint 'MAML', now 'MetaSGD'\)"),
])
def test_checkpoint_from_another_configuration_names_the_field(change, field, tmp_path):
    def trainer(**c):
        torch.manual_seed(0)
        model = sinusoid_mlp(hidden=c.get("hidden", 8))
        if c.get("algorithm") == "MetaSGD":
            learner = MetaSGD(model)
        else:
            learner = MAML(model, inner_steps=c.get("inner_steps", 1), mode=c.get("mode", "second_order"))
        source = sinusoid_source()
        source.meta_batch = c.get("meta_batch", 4)
        opt = (torch.optim.SGD if c.get("optimizer") == "SGD" else torch.optim.Adam)(learner.parameters(), lr=1e-3)
        return Trainer(learner, source, opt, iterations=2, seed=c.get("seed", 3), checkpoint=tmp_path / "x.pt",
                       resume=True, eval_steps=(0,), progress=False)

    trainer().fit()
    other = trainer(**change)
    with pytest.raises(CheckpointError, match=field) as info:
        other.fit()
    assert "was written by another configuration" in str(info.value)
    assert "Resume with the same settings or start a new run" in str(info.value)
    assert other.iteration == 0


def test_resume_with_other_outer_optimizer_settings_is_refused_naming_the_setting(tmp_path):
    """Review bug: Trainer.config recorded only the optimizer's type and optimizer.load_state_dict brings back
    the checkpoint's param_groups, so resuming with a 10x smaller outer lr silently kept the old one. The
    hyperparameters as built now travel with the checkpoint and a difference is refused, naming the setting,
    both values and the fix, before anything is loaded."""
    def trainer(resume=True, **adam):
        torch.manual_seed(0)
        learner = MAML(sinusoid_mlp(hidden=8), F.mse_loss, inner_lr=0.01, inner_steps=1)
        opt = torch.optim.Adam(learner.parameters(), **{"lr": 1e-3, **adam})
        return Trainer(learner, sinusoid_source(), opt, iterations=2, seed=3, checkpoint=tmp_path / "x.pt",
                       resume=resume, eval_steps=(0,), progress=False, checkpoint_every=1)

    first = trainer()
    first.fit()
    saved = load_checkpoint(tmp_path / "x.pt")
    assert saved["optimizer_settings"][0]["lr"] == 1e-3 and saved["optimizer_settings"][0]["betas"] == [0.9, 0.999]
    for change, message in (({"lr": 1e-4}, "param_groups[0].lr: checkpoint 0.001, now 0.0001"),
                            ({"betas": (0.5, 0.999)}, "param_groups[0].betas: checkpoint [0.9, 0.999], now [0.5, 0.999]"),
                            ({"lr": torch.tensor(1e-3)}, "param_groups[0].lr: checkpoint 0.001, now [[], 0.001")):
        other = trainer(**change)
        before = weights(other.learner)
        with pytest.raises(CheckpointError) as info:
            other.fit()
        text = str(info.value)
        assert message in text and "build the optimizer with the checkpoint's settings" in text, text
        assert other.iteration == 0 and all(torch.equal(a, b) for a, b in zip(before, weights(other.learner)))
        assert other.optimizer.param_groups[0]["betas"] == change.get("betas", (0.9, 0.999))
    # the same settings resume (foreach, an implementation flag, may differ); a checkpoint written before the
    # settings were recorded resumes as before
    same = trainer(foreach=True)
    same.fit()
    assert same.iteration == 2
    del saved["optimizer_settings"]
    old = trainer(lr=1e-4)
    old.restore(saved)
    assert old.iteration == 2
    # a deliberate change mid-run: restore with the run's settings, then set the new value; it is saved, and a
    # later resume (with the settings the run was built with) continues with it
    again = trainer(resume=False)
    again.restore(load_checkpoint(tmp_path / "x.pt", again.config))
    again.optimizer.param_groups[0]["lr"] = 1e-4
    again.fit()
    later = trainer()
    later.restore(load_checkpoint(tmp_path / "x.pt", later.config))
    assert later.optimizer.param_groups[0]["lr"] == 1e-4


# =============================================================================================
# evaluate()
# =============================================================================================

def test_evaluate_matches_mean_ci95_of_hand_computed_per_task_losses():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).to(F64)
    learner = MAML(model, inner_lr=0.05, inner_steps=1)
    source = SinusoidSource(meta_batch=2, shots=4, test_tasks=7, test_shots=4, test_query=6, dtype=F64)
    batches = list(source.test_batches(chunk=3))
    assert [b[0].shape[0] for b in batches] == [3, 3, 1]
    summary = evaluate(learner, batches, steps=(0, 2))
    per_step = {0: [], 2: []}
    for sx, sy, qx, qy in batches:
        for t in range(sx.shape[0]):
            params = [p.detach().clone().requires_grad_() for p in model.parameters()]
            names = [n for n, _ in model.named_parameters()]
            for k in range(3):
                prediction = torch.func.functional_call(model, dict(zip(names, params)), (qx[t],))
                if k in per_step:
                    per_step[k].append(float(F.mse_loss(prediction, qy[t]).detach()))
                loss = F.mse_loss(torch.func.functional_call(model, dict(zip(names, params)), (sx[t],)), sy[t])
                grads = torch.autograd.grad(loss, params)
                params = [(p - 0.05 * g).detach().requires_grad_() for p, g in zip(params, grads)]
    for k, values in per_step.items():
        n = len(values)
        mean = sum(values) / n
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))  # the sample sd
        entry = summary["loss"][str(k)]
        assert entry["tasks"] == 7
        assert entry["mean"] == pytest.approx(mean, rel=1e-12)
        assert entry["ci95"] == pytest.approx(2.4469118511449692 * sd / math.sqrt(n), rel=1e-10)  # t(0.975, 6)
        assert (entry["mean"], entry["ci95"]) == pytest.approx(mean_ci95(values), rel=1e-12)


def test_a_test_task_whose_fine_tuning_diverges_counts_as_inf_and_is_reported():
    # Divergence at test time is a result (MAML's 10-step sinusoid evaluation meets it), not a crash
    # that loses the run: the task's loss is inf from that step on, the summary counts it, a warning names it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).to(F64)
    learner = MAML(model, inner_lr=0.05, inner_steps=1)
    g = torch.Generator().manual_seed(0)
    sx, qx = (torch.randn(3, 4, 1, generator=g, dtype=F64) for _ in range(2))
    sy, qy = (torch.randn(3, 4, 1, generator=g, dtype=F64) for _ in range(2))
    sy[1] *= 1e200  # task 1's squared support error overflows float64
    with pytest.warns(RuntimeWarning, match=r"fine-tuning diverged.*task\(s\) \[1\] at inner step 0"):
        summary = evaluate(learner, [(sx, sy, qx, qy)], steps=(0, 1, 3))
    before = summary["loss"]["0"]  # before any step the support data play no part
    assert "diverged" not in before and math.isfinite(before["mean"]) and before["tasks"] == 3
    for k in ("1", "3"):
        assert summary["loss"][k]["mean"] == math.inf and summary["loss"][k]["diverged"] == 1
        assert summary["loss"][k]["tasks"] == 3
    assert learner.loop.check_finite  # the checks are back on for training


def test_a_diverged_test_tasks_accuracy_is_nan_and_counted_not_read_from_nan_logits():
    # Its accuracy had been the argmax of NaN logits (class 0), reported as an ordinary 0.333 ± 0.0.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(F64)
    learner = MAML(model, F.cross_entropy, inner_lr=0.5, inner_steps=1)
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.randn(3, 6, 4, generator=g, dtype=F64), torch.randn(3, 9, 4, generator=g, dtype=F64)
    sy, qy = torch.arange(3).repeat(2).expand(3, -1).clone(), torch.arange(3).repeat(3).expand(3, -1).clone()
    sx[1] *= 1e200  # task 1's weights reach ~1e200 at the first inner step, its logits overflow at the next
    with pytest.warns(RuntimeWarning, match="fine-tuning diverged"):
        summary = evaluate(learner, [(sx, sy, qx, qy)], steps=(0, 2))
    assert "diverged" not in summary["accuracy"]["0"] and math.isfinite(summary["accuracy"]["0"]["mean"])
    entry = summary["accuracy"]["2"]
    assert entry["diverged"] == 1 and entry["tasks"] == 3 and math.isnan(entry["mean"]) and math.isnan(entry["ci95"])
    assert summary["loss"]["2"]["mean"] == math.inf and summary["loss"]["2"]["diverged"] == 1
    assert summary_text(entry) == "nan (1 of 3 tasks diverged)"
    # the finite tasks' accuracies are the hand-computed ones (plain SGD steps on the support loss)
    names = [n for n, _ in model.named_parameters()]
    for t in (0, 2):
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for _ in range(2):
            loss = F.cross_entropy(torch.func.functional_call(model, dict(zip(names, params)), (sx[t],)), sy[t])
            params = [(p - 0.5 * g_).detach().requires_grad_()
                      for p, g_ in zip(params, torch.autograd.grad(loss, params))]
        logits = torch.func.functional_call(model, dict(zip(names, params)), (qx[t],))
        alone = evaluate(learner, [(sx[t:t + 1], sy[t:t + 1], qx[t:t + 1], qy[t:t + 1])], steps=(2,))
        assert alone["accuracy"]["2"]["mean"] == pytest.approx(float((logits.argmax(-1) == qy[t]).double().mean()),
                                                               rel=1e-12)


def test_evaluate_metric_learner_reports_loss_and_accuracy():
    torch.manual_seed(0)
    learner = PrototypicalNetwork(nn.Linear(8, 4).to(F64))
    source = vectors_source(test_tasks=5)
    batches = [tuple(t.to(F64) if t.is_floating_point() else t for t in b) for b in source.test_batches(chunk=2)]
    summary = evaluate(learner, batches)
    losses, accuracies = [], []
    for sx, sy, qx, qy in batches:
        logits = learner.predict(sx, sy, qx).detach()
        for t in range(sx.shape[0]):
            losses.append(float(F.cross_entropy(logits[t], qy[t])))
            accuracies.append(float((logits[t].argmax(-1) == qy[t]).double().mean()))
    assert set(summary) == {"loss", "accuracy"}
    for name, values in (("loss", losses), ("accuracy", accuracies)):
        mean, half = mean_ci95(values)
        assert summary[name]["tasks"] == 5
        assert summary[name]["mean"] == pytest.approx(mean, rel=1e-12)
        assert summary[name]["ci95"] == pytest.approx(half, rel=1e-10, abs=1e-15)


# =============================================================================================
# The loop's other duties
# =============================================================================================

def test_logging_evaluation_callbacks_and_before_step(tmp_path):
    learner, source, optimizer = setup("maml")
    seen = []
    trainer = Trainer(learner, source, optimizer, iterations=6, log_every=4, eval_every=3, eval_steps=(0, 1),
                      metrics=tmp_path / "m.jsonl", progress=False,
                      callbacks=[lambda tr, i: {"custom": i} if i == 5 else None],
                      before_step=lambda lr, i: seen.append((lr, i)))
    history = trainer.fit()
    assert [i for _, i in seen] == list(range(6)) and all(lr is learner for lr, _ in seen)
    kinds = [(r["iteration"], sorted(k for k in r if k != "seconds")) for r in history]
    assert kinds == [
        (3, ["eval", "iteration"]),
        (4, ["iteration", "meta_loss"]),
        (5, ["custom", "iteration", "meta_loss"]),
        (6, ["eval", "final", "iteration"]),
    ]
    assert [json.loads(line)["iteration"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [3, 4, 5, 6]
    assert set(history[-1]["eval"]["loss"]) == {"0", "1"} and history[-1]["eval"]["loss"]["0"]["tasks"] == 6


def test_trainer_argument_checks_and_non_finite_loss():
    learner, source, optimizer = setup("maml")
    with pytest.raises(ValueError, match="iterations must be >= 0"):
        Trainer(learner, source, optimizer, iterations=-1)
    with pytest.raises(ValueError, match="log_every and checkpoint_every must be >= 1"):
        Trainer(learner, source, optimizer, iterations=1, log_every=0)
    with pytest.raises(FloatingPointError, match="meta-loss is nan at iteration 0"):
        nan_learner = MAML(sinusoid_mlp(hidden=4), inner_lr=0.01)
        with torch.no_grad():
            nan_learner.model[0].weight.fill_(float("nan"))
        nan_learner.loop.check_finite = False
        Trainer(nan_learner, source, torch.optim.Adam(nan_learner.parameters()), iterations=1, progress=False).fit()


def test_iteration_generators_are_independent_and_reproducible():
    a = torch.rand(5, generator=iteration_generator(3, 10))
    assert torch.equal(a, torch.rand(5, generator=iteration_generator(3, 10)))
    assert not torch.equal(a, torch.rand(5, generator=iteration_generator(3, 11)))
    assert not torch.equal(a, torch.rand(5, generator=iteration_generator(4, 10)))


def test_iteration_generators_do_not_collide_over_a_grid_of_seeds_and_iterations():
    """Every (seed, iteration) with seed < 32 and iteration < 2000 draws its own stream: a seed
    formula such as seed + iteration (seed 3 at iteration 11 = seed 4 at iteration 10) or
    1000·seed + iteration would repeat batches across runs of neighbouring seeds."""
    seen: dict[tuple[int, ...], tuple[int, int]] = {}
    for seed in range(32):
        for iteration in range(2000):
            first = tuple(torch.randint(0, 2**62, (2,), generator=iteration_generator(seed, iteration)).tolist())
            assert first not in seen, f"(seed, iteration) {(seed, iteration)} draws the stream of {seen[first]}"
            seen[first] = (seed, iteration)


class RecordingSource:
    """A task source that records the first input of every training batch it hands out."""

    def __init__(self, source) -> None:
        self.source, self.drawn = source, []

    def train_batch(self, generator: torch.Generator):
        batch = self.source.train_batch(generator)
        self.drawn.append(batch[0].detach().clone())
        return batch

    def test_batches(self):
        return self.source.test_batches()

    def config(self):
        return self.source.config()


def test_trainers_with_neighbouring_seeds_never_share_a_batch():
    """The batches a Trainer actually draws: seeds 3 and 4 over 12 iterations, 24 distinct batches."""
    batches, drawn_by = [], []
    for seed in (3, 4):
        learner, source, optimizer = setup("maml")
        recording = RecordingSource(source)
        Trainer(learner, recording, optimizer, iterations=12, seed=seed, log_every=12, eval_steps=(0,),
                progress=False).fit()
        assert len(recording.drawn) == 12
        batches += recording.drawn
        drawn_by += [(seed, iteration) for iteration in range(12)]
    for i in range(len(batches)):
        for j in range(i):
            assert not torch.equal(batches[i], batches[j]), f"(seed, iteration) {drawn_by[i]} repeats {drawn_by[j]}"


def test_fresh_fits_with_the_same_seed_match_whatever_the_global_rng_did_before():
    """A learner with Dropout (which draws from the global RNG): two fresh fits with seed 7, after
    different global RNG histories, end with identical weights and losses — the fit seeds the
    global RNG itself. Nothing here reseeds the global RNG between building the learner and fit."""
    results = []
    for history in (lambda: torch.manual_seed(1), lambda: (torch.manual_seed(2), torch.rand(7))):
        learner, source, optimizer = setup("protonet_dropout")
        history()
        trainer = Trainer(learner, source, optimizer, iterations=4, seed=7, log_every=1, eval_steps=(0,),
                          progress=False)
        trainer.fit()
        results.append((weights(learner), [r.get("meta_loss") for r in trainer.history]))
    (weights_a, losses_a), (weights_b, losses_b) = results
    assert losses_a == losses_b
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))
    # and the dropout masks matter: the same run without dropout ends elsewhere
    learner, source, optimizer = setup("protonet_dropout")
    for module in learner.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    Trainer(learner, source, optimizer, iterations=4, seed=7, log_every=1, eval_steps=(0,), progress=False).fit()
    assert not any(torch.equal(a, b) for a, b in zip(weights_a, weights(learner)))


# =============================================================================================
# The recipes' task sources
# =============================================================================================

def test_sinusoid_source_shapes_and_determinism():
    source = SinusoidSource(meta_batch=7, shots=3, query=4, test_tasks=450, test_shots=5, test_query=9, dtype=F64)
    sx, sy, qx, qy = source.train_batch(iteration_generator(0, 1))
    assert (sx.shape, sy.shape, qx.shape, qy.shape) == ((7, 3, 1), (7, 3, 1), (7, 4, 1), (7, 4, 1))
    assert sx.dtype == F64
    again = source.train_batch(iteration_generator(0, 1))
    assert all(torch.equal(a, b) for a, b in zip((sx, sy, qx, qy), again))
    other = source.train_batch(iteration_generator(0, 2))
    assert not torch.equal(sx, other[0])
    state = torch.get_rng_state()
    chunks = list(source.test_batches())
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not used
    assert [c[0].shape for c in chunks] == [(200, 5, 1), (200, 5, 1), (50, 5, 1)]
    assert [c[2].shape[1] for c in chunks] == [9, 9, 9]
    fresh = list(SinusoidSource(test_tasks=450, test_shots=5, test_query=9, dtype=F64).test_batches())
    assert all(torch.equal(a, b) for c, d in zip(chunks, fresh) for a, b in zip(c, d))  # a fixed test set
    assert source.config() == {"task": "sinusoid", "meta_batch": 7, "shots": 3, "query": 4, "test_tasks": 450,
                               "test_shots": 5}
    assert SinusoidSource(shots=6).query == 6


def test_episode_source_shapes_determinism_and_test_set():
    source = vectors_source(meta_batch=4, test_tasks=7)
    sx, sy, qx, qy = source.train_batch(iteration_generator(0, 0))
    assert (sx.shape, sy.shape, qx.shape, qy.shape) == ((4, 6, 8), (4, 6), (4, 6, 8), (4, 6))
    assert sy.dtype == torch.int64 and sorted(sy[0].tolist()) == [0, 0, 1, 1, 2, 2]
    again = source.train_batch(iteration_generator(0, 0))
    assert all(torch.equal(a, b) for a, b in zip((sx, sy, qx, qy), again))
    assert not torch.equal(sx, source.train_batch(iteration_generator(0, 1))[0])
    first = list(source.test_batches(chunk=3))
    assert [b[0].shape[0] for b in first] == [3, 3, 1]
    second = list(source.test_batches(chunk=3))
    assert all(torch.equal(a, b) for c, d in zip(first, second) for a, b in zip(c, d))
    # training and test classes are disjoint: no test example appears in the training split
    train_examples = {tuple(x.tolist()) for c in range(source.train.num_classes) for x in source.train[c]}
    assert not any(tuple(x.tolist()) in train_examples for b in first for x in b[0].reshape(-1, 8))
    assert source.config() == {"task": "episodes", "meta_batch": 4, "ways": 3, "shots": 2, "query": 2, "test_tasks": 7}


def test_episode_source_refuses_shots_and_ways_the_data_cannot_supply():
    data = FewShotDataset([torch.randn(n, 3) for n in (4, 4, 4, 3, 5)])
    train, test = data.subset([0, 1, 2, 3]), data.subset([4])
    with pytest.raises(ValueError, match=r"ways=3 but this split has only 1 classes"):
        EpisodeSource(train, test, meta_batch=2, ways=3, shots=1, query=1)
    with pytest.raises(ValueError, match=r"ways=5 but this split has only 4 classes"):
        EpisodeSource(train, data, meta_batch=2, ways=5, shots=1, query=1)
    with pytest.raises(ValueError, match=r"shots \+ query = 2 \+ 2 = 4 examples per class are needed, but 1 of 4 "
                                         r"classes have fewer \(class '3' has 3\)"):
        EpisodeSource(train, data, meta_batch=2, ways=2, shots=2, query=2)
    with pytest.raises(ValueError, match="shots=-1 must be at least 0"):
        EpisodeSource(train, data, meta_batch=2, ways=2, shots=-1, query=2)
    EpisodeSource(train, data, meta_batch=2, ways=4, shots=2, query=1)  # what it can supply is accepted
