r"""Implicit differentiation of any solver: ``custom_root`` and ``custom_fixed_point``.

A solver returns :math:`x^\star(\theta)` with :math:`F(x^\star, \theta) = 0` (``F`` the
*optimality condition*: a gradient, a KKT residual, :math:`T(x) - x` for a fixed point). By the
implicit function theorem, where :math:`A = \partial F/\partial x` is invertible,

.. math::
    \frac{dx^\star}{d\theta} = -A^{-1}\,\frac{\partial F}{\partial\theta}.

Reverse mode solves :math:`A^\top w = \bar x` for the cotangent :math:`\bar x` and returns
:math:`\bar\theta = -(\partial F/\partial\theta)^\top w`; forward mode solves
:math:`A\dot x = -(\partial F/\partial\theta)\,\dot\theta`. Both apply :math:`A`,
:math:`A^\top` and :math:`\partial F/\partial\theta` only as Jacobian-vector products
(``torch.func.jvp`` / ``torch.func.vjp``), so the solver itself — a Python loop, scipy, L-BFGS, a
closed form — is never differentiated. Nor is the linear solver: where the gradient itself will be
differentiated (Hessians, a double backward), the adjoint ``w`` is the root of the linear condition
:math:`A^\top w - \bar x = 0` and gets its own derivative the same way, so second derivatives are
exact to the solver's tolerance even where a Krylov solver stops after a step or two. This is the API
of jaxopt (Blondel et al. 2022,
"Efficient and modular implicit differentiation"), for PyTorch.

The derivative is an ``autograd.Function`` with a ``jvp`` and a generated ``vmap`` rule, so the
decorated solver composes with ``torch.autograd``, ``torch.func.grad``, ``jacrev``, ``jacfwd``,
``jvp`` and ``vmap`` (under ``vmap`` the user's solver must itself be vmappable, as in JAX).
``x`` and every argument, positional or keyword, may be a tensor, a 0-dim tensor or a pytree (dict,
list, tuple) of tensors; every floating-point tensor among them is differentiated (implicitly), as in
jaxopt: pass a tensor detached to leave it out.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.utils import _pytree as pytree

from ..errors import OptimalityResidualError, OptimalityResidualWarning
from ..optim._gradients import graph_leaves, inside_torch_func
from .ift import damped, implicit_vjp
from .linear_solve import LinearSolver, SolveInfo, Vector, as_solver, under_vmap

try:  # torch's private functorch interpreter stack (no public query): which transforms are tracing
    from torch._C._functorch import TransformType as _TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _interpreters
except ImportError:  # pragma: no cover
    _interpreters = None

ON_RESIDUAL = ("warn", "raise", "ignore")


@dataclass
class RootProblem:
    """One call's optimality condition with everything but the differentiated tensors bound."""

    optimality_fn: Callable[..., Any]
    x_spec: Any
    args_spec: Any                 # the structure of ``(args, kwargs)``
    arg_leaves: list[Any]          # every leaf of the arguments, positional then keyword (tensors replaced on call)
    tensor_positions: list[int]    # which of them are floating-point tensors (differentiated)
    solver: LinearSolver
    damping: float
    record: Callable[[SolveInfo], None]

    def F(self, x: tuple[Tensor, ...] | list[Tensor], theta: tuple[Tensor, ...] | list[Tensor]) -> list[Tensor]:
        """``F(x, *args)`` as a flat list of tensors matching ``x``'s leaves."""
        leaves = list(self.arg_leaves)
        for position, value in zip(self.tensor_positions, theta):
            leaves[position] = value
        args, kwargs = pytree.tree_unflatten(leaves, self.args_spec)
        out = self.optimality_fn(pytree.tree_unflatten(list(x), self.x_spec), *args, **kwargs)
        return pytree.tree_leaves(out)

    def _batched(self, op: Callable[[list[Tensor]], list[Tensor]]) -> Callable[[Vector], Vector]:
        """An operator on ``x``-shaped lists as the solvers see it: a leading task dimension of 1."""
        return lambda u: [o[None] for o in op([ui[0] for ui in u])]

    def _solve(self, apply: Callable[[list[Tensor]], list[Tensor]], apply_t: Callable[[list[Tensor]], list[Tensor]],
               rhs: list[Tensor], what: str) -> list[Tensor]:
        """Solve ``(M + damping·I) u = rhs`` for one system (forward mode)."""
        u, info = self.solver.solve(damped(self._batched(apply), self.damping), [r[None] for r in rhs],
                                    damped(self._batched(apply_t), self.damping), what=what)
        self.record(info)
        return [ui[0] for ui in u]

    def operators(self, x: list[Tensor], theta: list[Tensor]) -> tuple[Callable[[list[Tensor]], list[Tensor]],
                                                                          Callable[[list[Tensor]], list[Tensor]]]:
        """``u ↦ (∂F/∂x) u`` and ``u ↦ (∂F/∂x)ᵀ u`` at ``(x, θ)``, both from reverse mode (the first as
        the transpose of the linear map ``vjp``), so they also work inside forward-mode AD, where
        ``torch.func.jvp`` cannot nest."""
        f_x = functools.partial(_call_x, self, theta)
        out, vjp_x = torch.func.vjp(f_x, *x)
        transpose: list[Callable[..., Any]] = []  # built on first use (only NormalCG and forward mode need A)

        def apply(u: list[Tensor]) -> list[Tensor]:
            if _plain_jvp_nests():
                return list(torch.func.jvp(f_x, tuple(x), tuple(u))[1])
            if not transpose:
                transpose.append(_transpose(vjp_x, out))
            return list(transpose[0](tuple(u)))

        return apply, (lambda u: list(vjp_x(list(u))))

    def vjp(self, x: list[Tensor], theta: list[Tensor], cotangent: list[Tensor],
            wanted: list[bool]) -> list[Tensor | None]:
        """``θ̄ = −(∂F/∂θ)ᵀ w`` with ``(∂F/∂x)ᵀ w = x̄``."""
        apply, apply_t = self.operators(x, theta)
        chosen = [t for t, keep in zip(theta, wanted) if keep]

        def f_theta(*parts: Tensor) -> list[Tensor]:
            it = iter(parts)
            return self.F(x, [next(it) if keep else t for t, keep in zip(theta, wanted)])

        def mixed_vjp(w: Vector) -> list[Tensor]:
            if not chosen:
                return []
            return list(torch.func.vjp(f_theta, *chosen)[1]([wi[0] for wi in w]))

        if _differentiating([*x, *theta, *cotangent]):
            # a derivative of this gradient will be taken: w's own, by the implicit function theorem
            # again (not by differentiating the solver's iterations, which is wrong where its Krylov
            # space closes early); the solve itself runs once, without a graph
            w = self._attached_adjoint(x, theta, cotangent, apply, apply_t)
            negated = mixed_vjp([wi[None] for wi in w])
            grads = [None if g is None else -g for g in negated]
        else:
            grads, info = implicit_vjp(self._batched(apply_t), mixed_vjp, [c[None] for c in cotangent], self.solver,
                                       self.damping, self._batched(apply), "implicit gradient (reverse mode): ")
            self.record(info)
        it = iter(grads)
        return [next(it) if keep else None for keep in wanted]

    def _attached_adjoint(self, x: list[Tensor], theta: list[Tensor], cotangent: list[Tensor],
                          apply: Callable[[list[Tensor]], list[Tensor]],
                          apply_t: Callable[[list[Tensor]], list[Tensor]]) -> list[Tensor]:
        """``w`` with ``(A + damping·I)ᵀ w = x̄`` as a differentiable function of ``x*``, ``θ`` and
        ``x̄``: the root of the linear condition ``G(w) = (A + damping·I)ᵀ w − x̄``, solved once
        without a graph and given its derivatives by :class:`_ImplicitRoot` (``∂G/∂w`` is the same
        operator, so its solves are the same kind)."""
        with torch.no_grad():
            w, info = self.solver.solve(damped(self._batched(apply_t), self.damping), [c.detach()[None] for c in cotangent],
                                        damped(self._batched(apply), self.damping), what="implicit gradient (reverse mode): ")
        self.record(info)
        n_x, n_theta = len(x), len(theta)
        damping = self.damping

        def condition(w: list[Tensor], *inputs: Tensor) -> list[Tensor]:
            xs, thetas, targets = inputs[:n_x], list(inputs[n_x:n_x + n_theta]), inputs[n_x + n_theta:]
            transposed = torch.func.vjp(functools.partial(_call_x, self, thetas), *xs)[1](list(w))
            return [g + damping * wi - t for g, wi, t in zip(transposed, w, targets)]

        inputs = [*x, *theta, *cotangent]
        _, w_spec = pytree.tree_flatten([wi[0] for wi in w])
        _, inputs_spec = pytree.tree_flatten((tuple(inputs), {}))
        linear = RootProblem(condition, w_spec, inputs_spec, inputs, list(range(len(inputs))), self.solver, 0.0,
                             self.record)
        return list(_ImplicitRoot.apply(linear, n_x, *[wi[0].detach() for wi in w], *inputs))

    def jvp(self, x: list[Tensor], theta: list[Tensor], tangents: list[Tensor | None]) -> list[Tensor]:
        """``ẋ`` with ``(∂F/∂x) ẋ = −(∂F/∂θ) θ̇``."""
        moving = [i for i, d in enumerate(tangents) if d is not None]
        if not moving:
            return [torch.zeros_like(xi) for xi in x]

        def f_theta(*parts: Tensor) -> list[Tensor]:
            values = list(theta)
            for i, p in zip(moving, parts):
                values[i] = p
            return self.F(x, values)

        out, vjp_theta = torch.func.vjp(f_theta, *[theta[i] for i in moving])
        rhs = _transpose(vjp_theta, out)(tuple(tangents[i] for i in moving))  # (∂F/∂θ) θ̇
        apply, apply_t = self.operators(x, theta)
        return self._solve(apply, apply_t, [-r for r in rhs], "implicit gradient (forward mode): ")


def _plain_jvp_nests() -> bool:
    """Whether ``torch.func.jvp`` can run here: not inside a plain ``forward_ad.dual_level`` (only a
    torch.func transform's own forward level, which it nests under)."""
    return forward_ad._current_level < 0 or _jvp_levels() > 0


def _jvp_levels() -> int:
    """How many ``torch.func`` forward-mode transforms are tracing (torch's private interpreter stack;
    0 on a torch without it)."""
    if _interpreters is None:  # pragma: no cover
        return 0
    return sum(i.key() == _TransformType.Jvp for i in _interpreters())


def _call_x(problem: RootProblem, theta: list[Tensor], *x: Tensor) -> list[Tensor]:
    return problem.F(x, theta)


def _transpose(vjp: Callable[[list[Tensor]], Any], out: list[Tensor]) -> Callable[..., Any]:
    """The transpose of the linear map ``w ↦ Jᵀw`` that ``vjp`` applies (its own VJP, taken at zero):
    ``u ↦ J u`` from reverse mode only."""
    return torch.func.vjp(lambda *v: vjp(list(v)), *[torch.zeros_like(o) for o in out])[1]


class _ImplicitRoot(torch.autograd.Function):
    """Identity on the solution ``x*`` in the forward pass; the implicit-function-theorem VJP and
    JVP as its derivatives. Inputs: the problem, the number of ``x`` leaves, the ``x`` leaves
    (detached) and the differentiated ``θ`` leaves."""

    generate_vmap_rule = True

    @staticmethod
    def forward(problem: RootProblem, n_x: int, *leaves: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(x.clone() for x in leaves[:n_x])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        problem, n_x, *leaves = inputs
        ctx.problem, ctx.n_x = problem, n_x
        # x* saved as the *output*: a second derivative through backward or the jvp then sees x*'s
        # own dependence on θ (through this Function again), so Hessians, jacrev(jacfwd) and a
        # backward through a forward-mode tangent are exact too (forward over forward is refused).
        ctx.save_for_backward(*output, *leaves[n_x:])
        ctx.save_for_forward(*output, *leaves[n_x:])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> Any:
        leaves = ctx.saved_tensors
        n_x = ctx.n_x
        x, theta = list(leaves[:n_x]), list(leaves[n_x:])
        cotangent = [torch.zeros_like(xi) if g is None else g for g, xi in zip(grads, x)]
        wanted = list(ctx.needs_input_grad[2 + n_x:])
        theta_grads = ctx.problem.vjp(x, theta, cotangent, wanted)
        return (None, None, *([None] * n_x), *theta_grads)

    @staticmethod
    def jvp(ctx: Any, _problem: Any, _n_x: Any, *tangents: Tensor | None) -> Any:
        _refuse_forward_over_forward()
        leaves = ctx.saved_tensors
        n_x = ctx.n_x
        x, theta = list(leaves[:n_x]), list(leaves[n_x:])
        return tuple(ctx.problem.jvp(x, theta, list(tangents[n_x:])))


def _refuse_forward_over_forward() -> None:
    """A forward-mode derivative of a forward-mode derivative (``jvp`` of ``jvp``, ``jacfwd`` of
    ``jacfwd``) does not see the solution's dependence on θ in the inner rule and would read 0."""
    if _jvp_levels() >= 2:
        raise RuntimeError(
            "custom_root / custom_fixed_point: a forward-mode derivative of a forward-mode derivative (jvp of "
            "jvp, jacfwd of jacfwd) is not supported here (it would read 0); take second derivatives with "
            "torch.func.hessian, jacrev(jacfwd), jacfwd(jacrev) or jacrev(jacrev)"
        )


def _differentiating(tensors: list[Tensor]) -> bool:
    """Whether anything will ask for a derivative of the solution: autograd, forward AD or a torch.func transform."""
    if inside_torch_func():
        return True
    if any(t.requires_grad for t in tensors) and torch.is_grad_enabled():
        return True
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _residual_check(problem: RootProblem, x: list[Tensor], theta: list[Tensor], names: Callable[[], list[str]],
                    residual_tol: float, on_residual: str, name: str) -> float:
    """``‖F(x*, θ)‖₂`` at the returned point (warn/raise above ``residual_tol``); and, under plain
    autograd, a clear error when ``F`` ignores a ``θ`` that asks for a gradient (``names()``: each
    ``θ``'s name, worked out only for that message)."""
    if under_vmap(x + theta):
        return math.nan  # the values are batched: nothing to read
    plain = not inside_torch_func()
    with torch.enable_grad():
        probes = [t.detach().requires_grad_(t.requires_grad) if plain else t for t in theta]
        out = problem.F([xi.detach() for xi in x], probes)
    if len(out) != len(x) or any(o.shape != xi.shape for o, xi in zip(out, x)):
        raise ValueError(f"{name}: optimality_fn must return the structure and shapes of x (one equation per "
                         f"unknown), got shapes {[tuple(o.shape) for o in out]} for x of shapes "
                         f"{[tuple(xi.shape) for xi in x]}")
    if plain:
        reached = {id(t) for t in graph_leaves(out)}
        ignored = [k for k, (p, t) in enumerate(zip(probes, theta)) if t.requires_grad and id(p) not in reached]
        if ignored:
            every = names()
            raise ValueError(f"{name}: optimality_fn does not depend on {', '.join(every[k] for k in ignored)}, "
                             "which requires grad: its gradient through the solution would be silently zero. Use "
                             "it in the optimality condition, or pass it detached")
    residual = float(torch.sqrt(sum((o.detach().double() ** 2).sum() for o in out)))
    if on_residual != "ignore" and not residual <= residual_tol:
        message = (f"{name}: the optimality condition is {residual:.3g} from zero at the solver's returned point "
                   f"(‖F(x*, θ)‖₂ > residual_tol={residual_tol:g}). The implicit gradient assumes F(x*, θ) = 0 and "
                   "is wrong by roughly that much: run the solver to a tighter tolerance, check optimality_fn, or "
                   "raise residual_tol")
        if on_residual == "raise":
            raise OptimalityResidualError(message)
        warnings.warn(message, OptimalityResidualWarning, stacklevel=4)
    return residual


def _argument_names(args: tuple[Any, ...], kwargs: dict[str, Any], positions: list[int]) -> list[str]:
    """``argument [0]``, ``argument [1]['lam']``, ``keyword argument ['b']``, ...: the leaves at
    ``positions`` of the arguments (positional then keyword), by their paths."""
    paths, _ = pytree.tree_flatten_with_path((args, kwargs))
    return [f"{'argument' if paths[i][0][0].idx == 0 else 'keyword argument'} {pytree.keystr(paths[i][0][1:])}"
            for i in positions]


def custom_root(optimality_fn: Callable[..., Any], *torchopt_argnums: Any, solve: LinearSolver | str = "cg",
                damping: float = 0.0, residual_tol: float = 1e-4, on_residual: str = "warn",
                has_aux: bool = False, argnums: Any = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    r"""Decorate ``solver(init, *args, **kwargs) -> x*`` so that ``x*`` is differentiable in ``args`` and
    ``kwargs`` through ``optimality_fn(x, *args, **kwargs) = 0`` (the implicit function theorem).

    Args:
        optimality_fn: ``F(x, *args, **kwargs)``, zero at the solution, with the structure and shapes
            of ``x`` (for a minimiser of ``f``: the gradient of ``f`` in ``x``).
        solve: the linear solver for ``∂F/∂x``: ``"cg"`` (symmetric positive definite, the default),
            ``"minres"`` (symmetric), ``"gmres"``, ``"normal_cg"``, ``"neumann"``, ``"dense"``, or an
            object (``CG(iterations=50, tol=1e-8, on_fail="raise")``, ``Dense(lstsq=True)``, ...).
        damping: added to the diagonal of ``∂F/∂x`` (a ridge for a nearly singular Hessian).
        residual_tol: the largest ``‖F(x*, args)‖₂`` accepted at the returned point.
        on_residual: ``"warn"`` (default), ``"raise"`` (:class:`~diffopt.errors.OptimalityResidualError`)
            or ``"ignore"`` when that residual is above ``residual_tol``.
        has_aux: the solver returns ``(x*, aux)``; ``aux`` is passed through, not differentiated.
        argnums: torchopt's ``custom_root(F, argnums, ...)`` argument, refused with the port: here, as in
            jaxopt, every tensor argument (positional or keyword) that requires grad is differentiated.

    The solver runs on detached arguments (it is never differentiated: its result is returned detached,
    with the implicit derivative only) and its first argument ``init`` gets no gradient. When nothing
    asks for a derivative (no argument requires grad, no forward-mode tangent, no ``torch.func``
    transform) the decorator costs nothing. The decorated function records its last solve in
    ``.last_solve`` (a :class:`SolveInfo`) and the residual in ``.last_residual``. The residual is
    checked, and an argument that requires grad but that ``optimality_fn`` ignores is refused
    (``ValueError``: its gradient would be silently zero), wherever the values can be read: not
    under ``vmap``, and the second check only under plain autograd.
    Under ``vmap`` the iterative solvers run all their iterations (no early stop on batched values).

    Example::

        def ridge_condition(x, lam, a, b):          # ∇ₓ ½‖Ax − b‖² + ½ λ‖x‖²
            return a.T @ (a @ x - b) + lam * x

        @custom_root(ridge_condition, solve="cg")
        def ridge(init, lam, a, b):
            return torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1]), a.T @ b)
    """
    if torchopt_argnums or argnums is not None:
        raise TypeError("custom_root(optimality_fn, argnums): that is torchopt's signature. diffopt's follows jaxopt's: "
                        "custom_root(optimality_fn, solve=..., has_aux=...) differentiates every tensor argument of "
                        "the solver (positional or keyword) that requires grad (pass the others detached); drop "
                        "argnums")
    if str(getattr(getattr(solve, "func", solve), "__module__", "")).startswith("torchopt"):  # (solve_cg() is a partial)
        raise TypeError(f"custom_root(solve={solve!r}): a torchopt linear solver; use a name ('cg', 'normal_cg', "
                        "'gmres', 'minres', 'neumann', 'dense') or a diffopt solver object: solve_cg(maxiter=n, "
                        "rtol=r) is CG(iterations=n, tol=r), solve_normal_cg(...) is NormalCG(...)")
    solver_object = as_solver(solve)
    if not 0 <= damping < math.inf:
        raise ValueError(f"custom_root: damping must be >= 0 and finite, got {damping!r}")
    if on_residual not in ON_RESIDUAL:
        raise ValueError(f"custom_root: on_residual must be 'warn', 'raise' or 'ignore', got {on_residual!r}")
    if not residual_tol >= 0:
        raise ValueError(f"custom_root: residual_tol must be >= 0, got {residual_tol!r}")

    def decorator(solver: Callable[..., Any]) -> Callable[..., Any]:
        name = getattr(solver, "__name__", "solver")

        @functools.wraps(solver)
        def wrapped(init: Any, *args: Any, **kwargs: Any) -> Any:
            arg_leaves, args_spec = pytree.tree_flatten((args, kwargs))
            detached_args, detached_kwargs = pytree.tree_unflatten(
                [v.detach() if isinstance(v, Tensor) else v for v in arg_leaves], args_spec)
            result = solver(init, *detached_args, **detached_kwargs)
            solution, aux = result if has_aux else (result, None)
            x_leaves, x_spec = pytree.tree_flatten(solution)
            positions = [i for i, v in enumerate(arg_leaves) if isinstance(v, Tensor) and v.is_floating_point()]
            theta = [arg_leaves[i] for i in positions]
            if not all(isinstance(v, Tensor) for v in x_leaves):
                raise TypeError(f"{name} must return a tensor or a pytree of tensors, got {solution!r}")
            x = [v.detach() for v in x_leaves]
            if not _differentiating(theta):  # (detached: a solver that closes over a tensor has its own graph)
                solution = pytree.tree_unflatten(x, x_spec)
                return (solution, aux) if has_aux else solution
            problem = RootProblem(optimality_fn, x_spec, args_spec, arg_leaves, positions, solver_object,
                                  damping, record=lambda info: setattr(wrapped, "last_solve", info))
            wrapped.last_residual = _residual_check(problem, x, theta,
                                                    lambda: _argument_names(args, kwargs, positions),
                                                    residual_tol, on_residual, name)
            out = _ImplicitRoot.apply(problem, len(x), *x, *theta)
            solution = pytree.tree_unflatten(list(out), x_spec)
            return (solution, aux) if has_aux else solution

        wrapped.last_solve = None  # type: ignore[attr-defined]
        wrapped.last_residual = None  # type: ignore[attr-defined]
        return wrapped

    return decorator


def custom_fixed_point(fixed_point_fn: Callable[..., Any], *, solve: LinearSolver | str = "gmres",
                       **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    r"""Decorate ``solver(init, *args) -> x*`` where ``x* = T(x*, *args)``: :func:`custom_root` with
    ``F(x, θ) = T(x, θ) − x``, so ``dx*/dθ = (I − ∂T/∂x)^{-1} ∂T/∂θ``.

    ``solve`` defaults to ``"gmres"`` because ``I − ∂T/∂x`` is not symmetric in general (for a
    gradient step ``T(x) = x − η∇f(x)`` it is ``η∇²f``, and ``"cg"`` works). Other options as
    :func:`custom_root`.
    """
    def optimality_fn(x: Any, *args: Any, **kwargs: Any) -> Any:
        return pytree.tree_map(lambda t, s: t - s, fixed_point_fn(x, *args, **kwargs), x)

    return custom_root(optimality_fn, solve=solve, **options)
