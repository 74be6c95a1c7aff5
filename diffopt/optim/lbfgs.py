r"""L-BFGS, differentiable two ways: unrolled (:class:`LBFGS`) and implicit (:func:`lbfgs_solve`).

:class:`LBFGS` is ``torch.optim.LBFGS`` (Nocedal, 1980; Liu & Nocedal, 1989) with the same
arguments and ``step(closure)``, where the closure receives the current parameters
(nothing is written in place) and returns the loss::

    opt = diffopt.optim.LBFGS([w], lr=1, history_size=10, line_search_fn="strong_wolfe")
    params = opt.step(lambda ps: objective(ps[0], lam))   # new parameters, on the graph

One ``step`` runs up to ``max_iter`` iterations: the two-loop recursion

.. math::
    q \leftarrow -g;\quad \alpha_i = \rho_i s_i^\top q,\ q \leftarrow q - \alpha_i y_i\ (i = k-1..0);\quad
    r \leftarrow \gamma q;\quad \beta_i = \rho_i y_i^\top r,\ r \leftarrow r + (\alpha_i - \beta_i) s_i\ (i = 0..k-1)

with :math:`\rho_i = 1/(y_i^\top s_i)` and :math:`\gamma = y^\top s / y^\top y` of the newest
pair, then :math:`x \leftarrow x + t d` with :math:`t` the learning rate (the first
iteration: :math:`\min(1, 1/\|g\|_1)\,\mathrm{lr}`) or torch's strong-Wolfe line search
(cubic interpolation). Everything is torch's arithmetic in torch's order, so the
trajectory is torch.optim's (tests: <= 1e-10 in float64).

Unrolled differentiation: gradients are taken with ``create_graph=True`` and every
quantity above — the curvature pairs, the two-loop recursion, the step sizes, the
cubic interpolations of the line search — is a tensor on the graph, so a loss of the
returned parameters differentiates to the initial parameters, a tensor ``lr`` and
anything the closure reads. The *decisions* (accept a curvature pair when
:math:`y^\top s > 10^{-10}`, the line search's bracketing and Wolfe tests, the
stopping tests) are taken on the values and treated as constants: the result is
differentiable wherever a small change of the inputs does not flip one, which is
almost everywhere; at a flip it is discontinuous and no derivative exists.

Implicit differentiation: :func:`lbfgs_solve` minimises ``objective(x, theta)``
with L-BFGS and returns the minimiser :math:`x^*(\theta)` with the gradient of the
implicit function theorem: for a loss :math:`L(x^*)`, :math:`\nabla_\theta L =
-\partial_\theta\nabla_x f(x^*,\theta)^\top w` where :math:`\nabla^2_{xx} f(x^*,\theta)\,w =
\nabla_x L`, solved by conjugate gradients on Hessian-vector products (the Hessian
is symmetric positive definite at a strict minimum). It costs a few HVPs, not the
unrolled graph, and is exact up to the solver's and CG's tolerances.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["LBFGS", "lbfgs_solve"]

Closure = Callable[[list[Tensor]], Tensor]


def _cubic_interpolate(x1: Any, f1: Any, g1: Any, x2: Any, f2: Any, g2: Any, bounds: Any = None) -> Any:
    """torch.optim.lbfgs's cubic interpolation (tensors stay on the graph; the branch is a constant)."""
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    if d2_square >= 0:
        d2 = d2_square.sqrt()
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def _strong_wolfe(obj_func: Callable[[Any, Tensor], tuple[Tensor, Tensor]], t: Any, d: Tensor, f: Tensor, g: Tensor,
                  gtd: Tensor, c1: float = 1e-4, c2: float = 0.9, tolerance_change: float = 1e-9,
                  max_ls: int = 25) -> tuple[Tensor, Tensor, Any, int]:
    """torch.optim.lbfgs's ``_strong_wolfe`` (Nocedal & Wright, Algorithms 3.5-3.6), with the losses as
    tensors so that the chosen step size carries its dependence on them."""
    d_norm = d.abs().max()
    f_new, g_new = obj_func(t, d)
    ls_func_evals = 1
    gtd_new = g_new.dot(d)
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    ls_iter = 0
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            break
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))
        t_prev, f_prev, g_prev, gtd_prev = tmp, f_new, g_new, gtd_new
        f_new, g_new = obj_func(t, d)
        ls_func_evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1
    if ls_iter == max_ls:
        bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = _cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1])
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                t = max(bracket) - eps if abs(t - max(bracket)) < abs(t - min(bracket)) else min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False
        f_new, g_new = obj_func(t, d)
        ls_func_evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1
        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            bracket[high_pos], bracket_f[high_pos] = t, f_new
            bracket_g[high_pos], bracket_gtd[high_pos] = g_new, gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos], bracket_gtd[high_pos] = bracket_g[low_pos], bracket_gtd[low_pos]
            bracket[low_pos], bracket_f[low_pos], bracket_g[low_pos], bracket_gtd[low_pos] = t, f_new, g_new, gtd_new
    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals


class LBFGS:
    """Differentiable ``torch.optim.LBFGS`` (one parameter group, as torch's).

    Args: as ``torch.optim.LBFGS`` (``lr`` may be a tensor), plus ``first_order``:
    gradients without a graph through them (the recursion and step sizes still are).
    ``step(closure)`` takes ``closure(params) -> loss`` and returns the new parameters.
    """

    def __init__(self, params: Sequence[Tensor], lr: float | Tensor = 1, max_iter: int = 20,
                 max_eval: int | None = None, tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9,
                 history_size: int = 100, line_search_fn: str | None = None, *, first_order: bool = False) -> None:
        if isinstance(params, Tensor):
            raise TypeError("LBFGS: params must be a list of tensors; wrap a single tensor in a list")
        params = list(params)
        if params and isinstance(params[0], dict):
            if len(params) != 1:
                raise ValueError("LBFGS: one parameter group only (as torch.optim.LBFGS: no per-group options)")
            params = list(params[0]["params"])
        if not params:
            raise ValueError("LBFGS: got an empty parameter list")
        for j, p in enumerate(params):
            if not isinstance(p, Tensor) or not (p.is_floating_point() or p.is_complex()):
                raise TypeError(f"LBFGS: params[{j}] must be a floating-point or complex tensor")
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError(f"LBFGS: a tensor lr must have one element, got shape {tuple(lr.shape)}")
        if not float(lr.detach() if isinstance(lr, Tensor) else lr) >= 0:  # (NaN too, as torch)
            raise ValueError(f"LBFGS: invalid lr {float(lr)}; it must be a number >= 0")
        if line_search_fn not in (None, "strong_wolfe"):
            raise ValueError(f"LBFGS: line_search_fn must be None or 'strong_wolfe', got {line_search_fn!r}")
        for name, value in (("max_iter", max_iter), ("history_size", history_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LBFGS: {name} must be a positive integer, got {value!r}")
        self.params = params
        self._trainable = [p.requires_grad for p in params]  # (the others get a zero gradient, as in torch)
        self.defaults = {"lr": lr, "max_iter": max_iter,
                         "max_eval": max_iter * 5 // 4 if max_eval is None else max_eval,
                         "tolerance_grad": tolerance_grad, "tolerance_change": tolerance_change,
                         "history_size": history_size, "line_search_fn": line_search_fn}
        self.param_groups = [dict(self.defaults, params=list(range(len(params))))]
        self.first_order = first_order
        self.state: dict[str, Any] = {"func_evals": 0, "n_iter": 0}
        self.last_loss: Tensor | None = None

    def hyperparameter_tensors(self) -> list[Tensor]:
        """The tensor ``lr`` if it requires grad (what an engine mode differentiates besides the weights)."""
        lr = self.defaults["lr"]
        return [lr] if isinstance(lr, Tensor) and lr.requires_grad else []

    # -- flat views (complex parameters as real pairs, as torch) --------------------------------------
    @staticmethod
    def _flat(tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat([(torch.view_as_real(t) if t.is_complex() else t).reshape(-1) for t in tensors])

    def _moved(self, params: list[Tensor], t: Any, d: Tensor) -> list[Tensor]:
        """``p + t * d`` for every parameter (torch: ``p.add_(d_slice, alpha=t)``, a fused multiply-add)."""
        out, offset = [], 0
        for p, trainable in zip(params, self._trainable):
            real = torch.view_as_real(p) if p.is_complex() else p
            piece = d[offset:offset + real.numel()].view_as(real)
            offset += real.numel()
            if not trainable:  # its gradient is zero; torch leaves it exactly as it is
                out.append(p)
                continue
            if isinstance(t, Tensor):
                moved = torch.addcmul(real, piece, t.to(real.dtype))
            else:
                moved = torch.add(real, piece, alpha=t)
            out.append(torch.view_as_complex(moved) if p.is_complex() else moved)
        return out

    def _evaluate(self, closure: Closure, params: list[Tensor]) -> tuple[Tensor, Tensor]:
        # under torch.no_grad the moved parameters do not require grad: differentiate at fresh leaves
        params = [p.detach().requires_grad_() if trainable and not p.requires_grad else p
                  for p, trainable in zip(params, self._trainable)]
        with torch.enable_grad():
            loss = closure(params)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError("LBFGS.step(closure): the closure must return a scalar loss tensor of the parameters")
            # what was frozen when the optimizer was built (requires_grad=False) stays a constant, as in torch
            wanted = [p for p, trainable in zip(params, self._trainable) if trainable and p.requires_grad]
            if not loss.requires_grad or not wanted:
                raise ValueError("LBFGS.step(closure): the loss does not depend on parameters that require grad")
            grads = torch.autograd.grad(loss.reshape(()), wanted, create_graph=not self.first_order and
                                        torch.is_grad_enabled(), allow_unused=True)
        it = iter(grads)
        full = [next(it) if trainable and p.requires_grad else None for p, trainable in zip(params, self._trainable)]
        return loss.reshape(()), self._flat([torch.zeros_like(p) if g is None else g for p, g in zip(params, full)])

    # -- the step ---------------------------------------------------------------------------------------
    def step(self, closure: Closure) -> list[Tensor]:
        """Up to ``max_iter`` L-BFGS iterations from the current parameters; returns the new ones."""
        group = self.param_groups[0]
        lr, max_iter, max_eval = group["lr"], group["max_iter"], group["max_eval"]
        tolerance_grad, tolerance_change = group["tolerance_grad"], group["tolerance_change"]
        line_search_fn, history_size = group["line_search_fn"], group["history_size"]
        state = self.state
        params = list(self.params)

        loss, flat_grad = self._evaluate(closure, params)
        self.last_loss = loss
        current_evals = 1
        state["func_evals"] += 1
        if flat_grad.abs().max() <= tolerance_grad:
            return params
        d, t = state.get("d"), state.get("t")
        old_dirs, old_stps, ro = state.get("old_dirs"), state.get("old_stps"), state.get("ro")
        H_diag, prev_flat_grad, prev_loss = state.get("H_diag"), state.get("prev_flat_grad"), state.get("prev_loss")
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1
            if state["n_iter"] == 1:
                d = flat_grad.neg()
                old_dirs, old_stps, ro = [], [], []
                H_diag = 1
            else:
                y = flat_grad.sub(prev_flat_grad)
                s = d.mul(t)
                ys = y.dot(s)
                if ys > 1e-10:  # a curvature pair is kept only where it is positive (a constant decision)
                    if len(old_dirs) == history_size:
                        old_dirs.pop(0)
                        old_stps.pop(0)
                        ro.pop(0)
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(1.0 / ys)
                    H_diag = ys / y.dot(y)
                al: list[Any] = [None] * len(old_dirs)
                q = flat_grad.neg()
                for i in range(len(old_dirs) - 1, -1, -1):
                    al[i] = old_stps[i].dot(q) * ro[i]
                    q = torch.addcmul(q, old_dirs[i], -al[i])  # torch: q.add_(old_dirs[i], alpha=-al[i])
                r = torch.mul(q, H_diag)
                for i in range(len(old_dirs)):
                    be_i = old_dirs[i].dot(r) * ro[i]
                    r = torch.addcmul(r, old_stps[i], al[i] - be_i)
                d = r
            prev_flat_grad = flat_grad
            prev_loss = loss
            if state["n_iter"] == 1:
                t = min(1.0, 1.0 / flat_grad.abs().sum()) * lr
            else:
                t = lr
            gtd = flat_grad.dot(d)
            if gtd > -tolerance_change:
                break
            ls_func_evals = 0
            if line_search_fn is not None:
                origin = params

                def obj_func(step: Any, direction: Tensor) -> tuple[Tensor, Tensor]:
                    return self._evaluate(closure, self._moved(origin, step, direction))

                loss, flat_grad, t, ls_func_evals = _strong_wolfe(obj_func, t, d, loss, flat_grad, gtd,
                                                                  max_ls=max_eval - current_evals)
                params = self._moved(params, t, d)
                opt_cond = flat_grad.abs().max() <= tolerance_grad
            else:
                params = self._moved(params, t, d)
                opt_cond = False
                if n_iter != max_iter:
                    loss, flat_grad = self._evaluate(closure, params)
                    opt_cond = flat_grad.abs().max() <= tolerance_grad
                    ls_func_evals = 1
            current_evals += ls_func_evals
            state["func_evals"] += ls_func_evals
            if n_iter == max_iter or current_evals >= max_eval or opt_cond:
                break
            if d.mul(t).abs().max() <= tolerance_change:
                break
            if abs(float(loss.detach()) - float(prev_loss.detach())) < tolerance_change:
                break
        state.update(d=d, t=t, old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=H_diag,
                     prev_flat_grad=prev_flat_grad, prev_loss=prev_loss)
        self.params = params
        return list(params)


# -- implicit differentiation ------------------------------------------------------------------------------

def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def conjugate_gradient(hvp: Callable[[list[Tensor]], list[Tensor]], rhs: list[Tensor], tol: float = 1e-12,
                       max_iter: int = 1000) -> list[Tensor]:
    """Solve ``H w = rhs`` for symmetric positive definite ``H`` given as ``hvp``, to ``||r|| <= tol ||rhs||``."""
    w = [torch.zeros_like(b) for b in rhs]
    r = [b.clone() for b in rhs]
    p = [b.clone() for b in rhs]
    rr = _dot(r, r)
    target = tol * float(rr) ** 0.5
    for _ in range(max_iter):
        if float(rr) ** 0.5 <= target:
            break
        hp = hvp(p)
        curvature = _dot(p, hp)
        if curvature <= 0:
            raise ValueError("lbfgs_solve: the Hessian at the returned point is not positive definite; the implicit "
                             "gradient needs a strict local minimum (add regularisation or solve further)")
        alpha = rr / curvature
        w = [x + alpha * y for x, y in zip(w, p)]
        r = [x - alpha * y for x, y in zip(r, hp)]
        rr_new = _dot(r, r)
        p = [x + (rr_new / rr) * y for x, y in zip(r, p)]
        rr = rr_new
    return w


class _ImplicitSolution(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, objective: Any, n_x: int, cg_tol: float, *tensors: Tensor
    ) -> tuple[Tensor, ...]:
        ctx.objective, ctx.n_x, ctx.cg_tol = objective, n_x, cg_tol
        ctx.save_for_backward(*tensors)
        return tuple(x.clone() for x in tensors[:n_x])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grad_x: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        xs = [x.detach().requires_grad_() for x in saved[:ctx.n_x]]
        thetas = [h.detach().requires_grad_() for h in saved[ctx.n_x:]]
        with torch.enable_grad():
            value = ctx.objective(xs, thetas)
            gx = torch.autograd.grad(value, xs, create_graph=True)

            def hvp(v: list[Tensor]) -> list[Tensor]:
                return list(torch.autograd.grad(gx, xs, v, retain_graph=True))

            rhs = [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grad_x)]
            w = conjugate_gradient(hvp, rhs, tol=ctx.cg_tol)
            cross = torch.autograd.grad(gx, thetas, w, allow_unused=True) if thetas else ()
        grads_theta = [None if c is None else -c for c in cross]
        return (None, None, None, *([None] * ctx.n_x), *grads_theta)


def lbfgs_solve(objective: Callable[[list[Tensor], list[Tensor]], Tensor], x0: Sequence[Tensor],
                theta: Sequence[Tensor] = (), *, steps: int = 10, cg_tol: float = 1e-12, **lbfgs_options: Any,
                ) -> list[Tensor]:
    """Minimise ``objective(x, theta)`` over ``x`` from ``x0`` with L-BFGS; return the minimiser with the
    implicit-function-theorem gradient to ``theta``.

    Args:
        objective: ``f(x, theta) -> scalar``, twice differentiable in ``x`` near the minimiser.
        x0: the starting point (no gradient flows to it: the minimiser does not depend on it).
        theta: the tensors the gradient of a loss of the solution should reach.
        steps: calls of ``LBFGS.step`` (each up to ``max_iter`` iterations).
        cg_tol: relative residual of the conjugate-gradient solve in the backward pass.
        **lbfgs_options: :class:`LBFGS`'s arguments (default ``line_search_fn="strong_wolfe"``,
            ``tolerance_grad=1e-12``, ``tolerance_change=0`` (stop on the gradient only), ``max_iter=100``).

    The solve runs without a graph; the backward pass solves
    ``hessian_xx f(x*, theta) w = grad_x L`` by CG on Hessian-vector products and returns
    ``-(d/dtheta grad_x f(x*, theta)) . w``. Exact up to how well ``x*`` minimises (the
    gradient norm at ``x*``) and ``cg_tol``; not differentiable a second time.
    """
    options = {"line_search_fn": "strong_wolfe", "tolerance_grad": 1e-12, "tolerance_change": 0.0,
               "max_iter": 100, **lbfgs_options}
    fixed = [h.detach() for h in theta]
    start = [x.detach().clone().requires_grad_() for x in x0]
    solver = LBFGS(start, first_order=True, **options)
    closure = lambda xs: objective(xs, fixed)  # noqa: E731
    with torch.no_grad():
        for _ in range(steps):
            solver.step(closure)
    solution = [x.detach() for x in solver.params]
    return list(_ImplicitSolution.apply(objective, len(solution), cg_tol, *solution, *theta))
