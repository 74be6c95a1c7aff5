"""Dtype conventions of torch.optim the twins follow (the defects recorded for issue 18).

* complex parameters are optimized as ``torch.view_as_real`` pairs (Adamax and Rprop
  crashed; Adam, Adagrad, RMSprop, ... silently squared complex numbers);
* a 0-dim float32 parameter with a float64 tensor lr stays float32, with torch's values;
* a tensor lr through which no derivative flows is used as torch uses it (``.item()``),
  bit for bit in float32 — and a forward-mode tangent on it still flows;
* float16 / bfloat16: the measured bound the README states.
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad

import diffopt
from strategies import F64, OPTIMIZER_NAMES

pytestmark = pytest.mark.usefixtures("single_thread")

ELEMENTWISE = OPTIMIZER_NAMES  # (Adafactor and Muon refuse complex parameters, as torch's do)


def run_both(name: str, init: list[torch.Tensor], loss, steps: int, twin_lr=0.01, torch_foreach=None,
             torch_options: dict | None = None, **options):
    """The twin's and torch.optim's weights after ``steps`` steps from ``init`` (and the twin). torch's lr
    is ``twin_lr``'s value (a number, or a tensor the twin differentiates through); ``options`` go to the
    twin, ``torch_options`` to torch."""
    torch_params = [p.clone().requires_grad_() for p in init]
    lr = float(twin_lr.detach()) if isinstance(twin_lr, torch.Tensor) else twin_lr
    torch_opt = getattr(torch.optim, name)(torch_params, lr=lr, foreach=torch_foreach, **(torch_options or {}))
    twin = getattr(diffopt.optim, name)([p.clone().requires_grad_() for p in init], lr=twin_lr, **options)
    current = list(twin.params)
    for _ in range(steps):
        torch_opt.zero_grad()
        loss(torch_params).backward()
        torch_opt.step()
        current = twin.step(loss(current), params=current)
    return current, torch_params, twin


def sgd_against_torch(init: list[torch.Tensor], loss, steps: int, foreach: bool, twin_lr, **options):
    """SGD with ``options`` for both, ``foreach`` for both: both final weights."""
    current, torch_params, _ = run_both("SGD", init, loss, steps, twin_lr, torch_foreach=foreach, torch_options=options,
                                        foreach=foreach, **options)
    return current, torch_params


@pytest.mark.parametrize("name", ELEMENTWISE)
@pytest.mark.parametrize("foreach", [True, False])
def test_complex_parameters_follow_torch(name, foreach):
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(3, 2, generator=g, dtype=torch.complex128), torch.randn(4, generator=g, dtype=F64)]

    def loss(ps):
        z, w = ps
        return (z.abs() ** 2).sum() + (z.real**3).sum() + (z.imag * z.real).sum() + (w * z.real.sum()).sum() ** 2

    ours, reference, twin = run_both(name, init, loss, 15, foreach=foreach)
    assert ours[0].dtype == torch.complex128
    for a, b in zip(ours, reference):
        assert (a.detach() - b.detach()).abs().max() <= 1e-12
    # the state keeps torch's layout (complex where torch's is complex)
    assert all(v.is_complex() for v in twin.state[0].values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    # meta-gradients flow through the real view
    lr = torch.tensor(0.01, dtype=F64, requires_grad=True)
    opt = getattr(diffopt.optim, name)([p.clone().requires_grad_() for p in init], lr=lr, foreach=foreach)
    current = list(opt.params)
    for _ in range(3):
        current = opt.step(loss(current))
    (grad,) = torch.autograd.grad(loss(current), lr)
    assert torch.isfinite(grad)


@pytest.mark.parametrize("foreach", [True, False])
def test_complex_adagrad_starts_both_parts_at_the_initial_accumulator(foreach):
    """torch.optim.Adagrad starts a complex parameter's sum at complex(v, v) (it had started at v + 0j)."""
    init = torch.tensor([1.0 + 2.0j, -0.5 + 0.3j], dtype=torch.complex128)
    reference = init.clone().requires_grad_()
    torch_opt = torch.optim.Adagrad([reference], lr=0.1, initial_accumulator_value=0.1)
    twin = diffopt.optim.Adagrad([init.clone()], lr=0.1, initial_accumulator_value=0.1, foreach=foreach)
    assert torch.equal(twin.state[0]["sum"], torch_opt.state[reference]["sum"])
    current = init.clone()
    for step in range(3):
        grad = torch.tensor([0.3 - 0.2j, 0.1 + 0.4j], dtype=torch.complex128) * (step + 1)
        reference.grad = grad.clone()
        torch_opt.step()
        (current,) = twin.step(params=[current], grads=[grad])
    assert (current - reference.detach()).abs().max() <= 1e-15


@pytest.mark.parametrize("name", [n for n in diffopt.optim.OPTIMIZERS if n != "Muon"])
@pytest.mark.parametrize("foreach", [True, False])
def test_0dim_float32_parameter_with_float64_tensor_lr_stays_float32(name, foreach):
    init = [torch.tensor(1.5), torch.randn(3, generator=torch.Generator().manual_seed(1))]

    def loss(ps):
        return ps[0] ** 2 + ps[0] ** 3 * 0.1 + (ps[1] * ps[0]).sum() + (ps[1] ** 2).sum()

    lr = torch.tensor(0.01, dtype=F64, requires_grad=True)
    ours, reference, _ = run_both(name, init, loss, 10, twin_lr=lr, foreach=foreach)
    assert [p.dtype for p in ours] == [torch.float32, torch.float32]
    # (a learnable lr multiplies as a tensor: float32 rounding, not bit-identity, is the reference here)
    assert all((a.detach() - b.detach()).abs().max() <= 1e-5 * max(1.0, float(b.abs().max()))
               for a, b in zip(ours, reference))


@pytest.mark.parametrize("name", [n for n in diffopt.optim.OPTIMIZERS if n != "Muon"])
def test_constant_tensor_lr_is_the_number_bit_for_bit_in_float32(name):
    """torch reads a tensor lr with ``.item()``; so does the twin when no derivative flows through it
    (it multiplied by the tensor before: last-bit differences, 7.6e-6 after 20 SGD steps)."""
    g = torch.Generator().manual_seed(2)
    init = [torch.randn(5, 3, generator=g), torch.randn(3, generator=g)]

    def loss(ps):
        return (torch.tanh(ps[0] @ ps[1]) ** 2).sum() + (ps[1] ** 3).sum()

    lr = torch.tensor(0.01)
    for foreach in (True, False):
        with_tensor, reference, _ = run_both(name, init, loss, 20, twin_lr=lr, foreach=foreach)
        with_number, _, _ = run_both(name, init, loss, 20, twin_lr=float(lr), foreach=foreach)
        assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(with_tensor, with_number)), foreach
        assert all((a.detach() - b.detach()).abs().max() <= 1e-5 for a, b in zip(with_tensor, reference))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("options", [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}])
def test_learnable_tensor_lr_sgd_is_torch_bit_for_bit(dtype, options):
    """A learnable lr takes torch.optim's ``addcmul`` (one rounding, as ``add(alpha=)``), not
    ``p + (-lr) * g``, which rounds the product first: the last bit differed for about 5% of elements."""
    g = torch.Generator().manual_seed(4)
    init = [torch.randn(40, 30, generator=g, dtype=dtype), torch.randn(30, generator=g, dtype=dtype)]

    def loss(ps):
        return ((torch.tanh(ps[0] @ ps[1]) - 0.5) ** 2).sum() + 0.1 * (ps[1] ** 2).sum()

    for foreach in (True, False):
        lr = torch.tensor(0.01, dtype=dtype, requires_grad=True)
        current, torch_params = sgd_against_torch(init, loss, 20, foreach, lr, **options)
        assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(current, torch_params)), foreach
        assert torch.autograd.grad(loss(current), lr)[0].isfinite()  # and the lr is on the graph


@pytest.mark.parametrize("name", ["SGD", "Adam", "NAdam", "Adafactor"])
def test_forward_mode_tangent_on_a_constant_lr_still_flows(name):
    """A dual lr does not require grad but carries a tangent: it must stay a tensor (the jvp equals
    the reverse-mode derivative)."""
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(4, 3, generator=g, dtype=F64)
    x = torch.randn(6, 3, generator=g, dtype=F64)

    def final_loss(lr):
        opt = getattr(diffopt.optim, name)([w0.clone().requires_grad_()], lr=lr)
        current = list(opt.params)
        for _ in range(4):
            current = opt.step((torch.tanh(x @ current[0].T) ** 2).sum())
        return (torch.tanh(x @ current[0].T) ** 2).sum()

    lr = torch.tensor(0.05, dtype=F64, requires_grad=True)
    (reverse,) = torch.autograd.grad(final_loss(lr), lr)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(torch.tensor(0.05, dtype=F64), torch.tensor(1.0, dtype=F64))
        with torch.enable_grad():
            tangent = forward_ad.unpack_dual(final_loss(dual)).tangent
    assert tangent is not None and abs(float(tangent) - float(reverse)) <= 1e-10 * max(1.0, abs(float(reverse)))


#: Measured worst |ours - torch| / max(1, |torch|) over 30 steps of a 3-tensor tanh MLP, every optimizer and path
#: (README, "Half precision"): the twins round after each elementwise operation; torch's fused CPU kernels
#: (addcdiv, addcmul, lerp, add with alpha) compute in float32 and round once.
HALF_BOUNDS = {torch.float16: 1e-3, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("dtype", list(HALF_BOUNDS))
def test_half_precision_stays_within_the_stated_bound(dtype):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
    w0 = [torch.randn(6, 8, generator=g) * 0.5, torch.randn(1, 6, generator=g) * 0.5, torch.randn(6, generator=g) * 0.1]

    def loss(ps):
        return ((torch.tanh(x.to(dtype) @ ps[0].T + ps[2]) @ ps[1].T - y.to(dtype)) ** 2).mean()

    worst = 0.0
    for name in diffopt.optim.OPTIMIZERS:
        if name == "Muon":
            continue
        for foreach in (True, False):
            ours, reference, _ = run_both(name, [w.to(dtype) for w in w0], loss, 30, foreach=foreach)
            assert all(p.dtype == dtype for p in ours)
            for a, b in zip(ours, reference):
                b = b.detach().float()
                worst = max(worst, float(((a.detach().float() - b).abs() / b.abs().clamp(min=1)).max()))
    assert worst <= HALF_BOUNDS[dtype]


@pytest.mark.parametrize(("dtype", "foreach"), [(torch.float32, True), (torch.float32, False),
                                                (torch.float16, False), (torch.bfloat16, False)])
def test_sgd_is_bit_identical_in_every_floating_dtype(dtype, foreach):
    """SGD's per-tensor step uses torch's ``add(alpha=)`` (one rounding), as torch's single-tensor SGD.

    (Not the multi-tensor path in half precision: torch's in-place ``_foreach_mul_`` rounds differently
    from the out-of-place ``_foreach_mul`` a differentiable step must use — 2e-3 apart on float16 data.)"""
    g = torch.Generator().manual_seed(5)
    init = [(torch.randn(6, 4, generator=g) * 0.5).to(dtype), (torch.randn(4, generator=g) * 0.1).to(dtype)]

    def loss(ps):
        return (torch.tanh(ps[0] @ ps[1]) ** 2).sum() + (ps[1] ** 3).sum()

    for options in ({"momentum": 0.9, "weight_decay": 0.01}, {"momentum": 0.5, "nesterov": True}, {"dampening": 0.1,
                                                                                                    "momentum": 0.3}):
        current, torch_params = sgd_against_torch(init, loss, 15, foreach, 0.05, **options)
        assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(current, torch_params)), options


@pytest.mark.parametrize("name", [n for n in diffopt.optim.OPTIMIZERS if n not in ("Muon", "LBFGS", "Adafactor")])
def test_per_element_lr_of_another_dtype_keeps_the_parameters_dtype(name):
    """A float64 per-element lr on a float32 weight had made SGD's weights float64 and failed inside
    Adam's lerp; it is rounded to float32 as a number or a 0-dim lr is: the run equals the one with the lr
    given in float32, bit for bit, and the float64 lr still gets its gradient."""
    g = torch.Generator().manual_seed(7)
    init = [torch.randn(4, 3, generator=g), torch.randn(3, generator=g)]
    rates = [torch.full((4, 3), 0.01, dtype=F64, requires_grad=True), torch.full((3,), 0.02, dtype=F64)]

    def loss(ps):
        return (torch.tanh(ps[0] @ ps[1]) ** 2).sum()

    def run(lrs):
        groups = [{"params": [p.clone().requires_grad_()], "lr": lr} for p, lr in zip(init, lrs)]
        opt = getattr(diffopt.optim, name)(groups)
        current = list(opt.params)
        for _ in range(3):
            current = opt.step(loss(current), params=current)
        return current

    ours = run(rates)
    assert [p.dtype for p in ours] == [torch.float32, torch.float32]
    same = run([r.detach().float() for r in rates])
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(ours, same))
    assert torch.autograd.grad(loss(ours), rates[0])[0].dtype == F64
