"""diffopt.unroll: bad input (checked by message), evaluation under ``torch.no_grad``, frozen
parameters in every mode, and memory behaviour as a structural test (saved tensors kept
alive by the graph, counted with ``torch.autograd.graph.saved_tensors_hooks``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffopt._measure import peak_tensor_bytes
from diffopt.optim import SGD, NonFiniteError, Schedule
from diffopt.unroll import InnerLoop
from test_unroll import single_threaded, F64, build, tasks  # noqa: F401 (the fixture)

ALL_MODES = ["second_order", "first_order", "truncated", "checkpointed", "implicit", "forward", "es", "pes"]
OPTIONS = {"truncated": {"truncate": 1}, "implicit": {"proximal": 1.0}, "es": {"es_samples": 2},
           "pes": {"es_samples": 2, "pes_truncation": 1}}


def loop_for(mode: str, model: nn.Module, **extra) -> InnerLoop:
    options = dict(OPTIONS.get(mode, {}))
    if mode in ("es", "pes"):
        options["generator"] = torch.Generator().manual_seed(0)
    options.update(extra)
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True) if mode == "forward" else 0.1  # (forward: d/d lr only)
    return InnerLoop(model, SGD(model.parameters(), lr=lr), steps=2, mode=mode, **options)


# =============================================================================================
# Bad input
# =============================================================================================

@pytest.mark.parametrize("vectorize", [False, True])
def test_support_and_query_with_different_task_counts(vectorize):
    loop = InnerLoop(build("mlp"), steps=1, vectorize=vectorize)
    sx, sy, qx, qy = tasks("mlp", 3, 0)
    with pytest.raises(ValueError, match="support has 3 tasks but query has 2"):
        loop.meta_loss(sx, sy, qx[:2], qy[:2])
    with pytest.raises(ValueError, match="support: inputs have 3 tasks but targets have 2"):
        loop.adapt(sx, sy[:2])
    with pytest.raises(ValueError, match="query: inputs have 3 tasks but targets have 1"):
        loop.meta_loss(sx, sy, qx, qy[:1])


@pytest.mark.parametrize("vectorize", [False, True])
def test_inputs_without_a_task_dimension(vectorize):
    loop = InnerLoop(build("mlp"), steps=1, vectorize=vectorize)
    sx, sy, qx, qy = tasks("mlp", 1, 0)
    with pytest.raises(ValueError, match=r"leading task dimension.*shape \(5,\).*unsqueeze\(0\)"):
        loop.adapt(sx[0, :, 0], sy[0, :, 0])
    with pytest.raises(TypeError, match="must be tensors"):
        loop.adapt(sx.tolist(), sy)


@pytest.mark.parametrize("vectorize", [False, True])
def test_loss_that_is_not_a_scalar_per_task(vectorize):
    model = build("mlp")
    loop = InnerLoop(model, loss_fn=lambda p, t: F.mse_loss(p, t, reduction="none"), steps=1, vectorize=vectorize)
    with pytest.raises(ValueError, match=r"scalar per task, got shape \(5, 1\) per task.*reduction='mean'"):
        loop.meta_loss(*tasks("mlp", 2, 0))



@pytest.mark.parametrize("transform", ["grad", "jvp", "vmap"])
def test_torch_func_transforms_are_refused_with_the_alternatives(transform):
    """The inner steps call torch.autograd, which torch.func transforms cannot trace: the entry point
    says so and names what works (before: torch's message about requires_grad_ or .item())."""
    loop = InnerLoop(build("mlp"), steps=1)
    sx, sy, qx, qy = tasks("mlp", 2, 0)

    def meta_loss(query_x: Tensor) -> Tensor:
        return loop.meta_loss(sx, sy, query_x, qy)

    call = {"grad": lambda: torch.func.grad(meta_loss)(qx),
            "jvp": lambda: torch.func.jvp(meta_loss, (qx,), (torch.ones_like(qx),)),
            "vmap": lambda: torch.func.vmap(meta_loss)(torch.stack([qx, qx]))}[transform]
    with pytest.raises(RuntimeError, match=r"InnerLoop.meta_loss was called inside a torch.func transform.*"
                                           r"\.backward\(\) or torch.autograd.grad.*mode='forward'"):
        call()
    # the supported routes: the reverse-mode gradient and the forward-mode derivative agree
    query = qx.clone().requires_grad_(True)
    (reverse,) = torch.autograd.grad(meta_loss(query), query)
    with torch.autograd.forward_ad.dual_level():
        tangent = torch.autograd.forward_ad.unpack_dual(
            meta_loss(torch.autograd.forward_ad.make_dual(qx, torch.ones_like(qx)))).tangent
    assert torch.allclose(reverse.sum(), tangent, rtol=1e-10, atol=0)

def test_unknown_mode_lists_the_valid_modes():
    with pytest.raises(ValueError, match="mode='maml' is not a mode; valid modes: second_order, first_order, "
                                         "truncated, checkpointed, implicit, forward, es, pes"):
        InnerLoop(build("mlp"), mode="maml")


def test_mode_options_are_validated():
    model = build("mlp")
    with pytest.raises(ValueError, match=r"mode='truncated' needs truncate=k with 0 <= k <= steps \(3\); got None"):
        InnerLoop(model, steps=3, mode="truncated")
    with pytest.raises(ValueError, match=r"needs truncate=k .*got 4"):
        InnerLoop(model, steps=3, mode="truncated", truncate=4)
    with pytest.raises(ValueError, match="segment must be a positive"):
        InnerLoop(model, steps=3, mode="checkpointed", segment=0)
    with pytest.raises(ValueError, match="solver='lu': choose one of 'cg', 'normal_cg', 'neumann', 'gmres', 'minres', 'dense'"):
        InnerLoop(model, mode="implicit", solver="lu")
    with pytest.raises(ValueError, match="pes_truncation must be a positive"):
        InnerLoop(model, mode="pes", pes_truncation=0)
    with pytest.raises(ValueError, match="es_samples must be >= 1 and es_sigma > 0"):
        InnerLoop(model, mode="es", es_sigma=0.0)
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        InnerLoop(model, steps=-1)


def test_optimizer_must_be_over_the_model_parameters():
    model = build("mlp")
    stranger = torch.zeros(3, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match=r"optimizer parameter 0 \(shape \(3,\)\) is not a parameter of the model"):
        InnerLoop(model, SGD([stranger], lr=0.1))
    with pytest.raises(TypeError, match="optimizer must be a diffopt.optim or torch.optim optimizer"):
        InnerLoop(model, optimizer="sgd")


def diverging_problem():
    """Task 1's inner loss overflows at the second step; task 0 stays finite."""
    model = nn.Linear(1, 1, bias=False).to(F64)
    with torch.no_grad():
        model.weight.fill_(1.0)
    sx = torch.tensor([[[1e-3]], [[1e3]]], dtype=F64)
    sy = torch.full((2, 1, 1), 0.5, dtype=F64)
    return model, sx, sy


@pytest.mark.parametrize("mode", ["second_order", "checkpointed", "forward", "es"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_non_finite_inner_loss_names_the_task_and_step(mode, vectorize):
    model, sx, sy = diverging_problem()
    lr = torch.tensor(1e155, dtype=F64, requires_grad=True) if mode == "forward" else 1e155  # (forward: d/d lr)
    loop = InnerLoop(model, SGD(model.parameters(), lr=lr), steps=3, mode=mode, vectorize=vectorize,
                     es_samples=1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteError, match=r"inner loss is not finite for task\(s\) \[1\] at inner step 1"):
        loop.meta_loss(sx, sy, sx, sy)
    # without the check the NaN/inf propagates silently
    loop = InnerLoop(model, SGD(model.parameters(), lr=1e155), steps=3, vectorize=vectorize, check_finite=False)
    assert not torch.isfinite(loop.meta_loss(sx, sy, sx, sy))


@pytest.mark.parametrize("vectorize", [False, True])
def test_non_finite_inner_gradient_names_the_parameter_task_and_step(vectorize):
    """sqrt of a loss that is exactly zero for task 1: the loss is finite, its gradient is not."""
    model = nn.Linear(2, 1).to(F64)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    sx = torch.randn(2, 4, 2, dtype=F64)
    sy = torch.stack([torch.ones(4, 1, dtype=F64), torch.zeros(4, 1, dtype=F64)])
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.1), lambda p, t: F.mse_loss(p, t).sqrt(), steps=2,
                     vectorize=vectorize)
    with pytest.raises(NonFiniteError, match=r"inner gradient of weight is not finite for task\(s\) \[1\] at "
                                             r"inner step 0"):
        loop.adapt(sx, sy)


# =============================================================================================
# Evaluation under torch.no_grad, frozen parameters
# =============================================================================================

@pytest.mark.parametrize("mode", ALL_MODES)
def test_meta_loss_under_no_grad_adapts_the_same(mode):
    """Regression: under torch.no_grad the carry did not require grad, the inner gradients came
    back empty and the inner loop silently took no step at all."""
    model = build("mlp", 1)
    data = tasks("mlp", 2, 2)
    value = loop_for(mode, model).meta_loss(*data).detach()
    with torch.no_grad():
        evaluated = loop_for(mode, model).meta_loss(*data)
        adapted = loop_for(mode, model).adapt(*data[:2])
    assert torch.equal(value, evaluated)
    moved = adapted.params[0] - model.body.weight.detach()
    assert float(moved.abs().max()) > 1e-3
    with torch.no_grad():
        start = InnerLoop(model, SGD(model.parameters(), lr=0.1), steps=0).meta_loss(*data)
    assert float((value - start).abs()) > 1e-6


def test_forward_mode_with_nothing_to_differentiate_is_refused_with_the_fix():
    """The meta-loss had silently carried no meta-gradient (.backward() then failed in torch's words);
    adaptation and evaluation under no_grad need no tangent and still run."""
    model = build("mlp", 1)
    data = tasks("mlp", 2, 2)
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.1), steps=2, mode="forward")
    with pytest.raises(ValueError, match=r"mode='forward': nothing to differentiate.*lr=torch.tensor\(0.1, "
                                         r"requires_grad=True\)\) or Forward\(wrt=\[\.\.\.\]\)"):
        loop.meta_loss(*data)
    with torch.no_grad():
        assert torch.isfinite(loop.meta_loss(*data))
    assert loop.adapt(*data[:2]).params[0].shape[0] == 2


@pytest.mark.parametrize("mode", ALL_MODES)
def test_frozen_parameters_stay_put_in_every_mode(mode):
    """A parameter with requires_grad=False in the inner optimizer is neither updated nor given
    a meta-gradient, as torch.optim skips it (regression: second order raised, the graph-free
    modes updated it)."""
    model = build("frozen", 3)
    data = tasks("frozen", 2, 4)
    loop = loop_for(mode, model, forward_wrt=[model.head.weight])
    adapted = loop.adapt(*data[:2])
    assert torch.equal(adapted.params[0], model.body.weight.expand(2, 4, 2))
    assert float((adapted.params[1] - model.body.bias).detach().abs().max()) > 0
    loop.meta_loss(*data).backward()
    assert model.body.weight.grad is None


# =============================================================================================
# Memory: tensors the graph of the meta-loss keeps alive before backward
# =============================================================================================
# Counted by walking the autograd graph from the meta-loss: every node's saved tensors
# (``_saved_*``), and for custom Functions ``ctx.saved_tensors`` and tensors held in ctx
# attributes (forward mode keeps its tangents there), as unique storages. (Counting boxes
# created by ``saved_tensors_hooks`` overcounts: a box holding a saved *output* forms a
# cycle through the output's grad_fn that Python's collector cannot see, so boxes outlive
# their graph.)

def _tensors_in(value, depth: int = 0):
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)) and depth < 3:
        for v in value:
            yield from _tensors_in(v, depth + 1)


def graph_memory(loss: Tensor) -> tuple[int, int]:
    """(number, bytes) of distinct storages held by the graph behind ``loss``."""
    seen, storages, stack = set(), {}, [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found = []
        for name in dir(node):
            if name.startswith("_saved_"):
                found.extend(_tensors_in(getattr(node, name)))
        if hasattr(node, "saved_tensors"):  # a custom Function's ctx
            found.extend(_tensors_in(tuple(node.saved_tensors)))
            found.extend(t for value in vars(node).values() for t in _tensors_in(value))
        for t in found:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        stack.extend(f for f, _ in node.next_functions)
    return len(storages), sum(storages.values())


def measure(steps: int, **options) -> tuple[int, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 1)).to(F64)
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    loop = InnerLoop(model, SGD(model.parameters(), lr=lr), steps=steps, **options)
    loss = loop.meta_loss(*tasks("mlp", 4, 8))
    held = graph_memory(loss)
    loss.backward()
    return held


def test_checkpointed_keeps_fewer_tensors_than_second_order():
    full, half = measure(16), measure(8)
    checkpointed = measure(16, mode="checkpointed", segment=4)
    assert full[1] > 1.8 * half[1]  # second order: linear in K
    # Bytes: 4.6x fewer. Storages: 3.7x (28 vs 103): the multi-tensor SGD step saves fewer
    # distinct storages per step than the per-tensor one did (103 against 168 for K=16).
    assert checkpointed[1] * 4 < full[1] and checkpointed[0] * 3 < full[0], (checkpointed, full)
    # checkpointing holds one carry per segment: K / segment of them
    assert measure(16, mode="checkpointed", segment=2)[1] > 1.5 * checkpointed[1]


def test_forward_truncated_and_implicit_memory_does_not_grow_with_steps():
    for options in ({"mode": "forward"}, {"mode": "truncated", "truncate": 2},
                    {"mode": "implicit", "proximal": 1.0}):
        assert measure(4, **options) == measure(16, **options), options
    assert measure(16)[1] > 5 * measure(16, mode="forward")[1]


def test_inputs_that_used_to_give_nan_or_wrong_results_are_refused():
    """#17 item 8: each of these ran and gave NaN, a silently wrong result or a failure deep in vmap."""
    model = build("mlp")
    sx, sy, qx, qy = tasks("mlp", 2, 4, support=4, query=4)
    with pytest.raises(ValueError, match="support: got 0 tasks"):
        InnerLoop(model).meta_loss(sx[:0], sy[:0], qx[:0], qy[:0])
    for vectorize in (True, False):  # 0 examples: a ZeroDivisionError, a NaN error blaming the lr, or a NaN meta-loss
        with pytest.raises(ValueError, match=r"support: got 0 examples per task \(inputs \(2, 0"):
            InnerLoop(model, vectorize=vectorize).meta_loss(sx[:, :0], sy[:, :0], qx, qy)
        with pytest.raises(ValueError, match=r"query: got 0 examples per task"):
            InnerLoop(model, vectorize=vectorize).meta_loss(sx, sy, qx[:, :0], qy[:, :0])
    with pytest.raises(ValueError, match=r"proximal .* must be a finite number >= 0, got -1.0"):
        InnerLoop(model, proximal=-1.0)
    with pytest.raises(ValueError, match=r"iterations \(InnerLoop's solver_iterations=\) must be a positive"):
        InnerLoop(model, mode="implicit", solver_iterations=0)
    with pytest.raises(ValueError, match="steps must be a non-negative integer, got True"):
        InnerLoop(model, steps=True)
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        InnerLoop(model, loss_fn="mse")
    negative = SGD(model.parameters(), lr=Schedule(lambda step: 0.1 - 0.1 * step))
    with pytest.raises(ValueError, match=r"its Schedule returned -0.1 at step 2"):
        InnerLoop(model, negative, steps=3).meta_loss(sx, sy, qx, qy)
    for vectorize in (False, True):
        with pytest.raises(ValueError, match=r"output per task has shape \(4, 1\) but the targets \(4,\)"):
            InnerLoop(model, vectorize=vectorize).meta_loss(sx, sy[..., 0], qx, qy[..., 0])


def test_parameters_on_the_meta_device_run_without_the_finiteness_check_failing():
    model = torch.nn.Linear(2, 1, device="meta")
    x, y = torch.empty(3, 4, 2, device="meta"), torch.empty(3, 4, 1, device="meta")
    loss = InnerLoop(model, vectorize=False, steps=2).meta_loss(x, y, x, y)
    assert loss.is_meta and loss.shape == ()


def test_checkpointed_default_segment_is_the_square_root_of_the_steps():
    """Without ``segment`` the graph holds one carry per segment of ⌈√K⌉ steps (README: memory
    "about √K"): exactly what an explicit segment of ⌈√K⌉ holds, and not what K (no
    checkpointing: one carry) or 1 (a carry per step) would hold."""
    for steps, root in ((16, 4), (10, 4), (25, 5)):
        default = measure(steps, mode="checkpointed")
        assert default == measure(steps, mode="checkpointed", segment=root), steps
        assert default[1] > measure(steps, mode="checkpointed", segment=steps)[1], steps
        assert default[1] < measure(steps, mode="checkpointed", segment=1)[1], steps


def peak_bytes(steps: int, **options) -> int:
    """Peak of the CPU tensor memory allocated by one meta-loss and its backward pass (after a
    warm-up), measured as the benchmarks measure it (``diffopt._measure.peak_tensor_bytes``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 1)).to(F64)
    loop = InnerLoop(model, SGD(model.parameters(), lr=0.1), steps=steps, **options)
    data = tasks("mlp", 4, 8)
    loop.meta_loss(*data).backward()
    return peak_tensor_bytes(lambda: loop.meta_loss(*data).backward())[1]


def test_checkpointed_default_segment_peak_memory_is_far_below_second_order():
    """The peak over forward and backward (held carries plus one recomputed segment's graph).
    Measured for K=16 (bytes): segment 1: 300k, 2: 231k, 4: 253k, 8: 376k, 16: 662k; second
    order 646k; the default 253k, the same as segment 4 (identical allocations)."""
    default, second_order = peak_bytes(16, mode="checkpointed"), peak_bytes(16)
    assert default < 0.5 * second_order, (default, second_order)
    assert abs(default - peak_bytes(16, mode="checkpointed", segment=4)) <= 0.02 * default
    assert peak_bytes(16, mode="checkpointed", segment=16) > 2 * default  # no checkpointing: as second order


def test_predict_checks_its_inputs_like_the_other_entry_points():
    model = build("mlp")
    sx, sy, qx, qy = tasks("mlp", 2, 4, support=4, query=4)
    loop = InnerLoop(model)
    adapted = loop.adapt(sx, sy)
    assert loop.predict(adapted, qx).shape[:2] == qx.shape[:2]
    with pytest.raises(ValueError, match=r"predict: inputs need the adapted tasks' leading dimension \(2\)"):
        loop.predict(adapted, qx[:1])
    with pytest.raises(ValueError, match="predict: floating-point inputs of shape .* have no example dimension"):
        loop.predict(adapted, qx[:, 0])


@pytest.mark.parametrize("mode", ["checkpointed", "implicit"])
def test_an_undeclared_tensor_the_inner_loss_depends_on_is_refused(mode):
    """Checkpointed and implicit modes route meta-gradients only to declared tensors: a tensor the
    loss closes over without being in meta_parameters lost its inner-loop gradient silently (found by
    review: 5% off in checkpointed mode). Now it is refused; declared, it gets second order's gradient."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(F64)
    sx, sy, qx, qy = (torch.randn(2, n, d, dtype=F64) for n, d in ((5, 3), (5, 2), (6, 3), (6, 2)))
    w = torch.tensor([0.3, -0.2], dtype=F64, requires_grad=True)  # say, a learned loss's weights

    def loss_fn(prediction: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(prediction, target) + (w * prediction).pow(2).mean()

    def gradient(mode: str, declared: tuple) -> Tensor:
        options = {"proximal": 1.0} if mode == "implicit" else {}
        loop = InnerLoop(model, SGD(model.parameters(), lr=0.2), loss_fn, steps=3, mode=mode,
                         meta_parameters=declared, **options)
        return torch.autograd.grad(loop.meta_loss(sx, sy, qx, qy), w)[0]

    with pytest.raises(ValueError, match=r"depends on 1 tensor\(s\) that require grad but are not declared "
                                         r"\(shapes \(2,\).*meta_parameters=\[\.\.\.\]"):
        gradient(mode, ())
    if mode == "checkpointed":
        assert torch.allclose(gradient(mode, (w,)), gradient("second_order", ()), rtol=1e-10, atol=1e-14)
    else:
        gradient(mode, (w,))  # declared, it runs (its value: the closed-form tests of implicit mode)


@pytest.mark.parametrize("vectorize", ["vmap", True, False])
@pytest.mark.parametrize("which", ["support", "query"])
def test_inputs_that_do_not_fit_the_model_are_named_on_every_path(vectorize, which):
    """Inputs of the wrong feature size used to be reported as a vmap failure of the model (with the
    advice to use vectorize=False, which fails too) or as a raw baddbmm error (review)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    data = {name: torch.randn(3, n, d, dtype=F64) for name, n, d in
            (("sx", 5, 3), ("sy", 5, 2), ("qx", 6, 3), ("qy", 6, 2))}
    data["sx" if which == "support" else "qx"] = torch.randn(3, 5 if which == "support" else 6, 2, dtype=F64)
    loop = InnerLoop(model, steps=1, vectorize=vectorize)
    shape = r"\(3, 5, 2\)" if which == "support" else r"\(3, 6, 2\)"
    with pytest.raises(RuntimeError, match=rf"the model's forward failed on the {which} inputs of shape {shape}.*"
                                           rf"first task alone as well.*Check that the {which} inputs"):
        loop.meta_loss(data["sx"], data["sy"], data["qx"], data["qy"])


def test_implicit_mode_without_proximal_warns_that_the_initialisation_gets_no_meta_gradient():
    """By the implicit function theorem the solution of the inner loss alone does not depend on θ:
    ``weight.grad`` silently stayed None (review). The loop says so when it is built."""
    model = build("mlp")
    with pytest.warns(UserWarning, match=r"mode='implicit'\) without proximal=.*initialisation gets no "
                                         r"meta-gradient.*proximal=λ \(iMAML\)"):
        InnerLoop(model, steps=2, mode="implicit")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        InnerLoop(model, steps=2, mode="implicit", proximal=1.0)


def test_an_inner_optimizer_holding_only_frozen_parameters_is_refused():
    """Frozen parameters stay put (torch.optim's semantics), so an inner optimizer holding only frozen
    ones had run K steps that adapted nothing, silently (a meta-loss equal to K = 0's); a peft model's
    select_parameters(model, 'head') is such a set (the head tied to the frozen embeddings)."""
    from diffopt.unroll import select_parameters

    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    model[1].requires_grad_(False)
    sx, sy = torch.randn(2, 4, 2), torch.randn(2, 4, 1)
    loop = InnerLoop(model, SGD(model[1].parameters(), lr=0.1), F.mse_loss, steps=2)
    for call in (lambda: loop.meta_loss(sx, sy, sx, sy), lambda: loop.adapt(sx, sy)):
        with pytest.raises(ValueError, match=r"InnerLoop\.\w+: every parameter the inner optimizer holds \(2\) is "
                                             r"frozen .* would adapt nothing"):
            call()
    InnerLoop(model, SGD(model[1].parameters(), lr=0.1), F.mse_loss, steps=0).meta_loss(sx, sy, sx, sy)  # K = 0
    loop = InnerLoop(model, SGD(select_parameters(model, "head"), lr=0.1), F.mse_loss, steps=1)
    with pytest.raises(ValueError, match="is frozen"):
        loop.meta_loss(sx, sy, sx, sy)
