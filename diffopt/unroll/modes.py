"""How each mode turns the inner loop into something differentiable.

Reverse modes build (part of) the autograd graph of the unroll; checkpointed,
implicit and forward modes wrap the unroll in ``torch.autograd.Function``s
whose backward passes recompute segments, solve the implicit linear system,
or contract stored forward tangents; ES and PES wrap the meta-loss in a
Function whose backward returns their estimate.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .carry import Carry, detached, flatten, unflatten
from .solvers import conjugate_gradient, neumann

if TYPE_CHECKING:  # pragma: no cover
    from .engine import InnerLoop, LossFn


def adapt(loop: InnerLoop, carry: Carry, x: Tensor, y: Tensor, info: dict[str, Any]) -> Carry:
    mode, steps = loop.mode, loop.steps
    if mode == "second_order":
        return loop.run(carry, steps, x, y, "full")
    if mode == "first_order":
        return loop.run(carry, steps, x, y, "first_order")
    if mode == "truncated":
        return truncated(loop, carry, x, y, loop.truncate, info)
    if mode == "checkpointed":
        return checkpointed(loop, carry, x, y, info)
    if mode == "implicit":
        return implicit(loop, carry, x, y, info)
    if mode == "forward":
        return forward_mode(loop, carry, x, y, info)
    # es / pes: the adapted weights themselves carry no gradient.
    return loop.run(carry, steps, x, y, "none")


# -- truncated -----------------------------------------------------------------------
def truncated(loop: InnerLoop, carry: Carry, x: Tensor, y: Tensor, window: int, info: dict[str, Any]) -> Carry:
    """Run K − k steps without a graph, reconnect as θ + stopgrad(φ − θ), then k full steps."""
    info["truncate"] = window
    start = carry
    early = loop.run(carry, loop.steps - window, x, y, "none")
    params = [
        s + (e - s).detach() if adapted else s for s, e, adapted in zip(start.params, early.params, loop.adapted_mask)
    ]
    carry = Carry(params, early.states, early.buffers, early.step)
    return loop.run(carry, window, x, y, "full")


# -- checkpointed --------------------------------------------------------------------
class _Segment(torch.autograd.Function):
    """``length`` inner steps: forward without a graph, backward by recomputation."""

    @staticmethod
    def forward(ctx: Any, loop: Any, skeleton: Any, length: int, holder: list[Any], x: Tensor, y: Tensor, *tensors: Tensor) -> Any:
        n_carry = holder[0]
        ctx.loop, ctx.skeleton, ctx.length, ctx.n_carry = loop, skeleton, length, n_carry
        ctx.rng_state = torch.get_rng_state()
        ctx.save_for_backward(x, y, *tensors)
        with torch.enable_grad():
            carry = unflatten(list(tensors[:n_carry]), skeleton)
            out = loop.run(carry, length, x, y, "none")
        out_tensors, out_skeleton = flatten(out)
        holder.append(out_skeleton)
        ctx.mark_non_differentiable(*out_tensors[len(out_tensors) - len(out.buffers):])
        return tuple(out_tensors)

    @staticmethod
    def backward(ctx: Any, *grad_out: Tensor) -> Any:
        x, y, *tensors = ctx.saved_tensors
        carry_in, meta = tensors[: ctx.n_carry], tensors[ctx.n_carry:]
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in carry_in]
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.set_rng_state(ctx.rng_state)
            out = ctx.loop.run(unflatten(leaves, ctx.skeleton), ctx.length, x, y, "full")
            outputs, _ = flatten(out)
            pairs = [(o, g) for o, g in zip(outputs, grad_out) if g is not None and o.requires_grad]
            data = [x, y]  # inputs may depend on meta-parameters (e.g. ANIL's features)
            targets = [t for t in leaves if t.requires_grad] + [m for m in meta + data if m.requires_grad]
            grads = torch.autograd.grad(
                [o for o, _ in pairs], targets, [g for _, g in pairs], allow_unused=True
            ) if pairs and targets else [None] * len(targets)
        it = iter(grads)
        carry_grads = [next(it) if t.requires_grad else None for t in leaves]
        meta_grads = [next(it) if m.requires_grad else None for m in meta]
        x_grad, y_grad = (next(it) if d.requires_grad else None for d in data)
        return (None, None, None, None, x_grad, y_grad, *carry_grads, *meta_grads)


def checkpointed(loop: InnerLoop, carry: Carry, x: Tensor, y: Tensor, info: dict[str, Any]) -> Carry:
    from .engine import default_segment

    segment = loop.segment or default_segment(loop.steps)
    info["segment"] = segment
    meta = loop.meta_tensors()
    done = 0
    while done < loop.steps:
        length = min(segment, loop.steps - done)
        tensors, skeleton = flatten(carry)
        holder: list[Any] = [len(tensors)]
        out = _Segment.apply(loop, skeleton, length, holder, x, y, *tensors, *meta)
        carry = unflatten(list(out), holder[1])
        done += length
    return carry


# -- implicit ------------------------------------------------------------------------
class _ImplicitSolution(torch.autograd.Function):
    """Forward: the inner solution φ*. Backward: implicit-function-theorem VJP."""

    @staticmethod
    def forward(ctx: Any, loop: Any, final: Carry, x: Tensor, y: Tensor, *meta: Tensor) -> Any:
        ctx.loop, ctx.final = loop, final
        ctx.save_for_backward(x, y, *meta)
        return tuple(final.params[j].detach() for j in loop.positions)

    @staticmethod
    def backward(ctx: Any, *v: Tensor) -> Any:
        loop, final = ctx.loop, ctx.final
        x, y, *meta = ctx.saved_tensors
        v = [torch.zeros_like(final.params[j]) if g is None else g for g, j in zip(v, loop.positions)]
        with torch.enable_grad():
            params = list(final.params)
            phi = [params[j].detach().requires_grad_() for j in loop.positions]
            for j, p in zip(loop.positions, phi):
                params[j] = p
            carry = Carry(params, final.states, [b.clone() for b in final.buffers], final.step)
            losses, _ = loop.inner_objective(carry, x, y)
            grad = torch.autograd.grad(losses.sum(), phi, create_graph=True)

            def hessian_vector(u: list[Tensor]) -> list[Tensor]:
                hv = torch.autograd.grad(grad, phi, u, retain_graph=True, allow_unused=True)
                return [
                    (torch.zeros_like(ui) if h is None else h) + loop.damping * ui for h, ui in zip(hv, u)
                ]

            if loop.solver == "cg":
                w, solve = conjugate_gradient(hessian_vector, v, loop.solver_iterations, loop.solver_tol)
            else:
                w, solve = neumann(hessian_vector, v, loop.solver_iterations, loop.neumann_alpha, loop.solver_tol)
            loop.last_info["solve"] = solve
            data = [x, y]  # inputs may depend on meta-parameters (e.g. ANIL's features)
            wanted = [m for m in list(meta) + data if m.requires_grad]
            mixed = torch.autograd.grad(grad, wanted, w, allow_unused=True) if wanted else []
        it = iter(mixed)
        grads = [(None if (g := next(it)) is None else -g) if m.requires_grad else None for m in list(meta) + data]
        meta_grads, (x_grad, y_grad) = grads[: len(meta)], grads[len(meta):]
        return (None, None, x_grad, y_grad, *meta_grads)


def implicit(loop: InnerLoop, carry: Carry, x: Tensor, y: Tensor, info: dict[str, Any]) -> Carry:
    """Solve the inner problem without a graph, then attach the implicit hypergradient.

    With inner objective G(φ, λ) stationary at φ*, dφ*/dλ = −(∂²G/∂φ²)⁻¹ ∂²G/∂φ∂λ, so
    for an outer gradient v = ∂L/∂φ*: ∂L/∂λ = −(∂²G/∂λ∂φ)ᵀ w with (∂²G/∂φ² + damping) w = v.
    For iMAML (proximal λ/2||φ−θ||²) this is ∂L/∂θ = λ w = (I + H/λ)⁻¹ v.
    Parameters the optimizer does not adapt act as hyperparameters of the inner problem.
    """
    final = loop.run(carry, loop.steps, x, y, "none")
    shared = [loop.theta[j] for j in range(len(loop.theta)) if not loop.adapted_mask[j]]
    meta = _unique(loop.meta_tensors() + [t for t in shared if t.requires_grad])
    for j in range(len(loop.theta)):
        if not loop.adapted_mask[j]:
            final.params[j] = loop.theta[j]
    solution = _ImplicitSolution.apply(loop, final, x, y, *meta)
    params = list(final.params)
    for j, p in zip(loop.positions, solution):
        params[j] = p
    info["solver"] = loop.solver
    return Carry(params, final.states, final.buffers, final.step)


def _unique(tensors: list[Tensor]) -> list[Tensor]:
    seen: dict[int, Tensor] = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return list(seen.values())


# -- forward mode --------------------------------------------------------------------
class _ForwardSolution(torch.autograd.Function):
    """Forward: the final weights. Backward: contract v with the stored tangents."""

    @staticmethod
    def forward(ctx: Any, tangents: list[list[Tensor]], finals: list[Tensor], shapes: list[torch.Size], *wrt: Tensor) -> Any:
        ctx.tangents, ctx.shapes, ctx.wrt_meta = tangents, shapes, [(w.dtype, w.device) for w in wrt]
        return tuple(f.detach() for f in finals)

    @staticmethod
    def backward(ctx: Any, *v: Tensor) -> Any:
        values = []
        for direction in ctx.tangents:
            total = 0.0
            for g, tangent in zip(v, direction):
                if g is not None and tangent is not None:
                    total = total + (g * tangent).sum()
            values.append(total)
        grads, k = [], 0
        for shape, (dtype, device) in zip(ctx.shapes, ctx.wrt_meta):
            n = math.prod(shape)
            flat = torch.stack([torch.as_tensor(t, dtype=dtype, device=device) for t in values[k:k + n]])
            grads.append(flat.reshape(shape))
            k += n
        return (None, None, None, *grads)


def forward_mode(loop: InnerLoop, carry: Carry, x: Tensor, y: Tensor, info: dict[str, Any]) -> Carry:
    """Propagate tangents d(carry)/dh for every scalar entry h of ``forward_wrt``.

    Each step's Jacobian-vector product is taken with the double-VJP identity
    ``Jv = ∂/∂u ⟨Jᵀu, v⟩`` on that step's graph alone, so memory does not grow
    with K (it grows with the number of directions). The model's parameters
    receive gradients only if listed in ``forward_wrt``.
    """
    wrt = list(loop.forward_wrt) if loop.forward_wrt is not None else loop.optimizer.hyperparameter_tensors()
    wrt = _unique([w for w in wrt if w.requires_grad])
    info["forward_directions"] = sum(w.numel() for w in wrt)
    theta_index = {id(t): j for j, t in enumerate(loop.theta)}
    hyper = [w for w in wrt if id(w) not in theta_index]
    theta_inputs = [t.detach().requires_grad_() for t in loop.theta]  # θ as it enters the proximal term
    constants = hyper + theta_inputs  # sources whose tangent is fixed per direction

    current = detached(carry)
    n_carry = len(flatten(current)[0])
    directions: list[list[Tensor | None]] = []   # tangent of every carry tensor
    fixed: list[list[Tensor | None]] = []        # tangent of every constant source
    for w in wrt:
        for e in range(w.numel()):
            one_hot = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
            one_hot[e] = 1
            one_hot = one_hot.reshape(w.shape)
            carry_tangent: list[Tensor | None] = [None] * n_carry
            constant_tangent: list[Tensor | None] = [one_hot if c is w else None for c in hyper]
            constant_tangent += [None] * len(theta_inputs)
            if id(w) in theta_index:
                j = theta_index[id(w)]
                carry_tangent[j] = one_hot.expand_as(current.params[j]).clone() if loop.adapted_mask[j] else one_hot
                constant_tangent[len(hyper) + j] = one_hot
            directions.append(carry_tangent)
            fixed.append(constant_tangent)

    for _ in range(loop.steps):
        inputs = detached(current, requires_grad=True)
        in_tensors, _ = flatten(inputs)
        with torch.enable_grad():
            out = loop.step(inputs, x, y, "full", theta=theta_inputs)
            out_tensors, out_skeleton = flatten(out)
            live = [k for k, o in enumerate(out_tensors) if o.requires_grad]
            differentiable = [k for k, t in enumerate(in_tensors) if t.requires_grad]
            sources = [in_tensors[k] for k in differentiable] + constants
            dummies = [torch.zeros_like(out_tensors[k], requires_grad=True) for k in live]
            vjp = torch.autograd.grad([out_tensors[k] for k in live], sources, dummies, create_graph=True,
                                      allow_unused=True)
            new_directions = []
            for carry_tangent, constant_tangent in zip(directions, fixed):
                source_tangents = [carry_tangent[k] for k in differentiable] + constant_tangent
                pairs = [(g, t) for g, t in zip(vjp, source_tangents) if g is not None and t is not None]
                new: list[Tensor | None] = [None] * len(out_tensors)
                if pairs:
                    jvp = torch.autograd.grad([g for g, _ in pairs], dummies, [t for _, t in pairs],
                                              retain_graph=True, allow_unused=True)
                    for k, value in zip(live, jvp):
                        new[k] = None if value is None else value.detach()
                new_directions.append(new)
        directions = new_directions
        current = detached(unflatten(out_tensors, out_skeleton))
    finals = list(current.params)
    param_tangents = [d[: len(finals)] for d in directions]
    outputs = _ForwardSolution.apply(param_tangents, finals, [w.shape for w in wrt], *wrt)
    return Carry(list(outputs), current.states, current.buffers, current.step)


# -- evolution strategies ----------------------------------------------------------------
class _EstimatedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, value: Tensor, estimates: list[Tensor], *wrt: Tensor) -> Tensor:
        ctx.estimates = estimates
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        return (None, None, *[grad * e for e in ctx.estimates])


def evolution_strategies_loss(loop: InnerLoop, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, loss_fn: LossFn | None) -> Tensor:
    """Antithetic ES (``es``) or persistent ES (``pes``) estimate attached to the meta-loss.

    ES: ĝ = 1/(2σ²N) Σ_i [L(θ+ε_i) − L(θ−ε_i)] ε_i with ε_i ~ N(0, σ²I), an unbiased
    estimate of the gradient of the Gaussian-smoothed loss. PES (Vicol et al., 2021):
    the unroll is cut into truncations of ``pes_truncation`` steps; each truncation
    draws fresh ε_s for both antithetic particles, which persist across truncations, and
    accumulates ξ = Σ_s ε_s; the estimate of ∇ mean_s L_s is
    1/(2σ²N S) Σ_i Σ_s [L_s(+) − L_s(−)] ξ_{i,s}. The meta-loss value is the unperturbed
    loss (ES) or the mean of the unperturbed truncation losses (PES).
    """
    wrt = list(loop.es_wrt) if loop.es_wrt is not None else (
        loop.optimizer.hyperparameter_tensors() + [t for t in loop.theta if t.requires_grad] + loop.meta_parameters)
    wrt = _unique([w for w in wrt if w.requires_grad])
    tasks = sx.shape[0]
    truncation = loop.steps if loop.mode == "es" else (loop.pes_truncation or loop.steps)
    bounds = list(range(0, loop.steps, max(truncation, 1))) or [0]
    sigma = loop.es_sigma

    def run_particle(noise_per_segment: list[list[Tensor]] | None) -> list[Tensor]:
        """Losses at the end of each truncation for one particle (θ + noise)."""
        carry, losses = None, []
        for s, start in enumerate(bounds):
            shifted = [w.detach() + (0 if noise_per_segment is None else noise_per_segment[s][k]) for k, w in enumerate(wrt)]
            mapping = {id(w): v for w, v in zip(wrt, shifted)}
            optimizer = loop.with_hyperparameters(mapping)
            theta = [mapping.get(id(t), t.detach()) for t in loop.theta]
            if carry is None:
                carry = loop.initial_carry(tasks, theta)
            length = min(truncation, loop.steps - start) if loop.steps else 0
            with _perturbed_extra(loop.meta_parameters, mapping):
                carry = loop.run(carry, length, sx, sy, "none", optimizer=optimizer, theta=theta)
                from .engine import Adapted
                adapted = Adapted(carry.params, loop.adapted_mask, carry.buffers, {})
                with torch.no_grad():
                    losses.append(loop.query_losses(adapted, qx, qy, loss_fn).mean())
        return losses

    generator = loop.generator
    per_sample = []
    for _ in range(loop.es_samples):
        noises = [[torch.randn(w.shape, generator=generator, dtype=w.dtype, device=w.device) * sigma for w in wrt]
                  for _ in bounds]
        plus = run_particle(noises)
        minus = run_particle([[-n for n in seg] for seg in noises])
        estimate = [torch.zeros_like(w) for w in wrt]
        accumulated = [torch.zeros_like(w) for w in wrt]
        for s in range(len(bounds)):
            accumulated = [a + n for a, n in zip(accumulated, noises[s])]
            difference = (plus[s] - minus[s]) / (2 * sigma**2 * len(bounds))
            estimate = [e + difference * a for e, a in zip(estimate, accumulated)]
        per_sample.append(estimate)
    stacked = [torch.stack([sample[k] for sample in per_sample]) for k in range(len(wrt))]
    means = [s.mean(0) for s in stacked]
    variance = sum(float(s.var(0, unbiased=True).sum()) for s in stacked) if loop.es_samples > 1 else float("nan")
    value = torch.stack(run_particle(None)).mean()
    loop.last_info = {"mode": loop.mode, "steps": loop.steps, "es_samples": loop.es_samples, "es_sigma": sigma,
                      "truncations": len(bounds), "estimate_variance": variance,
                      "estimate_standard_error": math.sqrt(variance / loop.es_samples) if loop.es_samples > 1 else float("nan")}
    return _EstimatedLoss.apply(value, means, *wrt)


class _perturbed_extra:
    """Temporarily shift extra meta-parameters (leaves) in place; restores exact values."""

    def __init__(self, tensors: list[Tensor], mapping: dict[int, Tensor]) -> None:
        self.targets = [(t, mapping[id(t)]) for t in tensors if id(t) in mapping]
        self.saved: list[Tensor] = []

    def __enter__(self) -> None:
        with torch.no_grad():
            for t, value in self.targets:
                self.saved.append(t.detach().clone())
                t.copy_(value)

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for (t, _), old in zip(self.targets, self.saved):
                t.copy_(old)
