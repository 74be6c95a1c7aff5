"""diffopt.hyper.OnlineTuner: hypergradients of the window (reverse vs central finite differences and vs
forward mode), the exact training trajectory (replayed in torch.optim), PES unbiasedness, resume, bad input.
All in float64 on a tiny MLP regression."""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from diffopt.hyper import LinearWarmup, OnlineTuner, Tuned, hypergradient, window_loss
from diffopt.optim import SGD, Adam, AdamW, RMSprop
from diffopt.optim.lr_scheduler import CosineAnnealingLR, ExponentialLR, LambdaLR, OneCycleLR
from strategies import examples, record
from test_unroll import QUICK, directional_error, finite_difference, single_threaded  # noqa: F401 (the fixture)

F64 = torch.float64
Params = list[Tensor]


def problem(seed: int = 0, n_batches: int = 12) -> tuple[Params, list[tuple[Tensor, Tensor]], Callable, Callable]:
    """Weights of a 3-4-1 tanh MLP, training batches, and the training and validation losses."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(4, 3, generator=g, dtype=F64) * 0.5, torch.randn(4, generator=g, dtype=F64) * 0.1,
               torch.randn(1, 4, generator=g, dtype=F64) * 0.5]

    def sample(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, 3, generator=g, dtype=F64)
        return x, torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g, dtype=F64)

    batches = [sample(8) for _ in range(n_batches)]
    vx, vy = sample(32)

    def net(p: Params, x: Tensor) -> Tensor:
        return torch.tanh(x @ p[0].T + p[1]) @ p[2].T

    def train_loss(p: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        return ((net(p, batch[0]) - batch[1]) ** 2).mean()

    def validation_loss(p: Params) -> Tensor:
        return ((net(p, vx) - vy) ** 2).mean()

    return weights, batches, train_loss, validation_loss


def two_groups(weights: Params, lrs: tuple[float, float] = (0.05, 0.02)) -> list[dict[str, Any]]:
    return [{"params": [w.clone() for w in weights[:2]], "lr": lrs[0]}, {"params": [weights[2].clone()], "lr": lrs[1]}]


def warmup(steps: int, start: float = 0.2) -> Callable[[int], float]:
    """A linear warm-up factor from ``start`` to 1 over ``steps`` steps (LambdaLR's lr_lambda)."""
    return lambda t: min(1.0, start + (1 - start) * t / steps)


# (name, optimizer factory over weights, scheduler factory or None, what to tune)
CASES: list[tuple[str, Callable, Callable | None, Any]] = [
    ("lr, weight_decay, momentum (SGD)", lambda w: SGD([x.clone() for x in w], lr=0.1, momentum=0.6, weight_decay=0.01),
     None, ["lr", "weight_decay", "momentum"]),
    ("lr, betas (Adam)", lambda w: Adam([x.clone() for x in w], lr=0.03, betas=(0.8, 0.9)), None, ["lr", "betas"]),
    ("alpha, weight_decay (RMSprop)", lambda w: RMSprop([x.clone() for x in w], lr=0.01, alpha=0.9, weight_decay=0.01),
     None, ["alpha", "weight_decay"]),
    ("per-group lr (AdamW)", lambda w: AdamW(two_groups(w), weight_decay=0.05), None, {"lr": "group"}),
    ("per-element lr (SGD)", lambda w: SGD([x.clone() for x in w], lr=0.1, momentum=0.5), None,
     [Tuned("lr", "element")]),
    ("scheduler gamma (ExponentialLR)", lambda w: SGD([x.clone() for x in w], lr=0.2, momentum=0.5),
     lambda opt: ExponentialLR(opt, gamma=0.9), ["scheduler.gamma", "momentum"]),
    ("scheduler eta_min (CosineAnnealingLR), softplus weight_decay",
     lambda w: SGD([x.clone() for x in w], lr=0.2, weight_decay=0.01),
     lambda opt: CosineAnnealingLR(opt, T_max=4, eta_min=0.02),
     ["scheduler.eta_min", Tuned("weight_decay", transform="softplus")]),
    ("OneCycleLR's max_lr (a group key the scheduler reads), momentum",
     lambda w: SGD([x.clone() for x in w], lr=0.1, momentum=0.5),
     lambda opt: OneCycleLR(opt, max_lr=0.4, total_steps=12, pct_start=0.5, cycle_momentum=False),
     ["max_lr", "momentum"]),
    ("lr under a LambdaLR warm-up (its base rate), beta1 (Adam)", lambda w: Adam([x.clone() for x in w], lr=0.03),
     lambda opt: LambdaLR(opt, warmup(4)), ["lr", "beta1"]),
]
CASE_IDS = [c[0] for c in CASES]


def first_hypergradient(case: tuple, mode: str, window: int = 3, seed: int = 0) -> tuple[OnlineTuner, list[Tensor]]:
    """The tuner's hypergradient of its first window (the first ``window`` steps from the initial weights);
    the meta-optimizer has lr 0, so the values do not move."""
    _, make, make_scheduler, spec = case
    weights, batches, train_loss, validation_loss = problem(seed)
    opt = make(weights)
    scheduler = make_scheduler(opt) if make_scheduler else None
    tuner = OnlineTuner(opt, train_loss, validation_loss, spec, every=window, mode=mode, scheduler=scheduler,
                        meta_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0))
    for batch in batches[:window]:
        tuner.step(batch)
    return tuner, list(tuner.last_hypergradient.values())


def window_loss_of_raw(case: tuple, raw: list[Tensor], tuner: OnlineTuner, window: int, seed: int = 0) -> float:
    """The validation loss after the first window with the reparameterised values ``raw``, from a fresh
    optimizer (and scheduler) by the functional :func:`diffopt.hyper.window_loss`."""
    _, make, make_scheduler, _ = case
    weights, batches, train_loss, validation_loss = problem(seed)
    opt = make(weights)
    scheduler = make_scheduler(opt) if make_scheduler else None
    values = tuner._natural(raw)
    with torch.no_grad():
        return float(window_loss(opt, batches[:window], train_loss, validation_loss, values, scheduler=scheduler))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reverse_window_matches_finite_differences_and_forward_mode(case: tuple) -> None:
    window = 3
    tuner, reverse = first_hypergradient(case, "reverse", window)
    _, forward = first_hypergradient(case, "forward", window)
    for label, r, f in zip(tuner.labels(), reverse, forward):
        error = float((r - f).abs().max() / r.abs().max().clamp_min(1e-300))
        record("tuner reverse vs forward (relative)", case[0], error)
        assert error <= 1e-10, f"{case[0]} {label}: reverse {r} vs forward {f}"
    # central differences along a random direction in the reparameterised values
    raw = [u.detach() for u in tuner.raw_tensors()]
    g = torch.Generator().manual_seed(1)
    direction = [torch.randn(u.shape, generator=g, dtype=F64) for u in raw]
    fd = finite_difference(lambda h: window_loss_of_raw(case, [u + h * d for u, d in zip(raw, direction)], tuner,
                                                        window))
    analytic = float(sum((r * d).sum() for r, d in zip(reverse, direction)))
    scale = math.sqrt(sum(float((r * r).sum()) for r in reverse) * sum(float((d * d).sum()) for d in direction))
    error = directional_error(fd, analytic, scale)
    record("tuner reverse vs central differences (relative)", case[0], error)
    assert error <= 1e-6, f"{case[0]}: finite difference {fd} vs reverse {analytic}"


def test_first_order_forward_mode_equals_reverse_and_the_window_by_hand() -> None:
    """first_order=True treats the training gradients as constants in forward mode too (their forward-mode
    tangents, which create_graph=False does not drop, had made it second order): hypergradient and the
    tuner agree with reverse mode and with the window written out by hand with detached gradients."""
    weights, batches, train_loss, validation_loss = problem(0, n_batches=3)
    lr, mu = (torch.tensor(v, dtype=F64, requires_grad=True) for v in (0.1, 0.5))
    w, buf = [x.clone() for x in weights], None
    for batch in batches:
        current = [x.detach().requires_grad_() for x in w]
        g = torch.autograd.grad(train_loss(current, batch), current)
        buf = list(g) if buf is None else [mu * m + gi for m, gi in zip(buf, g)]
        w = [x - lr * m for x, m in zip(w, buf)]
    by_hand = torch.autograd.grad(validation_loss(w), (lr, mu))
    second_order = hypergradient(SGD([x.clone() for x in weights], lr=0.1, momentum=0.5), batches, train_loss,
                                 validation_loss, {"lr": torch.tensor(0.1, dtype=F64, requires_grad=True)},
                                 mode="forward")["lr"][0]
    assert abs(float(second_order) - float(by_hand[0])) > 1e-2  # the two orders differ here
    last = {}
    for mode in ("reverse", "forward"):
        values = {"lr": torch.tensor(0.1, dtype=F64, requires_grad=True),
                  "momentum": torch.tensor(0.5, dtype=F64, requires_grad=True)}
        got = hypergradient(SGD([x.clone() for x in weights], lr=0.1, momentum=0.5), batches, train_loss,
                            validation_loss, values, mode=mode, first_order=True)
        for name, ref in zip(("lr", "momentum"), by_hand):
            assert abs(float(got[name][0]) - float(ref)) <= 1e-10 * abs(float(ref)), (mode, name)
        tuner = OnlineTuner(SGD([x.clone() for x in weights], lr=0.1, momentum=0.5), train_loss, validation_loss,
                            ["lr", "momentum"], every=3, mode=mode, first_order=True, backtrack=0,
                            meta_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0))
        for batch in batches:
            tuner.step(batch)
        last[mode] = float(tuner.last_hypergradient["lr"])
    assert abs(last["forward"] - 0.1 * float(by_hand[0])) <= 1e-10 * abs(last["forward"])  # d/d log lr
    assert abs(last["forward"] - last["reverse"]) <= 1e-10 * abs(last["reverse"])


OPTIMIZER_CHOICES = {
    "SGD": (lambda ws, **hp: SGD(ws, **{"lr": 0.1, **hp}), ["lr", "momentum", "weight_decay"],
            {"momentum": 0.5, "weight_decay": 0.01}),
    "Adam": (lambda ws, **hp: Adam(ws, **{"lr": 0.02, **hp}), ["lr", "beta1", "beta2", "weight_decay", "eps"],
             {"weight_decay": 0.01, "eps": 1e-3}),
    "AdamW": (lambda ws, **hp: AdamW(ws, **{"lr": 0.02, **hp}), ["lr", "beta1", "weight_decay"], {}),
    "RMSprop": (lambda ws, **hp: RMSprop(ws, **{"lr": 0.01, **hp}), ["lr", "alpha", "momentum"], {"momentum": 0.3}),
}


@settings(QUICK, max_examples=examples(12))
@given(name=st.sampled_from(sorted(OPTIMIZER_CHOICES)), window=st.integers(2, 4), extra=st.integers(0, 2),
       data=st.data(), seed=st.integers(0, 2**16))
def test_hypothesis_reverse_equals_forward(name: str, window: int, extra: int, data: Any, seed: int) -> None:
    """Over optimizers, windows, periods and hyperparameter subsets and scopes: the tuner's reverse and
    forward hypergradients agree to 1e-10 at every tuning step (the values move between them)."""
    make, names, hp = OPTIMIZER_CHOICES[name]
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True))
    scope = data.draw(st.sampled_from(["global", "group"]))
    weights, batches, train_loss, validation_loss = problem(seed, n_batches=2 * (window + extra))
    results = []
    for mode in ("reverse", "forward"):
        opt = make([{"params": [w.clone() for w in weights[:2]]}, {"params": [weights[2].clone()]}], **hp)
        tuner = OnlineTuner(opt, train_loss, validation_loss, [Tuned(n, scope) for n in chosen], every=window + extra,
                            window=window, mode=mode, meta_lr=0.05)
        for batch in batches:
            tuner.step(batch)
        results.append(tuner.history)
    for reverse, forward in zip(*results):
        for label, r in reverse["hypergradient"].items():
            f = forward["hypergradient"][label]
            error = abs(r - f) / max(abs(r), 1e-300)
            assert error <= 1e-10, f"{name} {label} window {window}: reverse {r} vs forward {f}"


def interrupted_run(build: Callable[[], OnlineTuner], batches: list, stop: int, path: Any) -> OnlineTuner:
    """A tuner run through ``batches[:stop]``, saved to ``path``, loaded into a fresh ``build()`` and run
    through the rest: what an interrupted and resumed run ends with."""
    first = build()
    for batch in batches[:stop]:
        first.step(batch)
    first.save(path)
    resumed = build()
    resumed.load(path)
    for batch in batches[stop:]:
        resumed.step(batch)
    return resumed


def run_and_record(opt: Any, tuner: OnlineTuner, batches: list) -> list[list[dict[str, Any]]]:
    """Train through the tuner, recording every group's hyperparameters at every step."""
    used = []
    for batch in batches:
        used.append([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
        tuner.step(batch)
    return used


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_training_follows_the_optimizer_with_the_tuned_values(optimizer: str) -> None:
    """The exact-trajectory property: the recorded per-step hyperparameters, set into torch.optim's
    param_groups step by step, give the same weights (1e-10; the values change between windows)."""
    weights, batches, train_loss, validation_loss = problem(3, n_batches=30)
    if optimizer == "SGD":
        opt = SGD(two_groups(weights, (0.1, 0.05)), momentum=0.6, weight_decay=0.01)
        spec: Any = [Tuned("lr", "group"), "momentum", "weight_decay"]
        reference = torch.optim.SGD(two_groups(weights, (0.1, 0.05)), momentum=0.6, weight_decay=0.01)
    else:
        opt = Adam(two_groups(weights, (0.03, 0.01)), betas=(0.8, 0.9), weight_decay=0.01)
        spec = [Tuned("lr", "group"), "betas", "weight_decay"]
        reference = torch.optim.Adam(two_groups(weights, (0.03, 0.01)), betas=(0.8, 0.9), weight_decay=0.01)
    tuner = OnlineTuner(opt, train_loss, validation_loss, spec, every=5, window=3, meta_lr=0.2)
    used = run_and_record(opt, tuner, batches)
    changes = {str(u) for u in used}
    assert len(changes) >= 6, "the tuner should have changed the hyperparameters between windows"
    ref_params = [p for g in reference.param_groups for p in g["params"]]
    for p in ref_params:
        p.requires_grad_()
    for values, batch in zip(used, batches):
        for group, chosen in zip(reference.param_groups, values):
            group.update({k: chosen[k] for k in ("lr", "momentum", "weight_decay", "betas") if k in chosen})
        reference.zero_grad()
        train_loss(ref_params, batch).backward()
        reference.step()
    error = max(float((a - b.detach()).abs().max()) for a, b in zip(tuner.params, ref_params))
    record("tuner trajectory vs torch.optim replay (max abs)", optimizer, error)
    assert error <= 1e-10


def test_backtracking_restarts_training_from_its_first_step() -> None:
    """SGD at lr 2 is too fast for the first period: the tuner restarts from the initial weights three
    times, halving the lr each time (no meta-step), then tunes as usual. The final weights are
    torch.optim's from the initial weights through the batches after the last restart, with the
    recorded per-step values (1e-10); with backtrack=0 the same run never restarts."""
    weights, batches, train_loss, validation_loss = problem(3, n_batches=30)
    opt = SGD([w.clone() for w in weights], lr=2.0, momentum=0.6)
    tuner = OnlineTuner(opt, train_loss, validation_loss, ["lr", "momentum"], every=3, window=2, meta_lr=0.2)
    used = run_and_record(opt, tuner, batches)
    restarted = [h["step"] for h in tuner.history if h["restarted"]]
    assert restarted == [3, 6, 9] and tuner.restarts == 3
    assert [h["values"]["lr"] for h in tuner.history[:3]] == [1.0, 0.5, 0.25]
    assert [h["values"]["momentum"] for h in tuner.history[:3]] == [0.6, 0.6, 0.6]  # no meta-step
    assert tuner.history[3]["values"]["lr"] != 0.25 and not any(h["restarted"] for h in tuner.history[3:])
    ref_params = [w.clone().requires_grad_() for w in weights]
    reference = torch.optim.SGD(ref_params, lr=2.0, momentum=0.6)
    for values, batch in list(zip(used, batches))[restarted[-1]:]:
        reference.param_groups[0].update({k: values[0][k] for k in ("lr", "momentum")})
        reference.zero_grad()
        train_loss(ref_params, batch).backward()
        reference.step()
    error = max(float((a - b.detach()).abs().max()) for a, b in zip(tuner.params, ref_params))
    record("tuner trajectory after backtracking vs torch.optim replay (max abs)", "SGD", error)
    assert error <= 1e-10
    # delay=2: each run (the first and every restart) trains 2 steps before its first period, so the
    # restarts come at steps 5 and 10 (backtrack=2), and tuning goes on at 15, 18, ...
    delayed = OnlineTuner(SGD([w.clone() for w in weights], lr=2.0, momentum=0.6), train_loss, validation_loss,
                          ["lr", "momentum"], every=3, window=2, meta_lr=0.2, backtrack=2, delay=2)
    used = run_and_record(delayed.optimizer, delayed, batches)
    assert [(h["step"], h["restarted"]) for h in delayed.history] == [(5, True), (10, True)] + [
        (step, False) for step in range(15, 31, 3)]
    assert [h["values"]["lr"] for h in delayed.history[:2]] == [1.0, 0.5]
    delayed_params = [w.clone().requires_grad_() for w in weights]
    delayed_reference = torch.optim.SGD(delayed_params, lr=0.5, momentum=0.6)
    for values, batch in list(zip(used, batches))[10:]:
        delayed_reference.param_groups[0].update({k: values[0][k] for k in ("lr", "momentum")})
        delayed_reference.zero_grad()
        train_loss(delayed_params, batch).backward()
        delayed_reference.step()
    assert max(float((a - b.detach()).abs().max()) for a, b in zip(delayed.params, delayed_params)) <= 1e-10
    never = OnlineTuner(SGD([w.clone() for w in weights], lr=2.0, momentum=0.6), train_loss, validation_loss,
                        ["lr", "momentum"], every=3, window=2, meta_lr=0.2, backtrack=0)
    for batch in batches:
        never.step(batch)
    assert never.restarts == 0 and not any(h["restarted"] for h in never.history)
    # at most `backtrack` restarts; a tuner of other hyperparameters never restarts
    capped = OnlineTuner(SGD([w.clone() for w in weights], lr=2.0, momentum=0.6), train_loss, validation_loss,
                         ["lr"], every=3, window=2, backtrack=2)
    for batch in batches[:12]:
        capped.step(batch)
    assert capped.restarts == 2 and [h["restarted"] for h in capped.history] == [True, True, False, False]
    other = OnlineTuner(SGD([w.clone() for w in weights], lr=2.0, momentum=0.6), train_loss, validation_loss,
                        ["momentum"], every=3, window=2)
    for batch in batches[:6]:
        other.step(batch)
    assert other.restarts == 0


def test_scheduler_trajectory_matches_torch() -> None:
    """With a tuned ExponentialLR gamma, the learning rates the run used are torch's scheduler's with
    the same gammas, set between windows (torch.optim + torch's ExponentialLR replay)."""
    weights, batches, train_loss, validation_loss = problem(4, n_batches=20)
    opt = SGD([w.clone() for w in weights], lr=0.2, momentum=0.5)
    scheduler = ExponentialLR(opt, gamma=0.95)
    tuner = OnlineTuner(opt, train_loss, validation_loss, "scheduler.gamma", scheduler=scheduler, every=4,
                        meta_lr=0.3)
    gammas = []
    for batch in batches:
        gammas.append(scheduler.gamma)
        tuner.step(batch)
    assert len(set(gammas)) >= 4
    ref_params = [w.clone().requires_grad_() for w in weights]
    reference = torch.optim.SGD(ref_params, lr=0.2, momentum=0.5)
    ref_scheduler = torch.optim.lr_scheduler.ExponentialLR(reference, gamma=0.95)
    for gamma, batch in zip(gammas, batches):
        ref_scheduler.gamma = gamma
        reference.zero_grad()
        train_loss(ref_params, batch).backward()
        reference.step()
        ref_scheduler.step()
    assert max(float((a - b.detach()).abs().max()) for a, b in zip(tuner.params, ref_params)) <= 1e-10
    assert abs(opt.param_groups[0]["lr"] - reference.param_groups[0]["lr"]) <= 1e-15


def composite_scheduler(kind: str, lr_scheduler: Any, opt: Any) -> Any:
    """A warm-up then a decay, as a SequentialLR or a ChainedScheduler of ``lr_scheduler``'s classes."""
    warm = lr_scheduler.LinearLR(opt, 0.2, 1.0, total_iters=4)
    if kind == "SequentialLR":
        return lr_scheduler.SequentialLR(opt, [warm, lr_scheduler.ExponentialLR(opt, 0.9)], [4])
    return lr_scheduler.ChainedScheduler([warm, lr_scheduler.ExponentialLR(opt, 0.9)])


@pytest.mark.parametrize("kind", ["SequentialLR", "ChainedScheduler"])
def test_composite_scheduler_trajectory_matches_torch(kind: str, tmp_path: Any) -> None:
    """Under a SequentialLR / ChainedScheduler the windows step copies of the sub-schedulers, not the
    live ones: the run is torch.optim's with torch's scheduler and the tuned momenta set between windows,
    bit for bit; window_loss leaves the sub-schedulers and the rate as they were; a resumed run is the
    uninterrupted one."""
    import diffopt.optim.lr_scheduler as ours
    weights, batches, train_loss, validation_loss = problem(0, n_batches=12)

    def build() -> OnlineTuner:
        opt = SGD([w.clone() for w in weights], lr=0.2, momentum=0.5)
        return OnlineTuner(opt, train_loss, validation_loss, "momentum", scheduler=composite_scheduler(kind, ours, opt),
                           every=3, window=2, meta_lr=0.3)

    tuner = build()
    for batch in batches:
        tuner.step(batch)
    ref_params = [w.clone().requires_grad_() for w in weights]
    reference = torch.optim.SGD(ref_params, lr=0.2, momentum=0.5)
    ref_scheduler = composite_scheduler(kind, torch.optim.lr_scheduler, reference)
    momenta = {h["step"]: h["values"]["momentum"] for h in tuner.history}
    assert len(set(momenta.values())) >= 3
    for t, batch in enumerate(batches):
        reference.zero_grad()
        train_loss(ref_params, batch).backward()
        reference.step()
        ref_scheduler.step()
        if t + 1 in momenta:
            reference.param_groups[0]["momentum"] = momenta[t + 1]
    assert all(torch.equal(a, b.detach()) for a, b in zip(tuner.params, ref_params))
    assert tuner.optimizer.param_groups[0]["lr"] == reference.param_groups[0]["lr"]

    resumed = interrupted_run(build, batches, 7, tmp_path / "tuner.pt")
    assert all(torch.equal(a, b) for a, b in zip(tuner.params, resumed.params))

    opt = SGD([w.clone() for w in weights], lr=0.2, momentum=0.5)
    scheduler = composite_scheduler(kind, ours, opt)
    before = [s.last_epoch for s in scheduler._schedulers], opt.param_groups[0]["lr"]
    window_loss(opt, batches[:3], train_loss, validation_loss,
                {"momentum": torch.tensor(0.5, dtype=F64, requires_grad=True)}, scheduler=scheduler)
    assert ([s.last_epoch for s in scheduler._schedulers], opt.param_groups[0]["lr"]) == before


def test_a_momentum_the_scheduler_cycles_is_refused_naming_the_fix() -> None:
    """OneCycleLR / CyclicLR with cycle_momentum=True write 'momentum' (or Adam's 'beta1') at every step:
    tuning it is refused when the tuner is built (it had been accepted and silently overwritten); the
    cycle's own bounds tune, and so does the momentum under cycle_momentum=False."""
    from diffopt.optim.lr_scheduler import CyclicLR, SequentialLR
    weights, batches, train_loss, validation_loss = problem(0, n_batches=3)
    sgd = lambda: SGD([w.clone() for w in weights], lr=0.1, momentum=0.9)  # noqa: E731
    adam = lambda: Adam([w.clone() for w in weights], lr=0.01)  # noqa: E731
    cases = [(sgd, "momentum", lambda o: OneCycleLR(o, max_lr=0.1, total_steps=20), "OneCycleLR"),
             (adam, "beta1", lambda o: OneCycleLR(o, max_lr=0.1, total_steps=20), "OneCycleLR"),
             (sgd, "momentum", lambda o: CyclicLR(o, 0.01, 0.1, step_size_up=4), "CyclicLR"),
             (adam, "beta1", lambda o: SequentialLR(o, [ExponentialLR(o, 0.9), OneCycleLR(o, 0.1, total_steps=9)],
                                                    [3]), "OneCycleLR")]
    for make, name, make_scheduler, cycler in cases:
        opt = make()
        with pytest.raises(ValueError, match=rf"{name!r} is written by the scheduler.*{cycler} with cycle_momentum"
                                             rf"=True.*cycle_momentum=False"):
            OnlineTuner(opt, train_loss, validation_loss, [name], scheduler=make_scheduler(opt), every=3)
    for spec, make_scheduler in (("momentum", lambda o: OneCycleLR(o, 0.1, total_steps=20, cycle_momentum=False)),
                                 ("max_momentum", lambda o: OneCycleLR(o, 0.1, total_steps=20)),
                                 ("scheduler.max_momentums", lambda o: CyclicLR(o, 0.01, 0.1, step_size_up=4))):
        opt = sgd()
        tuner = OnlineTuner(opt, train_loss, validation_loss, [spec], scheduler=make_scheduler(opt), every=3,
                            meta_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0))
        for batch in batches:
            tuner.step(batch)
        (g,) = tuner.last_hypergradient.values()
        assert torch.isfinite(g).all() and float(g.abs().max()) > 0, spec


def test_mismatched_values_settings_and_checkpoints_are_named(tmp_path: Any) -> None:
    """Refused with the shapes, the scheduler or the missing steps named (they had broadcast silently,
    failed later with a misleading message, raised AttributeError, or loaded another model silently)."""
    weights, batches, train_loss, validation_loss = problem(0, n_batches=4)
    sgd = lambda: SGD([w.clone() for w in weights], lr=0.1, momentum=0.5)  # noqa: E731
    value = lambda *shape: torch.full(shape, 0.1, dtype=F64, requires_grad=True)  # noqa: E731
    per_element = [value(3), value(4), value(1, 4)]  # (3,) for the (4, 3) weight would broadcast
    with pytest.raises(ValueError, match=r"values\['lr'\]\[0\] has shape \(3,\), but parameter 0 has shape \(4, 3\)"):
        hypergradient(sgd(), batches[:2], train_loss, validation_loss, {Tuned("lr", "element"): per_element})
    for shape in ((5,), (1, 1)):  # (1, 1) had passed as one number and given a (1, 1) validation loss
        with pytest.raises(ValueError, match=rf"values\['lr'\] has shape {re.escape(str(shape))}; scope 'global' "
                                             "takes one number"):
            hypergradient(sgd(), batches[:2], train_loss, validation_loss, {"lr": value(*shape)})
    for function in (hypergradient, window_loss):
        with pytest.raises(ValueError, match=rf"{function.__name__}: batches is empty.*no training steps"):
            function(sgd(), [], train_loss, validation_loss, {"lr": value()})
    two = SGD([{"params": [w.clone() for w in weights[:2]], "lr": 0.1}, {"params": [weights[2].clone()], "lr": 0.05}])
    with pytest.raises(ValueError, match=r"ExponentialLR.gamma is one number for all 2 parameter groups.*scope "
                                         r"'global'"):
        OnlineTuner(two, train_loss, validation_loss, [Tuned("scheduler.gamma", "group")],
                    scheduler=ExponentialLR(two, 0.9), every=2)

    def build(params: list[Tensor], scheduled: bool) -> OnlineTuner:
        opt = SGD(params, lr=0.1, momentum=0.5)
        return OnlineTuner(opt, train_loss, validation_loss, "momentum", every=2,
                           scheduler=ExponentialLR(opt, 0.9) if scheduled else None)

    saved = build([w.clone() for w in weights], True)
    for batch in batches[:3]:
        saved.step(batch)
    state = saved.state_dict()
    with pytest.raises(ValueError, match=r"saved with a scheduler, this tuner has no scheduler="):
        build([w.clone() for w in weights], False).load_state_dict(state)
    other = build([torch.zeros(2, dtype=F64)], True)
    with pytest.raises(ValueError, match=r"3 parameters of shapes \[\(4, 3\), \(4,\), \(1, 4\)\], this tuner's "
                                         r"optimizer has 1 of shapes \[\(2,\)\]"):
        other.load_state_dict(state)
    assert torch.equal(other.params[0], torch.zeros(2, dtype=F64)) and other.step_count == 0  # nothing loaded


def test_onecycle_max_lr_trajectory_matches_torch() -> None:
    """OneCycleLR's peak, tuned as the group key 'max_lr': the run equals torch.optim.SGD under torch's
    OneCycleLR with the same per-step max_lr written into its groups (1e-10), and the peak moved."""
    weights, batches, train_loss, validation_loss = problem(8, n_batches=24)
    opt = SGD([w.clone() for w in weights], lr=0.1, momentum=0.5)
    scheduler = OneCycleLR(opt, max_lr=0.3, total_steps=24, pct_start=0.4, cycle_momentum=False)
    tuner = OnlineTuner(opt, train_loss, validation_loss, "max_lr", scheduler=scheduler, every=4, window=3,
                        meta_lr=0.3)
    peaks = []
    for batch in batches:
        peaks.append(opt.param_groups[0]["max_lr"])
        tuner.step(batch)
    assert len(set(peaks)) >= 5 and tuner.values()["max_lr"] != 0.3
    ref_params = [w.clone().requires_grad_() for w in weights]
    reference = torch.optim.SGD(ref_params, lr=0.1, momentum=0.5)
    ref_scheduler = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=0.3, total_steps=24, pct_start=0.4,
                                                        cycle_momentum=False)
    for peak, batch in zip(peaks, batches):
        reference.param_groups[0]["max_lr"] = peak
        reference.zero_grad()
        train_loss(ref_params, batch).backward()
        reference.step()
        if ref_scheduler.last_epoch < 23:
            ref_scheduler.step()
    error = max(float((a - b.detach()).abs().max()) for a, b in zip(tuner.params, ref_params))
    record("tuner OneCycleLR max_lr trajectory vs torch.optim replay (max abs)", "SGD", error)
    assert error <= 1e-10


def test_lambdalr_base_lr_trajectory_matches_torch() -> None:
    """'lr' under a LambdaLR warm-up is the base rate (per group here): the rate of every step is the base
    rate times the warm-up's factor (exactly), the run starts too fast and backtracks twice, and from
    the last restart it equals torch.optim.Adam under torch's LambdaLR with the recorded base rates
    written into ``base_lrs`` (and this step's rate) between windows (1e-10)."""
    weights, batches, train_loss, validation_loss = problem(9, n_batches=30)
    lambdas = [warmup(8), warmup(6, 0.1)]
    opt = Adam(two_groups(weights, (2.0, 1.0)), betas=(0.8, 0.9))
    scheduler = LambdaLR(opt, lambdas)
    tuner = OnlineTuner(opt, train_loss, validation_loss, Tuned("lr", "group"), scheduler=scheduler, every=4,
                        window=3, meta_lr=0.3, backtrack=2)
    bases, rates, epochs = [], [], []
    for batch in batches:
        bases.append(list(scheduler.base_lrs))
        rates.append([g["lr"] for g in opt.param_groups])
        epochs.append(scheduler.last_epoch)
        tuner.step(batch)
    assert tuner.restarts == 2 and [h["restarted"] for h in tuner.history[:3]] == [True, True, False]
    assert tuner.history[1]["values"]["lr"] == [0.5, 0.25]
    assert len({str(b) for b in bases}) >= 6 and tuner.values()["lr"] == list(scheduler.base_lrs)
    for base, rate, epoch in zip(bases, rates, epochs):
        assert rate == [b * f(epoch) for b, f in zip(base, lambdas)]
    assert epochs[8:12] == [0, 1, 2, 3]  # the scheduler restarted with the weights
    ref_params = [w.clone().requires_grad_() for w in weights]
    lambda_lr_replay([{"params": ref_params[:2], "lr": 2.0}, {"params": ref_params[2:], "lr": 1.0}], lambdas,
                     bases[8:], batches[8:], train_loss, ref_params)
    error = max(float((a - b.detach()).abs().max()) for a, b in zip(tuner.params, ref_params))
    record("tuner LambdaLR base lr trajectory vs torch.optim replay (max abs)", "Adam", error)
    assert error <= 1e-10


def lambda_lr_replay(groups, lambdas, bases, batches, train_loss, params) -> None:
    """torch.optim.Adam (betas 0.8, 0.9) under torch's LambdaLR over ``groups``, each step's base rates set
    to the recorded ``bases`` first (as the tuner sets them between windows); trains ``params`` in place."""
    reference = torch.optim.Adam(groups, betas=(0.8, 0.9))
    scheduler = torch.optim.lr_scheduler.LambdaLR(reference, lambdas)
    for base, batch in zip(bases, batches):
        scheduler.base_lrs = list(base)
        for group, b, f in zip(reference.param_groups, base, scheduler.lr_lambdas):
            group["lr"] = b * f(scheduler.last_epoch)
        reference.zero_grad()
        train_loss(params, batch).backward()
        reference.step()
        scheduler.step()


def test_restart_warmup_trajectory_matches_torch() -> None:
    """restart_warmup=8, restart_delay=3: Adam at lr 2 is too fast, so after the first period training
    restarts once (no further restart) with the lr halved under a LambdaLR of LinearWarmup(8) that the
    tuner installs, and tunes its base rate from 3 + 4 steps after the restart on. Every step's rate is
    the base rate times min(1, t / 8), and from the restart the run equals torch.optim.Adam under torch's
    LambdaLR with the recorded base rates (1e-10). A run that is not too fast never installs it and is the
    run without the option, bit for bit."""
    weights, batches, train_loss, validation_loss = problem(10, n_batches=30)
    opt = Adam([w.clone() for w in weights], lr=2.0, betas=(0.8, 0.9))
    tuner = OnlineTuner(opt, train_loss, validation_loss, "lr", every=4, window=3, meta_lr=0.3, restart_warmup=8,
                        restart_delay=3)
    bases, rates = [], []
    for batch in batches:
        bases.append(None if tuner.scheduler is None else tuner.scheduler.base_lrs[0])
        rates.append(opt.param_groups[0]["lr"])
        tuner.step(batch)
    assert tuner.restarts == 1 and [h["step"] for h in tuner.history] == [4] + list(range(11, 31, 4))
    assert tuner.history[0]["restarted"] and tuner.history[0]["values"]["lr"] == 1.0
    assert isinstance(tuner.scheduler, LambdaLR) and tuner.values()["lr"] == tuner.scheduler.base_lrs[0]
    assert rates[:4] == [2.0] * 4 and bases[4:11] == [1.0] * 7 and len(set(bases[4:])) >= 5
    assert rates[4:] == [b * min(1.0, t / 8) for t, b in enumerate(bases[4:])]
    ref_params = [w.clone().requires_grad_() for w in weights]
    lambda_lr_replay([{"params": ref_params, "lr": 1.0}], LinearWarmup(8), [[b] for b in bases[4:]], batches[4:],
                     train_loss, ref_params)
    error = max(float((a - b.detach()).abs().max()) for a, b in zip(tuner.params, ref_params))
    record("tuner restart warm-up trajectory vs torch.optim replay (max abs)", "Adam", error)
    assert error <= 1e-10
    runs = []
    for option in (8, 0):
        calm = OnlineTuner(Adam([w.clone() for w in weights], lr=0.01), train_loss, validation_loss, "lr", every=4,
                           window=3, meta_lr=0.3, restart_warmup=option)
        for batch in batches:
            calm.step(batch)
        runs.append(calm)
    assert runs[0].restarts == 0 and runs[0].scheduler is None
    assert all(torch.equal(a, b) for a, b in zip(runs[0].params, runs[1].params))


def test_pes_is_unbiased_on_a_quadratic() -> None:
    """PES over three windows with fixed values: the mean of its estimate equals the gradient through all
    six steps (no truncation) within 3 standard errors; a linear model with squared error, SGD with
    momentum, identity reparameterisation (a small sigma keeps the smoothing bias far below the error)."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(1, 3, generator=g, dtype=F64)
    batches = [(torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 1, generator=g, dtype=F64))
               for _ in range(6)]
    vx, vy = torch.randn(12, 3, generator=g, dtype=F64), torch.randn(12, 1, generator=g, dtype=F64)

    def train_loss(p: Params, b: tuple[Tensor, Tensor]) -> Tensor:
        return ((b[0] @ p[0].T - b[1]) ** 2).mean()

    def validation_loss(p: Params) -> Tensor:
        return ((vx @ p[0].T - vy) ** 2).mean()

    spec = [Tuned("lr", transform="identity"), Tuned("momentum", transform="identity")]
    opt = SGD([w0.clone()], lr=0.1, momentum=0.5)
    tuner = OnlineTuner(opt, train_loss, validation_loss, spec, every=2, mode="pes", pes_samples=400, pes_sigma=1e-3,
                        meta_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0),
                        generator=torch.Generator().manual_seed(5))
    for batch in batches:
        tuner.step(batch)
    estimate = torch.stack(list(tuner.last_hypergradient.values()))
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    momentum = torch.tensor(0.5, dtype=F64, requires_grad=True)
    truth = hypergradient(SGD([w0.clone()], lr=0.1, momentum=0.5), batches, train_loss, validation_loss,
                          {"lr": lr, "momentum": momentum})
    truth = torch.stack([truth["lr"][0], truth["momentum"][0]])
    z = float(((estimate - truth).abs() / tuner.last_standard_error).max())
    record("tuner PES |mean - truth| / SE", "quadratic", z)
    assert z <= 3.0, f"PES {estimate} vs truth {truth} (SE {tuner.last_standard_error})"
    assert tuner.last_standard_error <= 0.25 * float(truth.norm())


@pytest.mark.parametrize("mode", ["reverse", "pes", "reverse, backtracking", "reverse, backtracking, LambdaLR, delay",
                                  "reverse, backtracking, restart warm-up"])
def test_interrupted_and_resumed_run_equals_uninterrupted(mode: str, tmp_path: Any) -> None:
    """Saved mid-window (and mid-PES-horizon, and between two backtracking restarts: the lrs 8 and 4
    restart at steps 4, 8, 12, 16 and 20; under a LambdaLR warm-up whose base rates are tuned, with
    delay=3, they restart at steps 7, 14 and 21: the save at step 10 falls at the end of the second
    run's delay; with restart_warmup=8 they restart once, at step 4, into the warm-up the tuner
    installs, and the save falls in the restarted run's first window)
    and resumed into freshly built objects: bit for bit."""
    weights, batches, train_loss, validation_loss = problem(5, n_batches=22)
    with_scheduler = "LambdaLR" in mode
    lrs = (8.0, 4.0) if "backtracking" in mode else (0.05, 0.02)
    restart_warmup = 8 if "restart warm-up" in mode else 0
    # None: not checked
    restarts = 3 if with_scheduler else 1 if restart_warmup else 5 if "backtracking" in mode else None
    mode = mode.split(",")[0]

    def build() -> OnlineTuner:
        opt = Adam(two_groups(weights, lrs), betas=(0.8, 0.9))
        scheduler = LambdaLR(opt, warmup(8, 0.5)) if with_scheduler else None  # 3 restarts with delay=3
        return OnlineTuner(opt, train_loss, validation_loss, [Tuned("lr", "group"), "beta1"], every=4,
                           window=None if mode == "pes" else 3, mode=mode, pes_samples=2, meta_lr=0.2,
                           scheduler=scheduler, delay=3 if with_scheduler else 0, restart_warmup=restart_warmup)

    whole = build()
    for batch in batches:
        whole.step(batch)
    resumed = interrupted_run(build, batches, 10, tmp_path / "tuner.pt")
    assert all(torch.equal(a, b) for a, b in zip(whole.params, resumed.params))
    assert all(torch.equal(a, b) for a, b in zip(whole.raw_tensors(), resumed.raw_tensors()))
    assert [h["values"] for h in whole.history] == [h["values"] for h in resumed.history]
    assert whole.restarts == resumed.restarts
    assert restarts is None or whole.restarts == restarts
    assert all(torch.equal(a, b) for s1, s2 in zip(whole.optimizer.state, resumed.optimizer.state)
               for a, b in zip(s1.values(), s2.values()) if isinstance(a, Tensor))


def test_element_scope_checkpoint_and_values(tmp_path: Any) -> None:
    weights, batches, train_loss, validation_loss = problem(6, n_batches=8)
    opt = SGD([w.clone() for w in weights], lr=0.1)
    tuner = OnlineTuner(opt, train_loss, validation_loss, {"lr": "element"}, every=4)
    for batch in batches:
        tuner.step(batch)
    lrs = tuner.values()["lr"]
    assert [v.shape for v in lrs] == [w.shape for w in weights]
    assert len({float(v) for lr in lrs for v in lr.reshape(-1)}) > 1  # the rates now differ per element
    assert tuner.history[-1]["values"]["lr"] == [float(v.mean()) for v in lrs]  # history: one mean per tensor
    assert [g.shape for g in tuner.last_hypergradient.values()] == [w.shape for w in weights]
    tuner.save(tmp_path / "t.pt")
    again = OnlineTuner(SGD([w.clone() for w in weights], lr=0.1), train_loss, validation_loss, {"lr": "element"},
                        every=4)
    again.load(tmp_path / "t.pt")
    assert all(torch.equal(a, b) for a, b in zip(again.values()["lr"], lrs))


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def test_refuses_a_torch_optimizer_and_a_first_order_one() -> None:
    weights, _, train_loss, validation_loss = problem()
    with pytest.raises(TypeError, match="from_torch"):
        OnlineTuner(torch.optim.SGD([w.clone().requires_grad_() for w in weights], lr=0.1), train_loss,
                    validation_loss)
    with pytest.raises(ValueError, match="first_order=True.*drops the graph"):
        OnlineTuner(SGD([w.clone() for w in weights], lr=0.1, first_order=True), train_loss, validation_loss)


def test_python_float_where_a_tensor_is_needed() -> None:
    weights, batches, train_loss, validation_loss = problem()
    opt = SGD([w.clone() for w in weights], lr=0.1)
    with pytest.raises(TypeError, match=r"values\['lr'\] is a Python float.*torch.tensor\(0.1"):
        hypergradient(opt, batches[:2], train_loss, validation_loss, {"lr": 0.1})
    with pytest.raises(ValueError, match=r"values\['lr'\] does not require grad.*requires_grad=True"):
        hypergradient(opt, batches[:2], train_loss, validation_loss, {"lr": torch.tensor(0.1, dtype=F64)})


def test_validation_loss_that_ignores_the_weights_or_a_hyperparameter() -> None:
    weights, batches, train_loss, validation_loss = problem()
    constant = torch.tensor(1.0, dtype=F64)
    tuner = OnlineTuner(SGD([w.clone() for w in weights], lr=0.1), train_loss, lambda p: constant, every=2)
    with pytest.raises(ValueError, match="does not depend on the weights passed to validation_loss"):
        for batch in batches[:2]:
            tuner.step(batch)
    tuner = OnlineTuner(SGD([w.clone() for w in weights], lr=0.1), train_loss,
                        lambda p: (p[0] ** 2).sum(1), every=2)  # one loss per row, not a scalar
    with pytest.raises(TypeError, match=r"validation_loss\(params\) must return a scalar tensor, got Tensor\(4,\)"):
        for batch in batches[:2]:
            tuner.step(batch)
    # momentum acts only from the second step of a fresh SGD: a one-step window cannot see it
    for mode in ("reverse", "forward"):
        tuner = OnlineTuner(SGD([w.clone() for w in weights], lr=0.1, momentum=0.5), train_loss, validation_loss,
                            ["lr", "momentum"], every=1, mode=mode)
        with pytest.raises(ValueError, match=r"do not depend on momentum, so its hypergradient would be silently "
                                             r"zero.*lengthen the window"):
            tuner.step(batches[0])


def test_an_optimizer_that_drops_the_graph() -> None:
    class DetachingExponentialLR(ExponentialLR):
        def get_lr(self) -> list[float]:  # a scheduler that turns its rates into Python floats
            return [float(lr.detach()) if isinstance(lr, Tensor) else lr for lr in super().get_lr()]

    weights, batches, train_loss, validation_loss = problem()
    for mode in ("reverse", "forward"):
        opt = SGD([w.clone() for w in weights], lr=0.1)
        tuner = OnlineTuner(opt, train_loss, validation_loss, "scheduler.gamma", every=3, mode=mode,
                            scheduler=DetachingExponentialLR(opt, gamma=0.9))
        with pytest.raises(ValueError, match=r"weights after the window do not depend on scheduler.gamma, so its "
                                             r"hypergradient would be silently zero.*the optimizer dropped the graph"):
            for batch in batches[:3]:
                tuner.step(batch)


def test_settings_errors_name_the_argument() -> None:
    weights, _, train_loss, validation_loss = problem()

    def make(**kw: Any) -> OnlineTuner:
        opt = SGD([w.clone() for w in weights], lr=0.1)
        return OnlineTuner(opt, train_loss, validation_loss, **kw)

    with pytest.raises(ValueError, match="no hyperparameter 'lrr'; did you mean 'lr'"):
        make(hyperparameters="lrr")
    with pytest.raises(ValueError, match=r"momentum'\] is 0.0, outside the open range \(0, 1\)"):
        make(hyperparameters="momentum")
    with pytest.raises(ValueError, match=r"window \(5\) must be <= every \(3\)"):
        make(every=3, window=5)
    with pytest.raises(ValueError, match="window must equal every"):
        make(every=3, window=2, mode="pes")
    with pytest.raises(ValueError, match="mode must be one of"):
        make(mode="backward")
    with pytest.raises(ValueError, match="backtrack must be an integer >= 0, got -1"):
        make(backtrack=-1)
    with pytest.raises(ValueError, match=r"backtrack_factor must be a number in \(0, 1\), got 1.5"):
        make(backtrack_factor=1.5)
    with pytest.raises(ValueError, match="delay must be an integer >= 0, got -1"):
        make(delay=-1)
    with pytest.raises(ValueError, match="restart_warmup must be an integer >= 0, got 2.5"):
        make(restart_warmup=2.5)
    with pytest.raises(ValueError, match="restart_warmup=5 warms .* but backtrack is 0"):
        make(restart_warmup=5, backtrack=0)
    with pytest.raises(ValueError, match="restart_warmup=5 warms .* but 'lr' is not tuned"):
        make(restart_warmup=5, hyperparameters="weight_decay")
    with pytest.raises(ValueError, match="restart_warmup=5 warms .* but 'lr' is tuned per element"):
        make(restart_warmup=5, hyperparameters={"lr": "element"})
    with pytest.raises(ValueError, match="restart_warmup=5 warms .* but a scheduler was given"):
        scheduled = SGD([w.clone() for w in weights], lr=0.1)
        OnlineTuner(scheduled, train_loss, validation_loss, "lr", scheduler=LambdaLR(scheduled, warmup(3)),
                    restart_warmup=5)
    opt = SGD([w.clone() for w in weights], lr=0.1)
    with pytest.raises(ValueError, match="'lr' is written by the scheduler.*express the schedule as a diffopt"):
        OnlineTuner(opt, train_loss, validation_loss, "lr", scheduler=ExponentialLR(opt, gamma=0.9))
    with pytest.raises(ValueError, match="'lr' under a LambdaLR tunes its base rates, one per group"):
        OnlineTuner(opt, train_loss, validation_loss, {"lr": "element"}, scheduler=LambdaLR(opt, warmup(3)))
    with pytest.raises(ValueError, match="scope 'group'"):
        OnlineTuner(SGD(two_groups(weights), lr=0.1), train_loss, validation_loss, "lr")
    tuner = make()
    other = OnlineTuner(SGD([w.clone() for w in weights], lr=0.1), train_loss, validation_loss, every=3)
    with pytest.raises(ValueError, match="build it with the same settings"):
        tuner.load_state_dict(other.state_dict())


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam",
                                  "Rprop", "ASGD"])
def test_a_window_start_is_not_written_by_later_steps(name: str) -> None:
    """The tuner keeps a window's start by reference (update rules never write in place): the training
    steps after it leave its weights and state tensors unchanged."""
    from diffopt.hyper._window import Snapshot, advance
    from diffopt.optim import OPTIMIZERS

    options = {"SGD": {"momentum": 0.5, "weight_decay": 0.01}, "AdamW": {"amsgrad": True},
               "RMSprop": {"momentum": 0.3, "centered": True}}.get(name, {})
    weights, batches, train_loss, _ = problem(7)
    opt = OPTIMIZERS[name]([w.clone() for w in weights], **options)
    for batch in batches[:2]:
        advance(opt, None, batch, train_loss)
    start = Snapshot.capture(opt)
    saved = Snapshot.capture(opt).payload()  # cloned tensors
    for batch in batches[2:6]:
        advance(opt, None, batch, train_loss)
    assert all(torch.equal(a, b) for a, b in zip(start.params, saved["params"]))
    for state, kept in zip(start.states, saved["states"]):
        assert all(torch.equal(state[k], kept[k]) for k in state if isinstance(state[k], Tensor)), name


def test_forward_mode_names_pytorchs_forward_ad_gap_for_the_mean_squared_error():
    """torch's forward AD cannot differentiate F.mse_loss's gradient ('ZeroTensors are immutable'):
    forward mode used to crash with that message (review). It now says what to do; with the loss
    written out it gives reverse mode's hypergradient."""
    import torch.nn.functional as F

    import diffopt

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, 2, generator=g, dtype=torch.float64)

    def tuner(loss, mode):
        optimizer = diffopt.optim.Adam([torch.randn(4, 2, generator=torch.Generator().manual_seed(2),
                                                    dtype=torch.float64)], lr=0.05)
        return diffopt.hyper.OnlineTuner(optimizer, lambda p, b: loss(b[0] @ p[0], b[1]),
                                         lambda p: loss(x @ p[0], y), "lr", every=3, mode=mode, backtrack=0)

    failing = tuner(F.mse_loss, "forward")
    with pytest.raises(RuntimeError, match=r"forward mode failed inside PyTorch's forward-mode AD.*mode='reverse'.*"
                                           r"\(\(prediction - target\) \*\* 2\)\.mean\(\)"):
        for t in range(3):
            failing.step((x[10 * t:10 * t + 10], y[10 * t:10 * t + 10]))
    written = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
    results = []
    for mode in ("forward", "reverse"):
        run = tuner(written, mode)
        for t in range(3):
            run.step((x[10 * t:10 * t + 10], y[10 * t:10 * t + 10]))
        results.append(run.last_hypergradient)
    for label in results[0]:
        assert torch.allclose(results[0][label], results[1][label], rtol=1e-10, atol=0)


@pytest.mark.parametrize(("spec", "message"), [
    (0.1, r"hyperparameters: expected a name \('lr'\), a list of names.*got 0.1"),
    (None, r"hyperparameters: expected a name \('lr'\).*got None"),
    (["betas"], r"SGD has no hyperparameter 'betas'"),
])
def test_a_hyperparameter_spec_that_is_not_one_is_named(spec, message):
    """A float or None gave a bare "'float' object is not iterable"; 'betas' on SGD complained about
    'beta1' (review)."""
    import diffopt

    optimizer = diffopt.optim.SGD([torch.zeros(3, 1, dtype=torch.float64)], lr=0.1)
    with pytest.raises((TypeError, ValueError), match=message):
        diffopt.hyper.OnlineTuner(optimizer, lambda p, b: p[0].sum(), lambda p: p[0].sum(), spec)


def test_a_scheduler_attribute_a_later_window_does_not_use_is_left_alone(tmp_path: Any) -> None:
    """MultiStepLR's gamma acts only at its milestones: a window without one gives it no hypergradient.
    The tuner had stopped the run with 'the weights do not depend on scheduler.gamma' at step 12 after
    tuning it at steps 3, 6 and 9; it now keeps its value there (no meta-step, so no momentum either)
    and warns once. A window before any use still is an error (a scheduler that detaches looks alike)."""
    from diffopt.optim.lr_scheduler import MultiStepLR

    weights, batches, train_loss, validation_loss = problem(0, n_batches=15)

    def build() -> OnlineTuner:
        opt = SGD([w.clone() for w in weights], lr=0.2, momentum=0.5)
        return OnlineTuner(opt, train_loss, validation_loss, "scheduler.gamma", every=3, window=3,
                           scheduler=MultiStepLR(opt, [2, 5, 8], gamma=0.6))

    tuner = build()
    with pytest.warns(UserWarning, match=r"scheduler.gamma got no hypergradient in the window ending at training "
                                         r"step 12: the scheduler did not use it") as caught:
        for batch in batches:
            tuner.step(batch)
    assert sum("no hypergradient" in str(w.message) for w in caught) == 1  # once, though steps 12 and 15 skip
    gammas = [h["values"]["scheduler.gamma"] for h in tuner.history]
    assert len(set(gammas[:3])) == 3 and gammas[2] == gammas[3] == gammas[4]
    assert [h["hypergradient"]["scheduler.gamma"] for h in tuner.history][3:] == [0.0, 0.0]
    # resumed before the window that skips it, and after the warning: the same run, warned once in all
    with pytest.warns(UserWarning, match="scheduler.gamma got no hypergradient"):
        resumed = interrupted_run(build, batches, 9, tmp_path / "tuner.pt")
    first = build()
    with pytest.warns(UserWarning, match="scheduler.gamma got no hypergradient"):
        for batch in batches[:13]:
            first.step(batch)
    first.save(tmp_path / "late.pt")
    late = build()
    late.load(tmp_path / "late.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for batch in batches[13:]:
            late.step(batch)
    for run in (resumed, late):
        assert [h["values"] for h in run.history] == [h["values"] for h in tuner.history]
        assert all(torch.equal(a, b) for a, b in zip(tuner.params, run.params))
    opt = SGD([w.clone() for w in weights], lr=0.2, momentum=0.5)
    late = OnlineTuner(opt, train_loss, validation_loss, "scheduler.gamma", every=3, window=3,
                       scheduler=MultiStepLR(opt, [3], gamma=0.6))
    with pytest.raises(ValueError, match="the weights after the window do not depend on scheduler.gamma"):
        for batch in batches[:3]:
            late.step(batch)


def test_a_meta_step_out_of_range_with_the_identity_transform_leaves_the_values_as_they_were() -> None:
    """With transform='identity' a meta-step can take the lr below 0: the error came after the raw value had
    moved (the tuner left inconsistent) and named no fix. The values are restored and the fix is named."""
    weights, batches, train_loss, validation_loss = problem(0, n_batches=12)
    opt = SGD([w.clone() for w in weights], lr=0.01, momentum=0.5)
    tuner = OnlineTuner(opt, train_loss, validation_loss, [Tuned("lr", transform="identity")], every=2, meta_lr=5.0)
    with pytest.raises(ValueError, match=r"the meta-step took a hyperparameter out of its range \(.*invalid lr "
                                         r"-[\d.]+.*\); the values are left as they were.*'log' for rates"):
        for batch in batches:
            tuner.step(batch)
    lr = opt.param_groups[0]["lr"]
    assert float(lr) >= 0 and float(tuner.raw_tensors()[0]) == float(lr)
