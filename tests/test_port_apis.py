"""What a port from higher, learn2learn or torchopt meets first (issue 15).

* single-task tensors without a task dimension are refused with the fix (``x[None]``);
* higher's ``override=`` (per-step hyperparameter tensors) on ``diffopt.innerloop``'s
  optimizer and on ``DifferentiableOptimizer.step``, against higher's own result;
* ``MAML(model, lr=...)`` names ``inner_lr``;
* ``NormalCG``: CG on the normal equations, against a dense solve.

Gradients are compared in float64 to ``1e-12 * max(1, |reference|)`` per element.
"""
from __future__ import annotations

import higher
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import diffopt
from diffopt.algorithms import MAML, PrototypicalNetwork
from diffopt.unroll import InnerLoop
from peers import learn2learn_reference
from strategies import F64, record

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:We've integrated functorch:FutureWarning")]  # torchopt 0.7

TOL = 1e-12


def close(name: str, ours, reference) -> float:
    assert ours is not None and reference is not None, name
    error = float(((ours - reference).abs() / reference.abs().clamp(min=1.0)).max())
    record("ports", name, error)
    assert error <= TOL, f"{name}: {error:.3e}"
    return error


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()


# -- item 2: one task's tensors read as many ------------------------------------------------

def sine_task(n: int = 10):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, generator=g, dtype=F64) * 10 - 5
    return x, torch.sin(x)


def test_single_task_without_task_dimension_is_refused_by_maml():
    x, y = sine_task()
    learner = MAML(mlp(), inner_lr=0.01)
    with pytest.raises(ValueError, match=r"x\[None\]"):
        learner.meta_loss(x, y, x, y)
    loss = learner.meta_loss(x[None], y[None], x[None], y[None])  # the fix works
    assert loss.dim() == 0


def test_single_task_without_task_dimension_is_refused_by_the_engine():
    x, y = sine_task()
    loop = InnerLoop(mlp(), None, F.mse_loss, steps=1)
    for call in (lambda: loop.meta_loss(x, y, x, y), lambda: loop.adapt(x, y)):
        with pytest.raises(ValueError, match=r"no example dimension.*x\[None\]"):
            call()


def test_metric_learner_refuses_a_single_task_without_task_dimension():
    torch.manual_seed(0)
    learner = PrototypicalNetwork(nn.Linear(4, 3).double())
    x = torch.randn(6, 4, dtype=F64)
    y = torch.arange(3).repeat(2)
    with pytest.raises(ValueError, match=r"x\[None\]"):
        learner.meta_loss(x, y, x, y)
    assert learner.meta_loss(x[None], y[None], x[None], y[None]).dim() == 0


def test_integer_token_inputs_of_tasks_by_examples_are_still_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 3)).double()
    tokens = torch.randint(0, 11, (2, 5))
    labels = torch.randint(0, 3, (2, 5))
    loop = InnerLoop(model, None, F.cross_entropy, steps=1)
    loss = loop.meta_loss(tokens, labels, tokens, labels)
    assert torch.isfinite(loss)


# -- item 4: higher's override= ------------------------------------------------------------

def two_group_sgd(model: nn.Module) -> torch.optim.Optimizer:
    first, last = model[0], model[2]
    return torch.optim.SGD([{"params": first.parameters(), "lr": 0.1},
                            {"params": last.parameters(), "lr": 0.2, "weight_decay": 0.01}],
                           lr=0.1, momentum=0.9)


def override_run(library: str, per_group: bool, at_construction: bool):
    """Three inner steps with an lr tensor per step (and per group if asked), then the
    query loss's gradient with respect to θ and to every lr tensor."""
    model = mlp(3)
    g = torch.Generator().manual_seed(4)
    xs, xq = (torch.randn(6, 1, generator=g, dtype=F64) for _ in range(2))
    ys, yq = torch.sin(xs), torch.cos(xq)
    lrs = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (0.05, 0.07, 0.03, 0.11, 0.02, 0.04)]
    opt = two_group_sgd(model)
    first = {"lr": [lrs[4]]} if at_construction else None
    if library == "higher":
        context = higher.innerloop_ctx(model, opt, copy_initial_weights=False, override=first)
    else:
        context = diffopt.innerloop(model, opt, override=first)
    with context as (fmodel, dopt):
        for k in range(3):
            override = {"lr": [lrs[2 * k], lrs[2 * k + 1]] if per_group else [lrs[k]]}
            if at_construction and k == 0:
                override = None  # the construction-time override stays in effect
            dopt.step(F.mse_loss(fmodel(xs), ys), override=override)
        meta = F.mse_loss(fmodel(xq), yq)
    return torch.autograd.grad(meta, list(model.parameters()) + lrs, allow_unused=True)


@pytest.mark.parametrize("per_group", [False, True], ids=["one value", "one per group"])
@pytest.mark.parametrize("at_construction", [False, True], ids=["step", "innerloop"])
def test_override_matches_higher(per_group, at_construction):
    ours = override_run("diffopt", per_group, at_construction)
    theirs = override_run("higher", per_group, at_construction)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0, k
        else:
            close(f"override vs higher, tensor {k}", a, b)


def test_step_override_on_a_differentiable_optimizer_matches_a_hand_unrolled_sgd():
    torch.manual_seed(1)
    w0 = torch.randn(3, dtype=F64, requires_grad=True)
    a = torch.randn(5, 3, dtype=F64)
    b = torch.randn(5, dtype=F64)
    lrs = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (0.1, 0.3)]

    def loss(w):
        return ((a @ w - b) ** 2).mean()

    opt = diffopt.optim.SGD([w0], lr=0.5)
    (w,) = opt.step(loss(w0), override={"lr": [lrs[0]]})
    (w,) = opt.step(loss(w), override={"lr": [lrs[1]]})
    (w_again,) = opt.step(loss(w))  # the last override stays in effect, as in higher
    ours = torch.autograd.grad(loss(w_again), [w0, *lrs])

    r = w0 - lrs[0] * torch.autograd.grad(loss(w0), w0, create_graph=True)[0]
    r = r - lrs[1] * torch.autograd.grad(loss(r), r, create_graph=True)[0]
    r = r - lrs[1] * torch.autograd.grad(loss(r), r, create_graph=True)[0]
    reference = torch.autograd.grad(loss(r), [w0, *lrs])
    for k, (x, y) in enumerate(zip(ours, reference)):
        close(f"step(override) vs hand-written, tensor {k}", x, y)


def test_override_in_innerloop_leaves_the_callers_optimizer_alone():
    model = mlp()
    opt = diffopt.optim.SGD(model.parameters(), lr=0.1)
    lr = torch.tensor(0.3, dtype=F64, requires_grad=True)
    x = torch.randn(4, 1, dtype=F64)
    with diffopt.innerloop(model, opt) as (fmodel, inner):
        inner.step(F.mse_loss(fmodel(x), x), override={"lr": [lr]})
    assert opt.param_groups[0]["lr"] == 0.1


def test_override_errors_name_the_key_and_the_fix():
    model = mlp()
    opt = diffopt.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
    x = torch.randn(4, 1, dtype=F64)
    lr = torch.tensor(0.3, dtype=F64)
    with pytest.raises(ValueError, match="3 values but the optimizer has 2 parameter groups"):
        opt.step(F.mse_loss(model(x), x), override={"lr": [lr, lr, lr]})
    with pytest.raises(TypeError, match=r"did you mean 'momentum'"):
        opt.apply_override({"momentun": [0.9]})
    with pytest.raises(TypeError, match=r"wrap it, \[lr\]"):
        opt.apply_override({"lr": lr})
    with pytest.raises(ValueError, match="lr"):
        opt.apply_override({"lr": [-1.0]})


# -- item 6: NormalCG ------------------------------------------------------------------------

def batched_operator(matrices: torch.Tensor):
    """``A`` per task as the solvers see it: a list of one (T, n) tensor."""
    def apply(u):
        return [torch.einsum("tij,tj->ti", matrices, u[0])]
    return apply


def well_conditioned(tasks: int, n: int, seed: int, symmetric: bool, indefinite: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q1 = torch.linalg.qr(torch.randn(tasks, n, n, generator=g, dtype=F64))[0]
    q2 = q1 if symmetric else torch.linalg.qr(torch.randn(tasks, n, n, generator=g, dtype=F64))[0]
    s = torch.rand(tasks, n, generator=g, dtype=F64) * 1.5 + 0.5  # singular values in [0.5, 2]
    if indefinite:
        s = s * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(F64)
    return q1 @ torch.diag_embed(s) @ q2.transpose(1, 2)


@settings(max_examples=20)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 12), kind=st.sampled_from(["spd", "indefinite", "nonsymmetric"]))
def test_normal_cg_matches_a_dense_solve(seed, n, kind):
    from diffopt.unroll import NormalCG
    a = well_conditioned(3, n, seed, symmetric=kind != "nonsymmetric", indefinite=kind == "indefinite")
    b = torch.randn(3, n, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    apply_at = batched_operator(a.transpose(1, 2)) if kind == "nonsymmetric" else None
    (w,), info = NormalCG(iterations=10 * n + 10, tol=1e-14).solve(batched_operator(a), [b], apply_at)
    reference = torch.linalg.solve(a, b)
    error = float(((w - reference).abs() / reference.abs().clamp(min=1.0)).max())
    record("ports", f"NormalCG vs dense solve ({kind})", error)
    assert error <= 1e-10, error
    assert info.solver == "normal_cg" and info.converged


def test_normal_cg_solves_an_indefinite_system_where_cg_breaks_down():
    from diffopt.unroll import CG, NormalCG
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))[None]
    b = torch.ones(1, 2, dtype=F64)
    from diffopt.errors import LinearSolveWarning
    with pytest.warns(LinearSolveWarning, match="relative residual"):  # and says so
        _, plain = CG(iterations=50).solve(batched_operator(a), [b])
    (w,), normal = NormalCG(iterations=50).solve(batched_operator(a), [b])
    assert not plain.converged  # pᵀAp = 0 on the first direction: plain CG is stuck
    assert normal.converged and torch.allclose(w, torch.tensor([[1.0, -1.0]], dtype=F64), atol=1e-14, rtol=0)


def test_normal_cg_is_a_named_implicit_solver():
    loop = InnerLoop(mlp(), None, F.mse_loss, steps=2, mode="implicit", solver="normal_cg", solver_iterations=7)
    assert loop.mode.solver.name == "normal_cg" and loop.mode.solver.iterations == 7
    with pytest.raises(ValueError, match="did you mean 'normal_cg'"):
        InnerLoop(mlp(), None, F.mse_loss, steps=2, mode="implicit", solver="normal-cg")


def test_imaml_with_normal_cg_matches_torchopts_imaml_gradient():
    from peers import imaml_torchopt_gradient
    from diffopt.unroll import Implicit, NormalCG
    pytest.importorskip("torchopt")
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(6)
    xs, xq = torch.randn(2, 6, 4, generator=g, dtype=F64), torch.randn(2, 9, 4, generator=g, dtype=F64)
    ys, yq = torch.randint(0, 3, (2, 6), generator=g), torch.randint(0, 3, (2, 9), generator=g)
    steps, lam = 4, 2.0
    reference = imaml_torchopt_gradient(model, xs, ys, xq, yq, steps=steps, inner_lr=0.1, reg=lam, cg_iterations=5)
    loop = InnerLoop(model, diffopt.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, steps=steps,
                     mode=Implicit(NormalCG(iterations=5, tol=0.0)), proximal=lam)
    ours = torch.autograd.grad(loop.meta_loss(xs, ys, xq, yq), list(model.parameters()))
    for k, (a, b) in enumerate(zip(ours, reference)):
        close(f"iMAML normal_cg vs torchopt, tensor {k}", a, b)
    plain = InnerLoop(model, diffopt.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, steps=steps,
                      mode="implicit", solver="cg", solver_iterations=5, solver_tol=0.0, proximal=lam)
    cg = torch.autograd.grad(plain.meta_loss(xs, ys, xq, yq), list(model.parameters()))
    gap = max(float((a - b).abs().max()) for a, b in zip(cg, reference))
    record("ports", "iMAML cg (5 iterations) vs torchopt normal_cg", gap)


# -- item 3: learn2learn's API ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["lr", "first_order", "adaptation_steps"])
def test_diffopt_maml_names_its_own_argument_for_a_peer_name(name):
    with pytest.raises(TypeError, match=r"MAML: unknown argument .*did you mean (inner_lr|mode|inner_steps)"):
        MAML(mlp(), **{name: 0.01})


def test_diffopt_metasgd_points_lr_to_lr_init():
    from diffopt.algorithms import MetaSGD
    with pytest.raises(TypeError, match="MetaSGD: unknown argument 'lr'; did you mean lr_init"):
        MetaSGD(mlp(), lr=1.0)


def sine_tasks(count: int = 3, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        amplitude, phase = torch.rand(2, generator=g, dtype=F64) * torch.tensor([4.9, 3.14], dtype=F64) + 0.1
        x = torch.rand(20, 1, generator=g, dtype=F64) * 10 - 5
        y = amplitude * torch.sin(x - phase)
        out.append((x[::2], y[::2], x[1::2], y[1::2]))
    return out


def port_maml(maml, tasks, steps: int):
    total = 0.0
    for xs, ys, xq, yq in tasks:
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.mse_loss(learner(xs), ys))
        total = total + F.mse_loss(learner(xq), yq)
    return total / len(tasks)


@pytest.mark.parametrize("first_order", [False, True], ids=["second order", "first order"])
def test_learn2learn_maml_port_matches_hand_written_maml_update(first_order):
    import diffopt.ports.learn2learn as l2l
    model, tasks = mlp(2), sine_tasks()
    maml = l2l.algorithms.MAML(model, lr=0.05, first_order=first_order, allow_unused=True)
    ours = torch.autograd.grad(port_maml(maml, tasks, 3), list(maml.parameters()))
    reference = torch.autograd.grad(learn2learn_reference(model, tasks, 0.05, 3, first_order), list(model.parameters()))
    for k, (a, b) in enumerate(zip(ours, reference)):
        close(f"l2l MAML port ({'first' if first_order else 'second'} order) vs maml_update, tensor {k}", a, b)


def test_learn2learn_maml_port_equals_diffopts_batched_meta_loss():
    import diffopt.ports.learn2learn as l2l
    model, tasks = mlp(2), sine_tasks(4)
    ours = torch.autograd.grad(port_maml(l2l.algorithms.MAML(model, lr=0.05), tasks, 2), list(model.parameters()))
    xs, ys, xq, yq = (torch.stack(t) for t in zip(*tasks))
    batched = MAML(model, F.mse_loss, inner_lr=0.05, inner_steps=2).meta_loss(xs, ys, xq, yq)
    for k, (a, b) in enumerate(zip(ours, torch.autograd.grad(batched, list(model.parameters())))):
        close(f"l2l MAML port vs diffopt.algorithms.MAML.meta_loss, tensor {k}", a, b)


def test_learn2learn_metasgd_port_matches_hand_written_meta_sgd_update():
    import diffopt.ports.learn2learn as l2l
    model, tasks = mlp(4), sine_tasks()
    meta = l2l.algorithms.MetaSGD(model, lr=0.03)
    with torch.no_grad():
        for r in meta.lrs:
            r.mul_(torch.rand(r.shape, generator=torch.Generator().manual_seed(r.numel()), dtype=F64) + 0.5)
    assert len(list(meta.parameters())) == 2 * len(list(model.parameters()))
    ours = torch.autograd.grad(port_maml(meta, tasks, 2), list(meta.parameters()))
    reference = torch.autograd.grad(learn2learn_reference(model, tasks, None, 2, lrs=list(meta.lrs)),
                                    list(model.parameters()) + list(meta.lrs))
    for k, (a, b) in enumerate(zip(ours, reference)):
        close(f"l2l MetaSGD port vs meta_sgd_update, tensor {k}", a, b)


def test_learn2learn_port_allow_nograd_leaves_frozen_parameters_alone():
    import diffopt.ports.learn2learn as l2l
    model, tasks = mlp(5), sine_tasks(2)
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'0.weight' does not require grad; pass allow_nograd=True"):
        port_maml(l2l.algorithms.MAML(model, lr=0.05), tasks, 1)
    maml = l2l.algorithms.MAML(model, lr=0.05, allow_nograd=True)
    wanted = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(port_maml(maml, tasks, 2), wanted)
    reference = torch.autograd.grad(learn2learn_reference(model, tasks, 0.05, 2, frozen={"0.weight"}), wanted)
    for k, (a, b) in enumerate(zip(ours, reference)):
        close(f"l2l MAML port allow_nograd, tensor {k}", a, b)


def test_learn2learn_port_allow_unused_false_names_the_unused_parameter():
    import diffopt.ports.learn2learn as l2l

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = nn.Linear(1, 1).double(), nn.Linear(1, 1).double()

        def forward(self, x):
            return self.body(x)

    x = torch.randn(4, 1, dtype=F64)
    learner = l2l.algorithms.MAML(TwoHeads(), lr=0.1).clone()
    with pytest.raises(ValueError, match=r"'unused.weight'; pass allow_unused=True"):
        learner.adapt(F.mse_loss(learner(x), x))
    learner = l2l.algorithms.MAML(TwoHeads(), lr=0.1, allow_unused=True).clone()
    learner.adapt(F.mse_loss(learner(x), x))
    assert learner.module.unused.weight is learner.unused.weight  # unchanged, and reachable as in l2l


def test_learn2learn_port_submodules_and_rnns_use_the_fast_weights():
    import diffopt.ports.learn2learn as l2l
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(2, 3, batch_first=True).double()
            self.head = nn.Linear(3, 1).double()

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = Net()
    x, y = torch.randn(4, 5, 2, dtype=F64), torch.randn(4, 1, dtype=F64)
    learner = l2l.algorithms.MAML(model, lr=0.5).clone()
    learner.adapt(F.mse_loss(learner(x), y))
    names = [n for n, _ in learner.module.named_parameters()]
    fast = dict(zip(names, learner.module.parameters()))
    expected = torch.func.functional_call(model, fast, (x,))
    assert torch.equal(learner(x), expected)
    assert not torch.equal(learner(x), model(x))
    assert torch.equal(learner.module.head(learner.module.rnn(x)[0][:, -1]), expected)


def test_learn2learn_port_refuses_a_loss_computed_with_the_wrapped_model():
    import diffopt.ports.learn2learn as l2l
    model = mlp()
    maml = l2l.algorithms.MAML(model, lr=0.1)
    x = torch.randn(4, 1, dtype=F64)
    learner = maml.clone()
    learner.adapt(F.mse_loss(learner(x), x))
    with pytest.raises(ValueError, match=r"compute it with the clone, learner\(x\)"):
        learner.adapt(F.mse_loss(maml(x), x))  # θ, not the adapted weights


def test_learn2learn_port_errors_give_fixes_that_exist():
    """MetaSGD has no allow_nograd / allow_unused (nor has learn2learn's); a loss under no_grad gets
    loss_gradients' own advice, not the 'compute it with the clone' one; a NaN loss is an error."""
    import diffopt.ports.learn2learn as l2l
    x = torch.randn(4, 1, dtype=F64)
    model = mlp()
    model[0].bias.requires_grad_(False)
    learner = l2l.algorithms.MetaSGD(model, lr=0.1).clone()
    with pytest.raises(ValueError, match=r"'0.bias' does not require grad; MetaSGD adapts every parameter .*"
                                         r"MetaSGD\(model.head\)") as info:
        learner.adapt(F.mse_loss(learner(x), x))
    assert "pass allow_nograd" not in str(info.value)
    learner = l2l.algorithms.MAML(mlp(), lr=0.1).clone()
    with torch.no_grad():
        detached = F.mse_loss(learner(x), x)
    with pytest.raises(ValueError, match=r"do not compute the loss under torch.no_grad\(\)"):
        learner.adapt(detached)
    with pytest.raises(diffopt.optim.NonFiniteError, match="the loss is nan"):
        learner.adapt(F.mse_loss(learner(x), x) * float("nan"))


def test_custom_root_names_torchopts_signature_and_solvers():
    import torchopt
    from diffopt.implicit import custom_root

    def condition(x, lam):
        return x - lam

    for call in (lambda: custom_root(condition, 1), lambda: custom_root(condition, argnums=1)):
        with pytest.raises(TypeError, match=r"that is torchopt's signature. diffopt's follows jaxopt's.*drop argnums"):
            call()
    with pytest.raises(TypeError, match=r"a torchopt linear solver; .* solve_cg\(maxiter=n, rtol=r\) is "
                                        r"CG\(iterations=n, tol=r\)"):
        custom_root(condition, solve=torchopt.linear_solve.solve_cg())
