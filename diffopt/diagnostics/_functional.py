"""Shared machinery: explicit weights, task batches, model modes, gradients and adaptation.

Conventions (shared with the inner-loop engine through :mod:`diffopt.unroll.functional`,
which owns the parameter parser, the vector vocabulary and model evaluation):

* A model is evaluated functionally,
  ``torch.func.functional_call(model, {name: tensor, ...}, (x,))``
  (:func:`diffopt.unroll.functional.call`).
* Weights (θ, φ) are a dict ``name -> tensor`` (any subset of
  ``model.named_parameters()``; missing ones keep the module's value) or a
  list/tuple in ``model.named_parameters()`` order, or ``None`` for the
  module's own parameters. Every tensor may carry a leading task dimension
  ``(T, *shape)``; then the data carry it too.
* Per-task data are tensors with a leading task dimension or lists of
  per-task tensors (ragged sizes allowed).
* Adaptation is a callable ``adapt(params: dict, x, y) -> dict``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, vmap

from ..optim import SGDRule
from ..unroll.attention import double_differentiable
from ..unroll.functional import (
    ParameterLayout,
    Weights,
    as_weights,
    call,
    differentiable_copies,
    from_vector,
    has_batchnorm,
    to_vector,
    vector_slices,
)
from . import _cost
from ._likelihood import Likelihood
from ..errors import SecondOrderUnavailable

__all__ = [
    "Params",
    "SecondOrderUnavailable",
    "as_weights",
    "call_model",
    "differentiable_copies",
    "from_vector",
    "to_vector",
    "vector_slices",
    "evaluation",
    "per_example_grads",
    "per_example_jacobians",
    "sgd_adapt",
    "SGDAdapt",
]

Params = Dict[str, Tensor]
ParamsLike = Weights

BN_MODES = ("eval", "batch")


def second_order_fix(what: str, cause: str) -> str:
    return (
        f"{what} needs second derivatives (Hessian-vector products), but the model's loss cannot be "
        f"differentiated twice: {cause}\nFix: make every op in the model's forward twice differentiable "
        "(replace custom autograd.Functions marked @once_differentiable or whose backward leaves autograd, "
        "avoid non-differentiable ops such as argmax/round/detach on the path to the output, run RNNs without "
        "cuDNN: torch.backends.cudnn.flags(enabled=False)), or leave this diagnostic out "
        "(which=[...] without 'curvature' and 'metagrad')."
    )


# ---------------------------------------------------------------------------------------
# weights and tasks (the parser and the vector vocabulary are the unroll layer's)
# ---------------------------------------------------------------------------------------
def _data_count(x: Any) -> int:
    if isinstance(x, (list, tuple)):
        return len(x)
    return int(x.shape[0])


def _data_slice(x: Any, t: int) -> Any:
    if x is None:
        return None
    return x[t]


def split_tasks(
    model: nn.Module,
    params: Mapping[str, Optional[Params]],
    data: Mapping[str, Any],
    batched: Optional[bool] = None,
) -> Tuple[Optional[int], List[Tuple[Dict[str, Optional[Params]], Dict[str, Any]]]]:
    """Per-task views of weights and data.

    Returns ``(T, [(params_t, data_t), ...])`` with ``T = None`` (and a single
    entry) when nothing is task-batched. Weights without a task dimension are
    shared by all tasks. Data are batched when any weight is, when
    ``batched=True``, or when given as a list of per-task tensors.
    """
    layout = ParameterLayout(model)
    counts = {k: layout.task_count(p) for k, p in params.items() if p is not None}
    T_params = {c for c in counts.values() if c is not None}
    if len(T_params) > 1:
        raise ValueError(f"weights carry different numbers of tasks: {counts}")
    listed = [k for k, v in data.items() if isinstance(v, (list, tuple))]
    if batched is None:
        batched = bool(T_params) or bool(listed)
    if not batched:
        if T_params:
            raise ValueError("weights carry a task dimension but batched=False")
        _refuse_empty(data, None)
        return None, [(dict(params), dict(data))]
    T = T_params.pop() if T_params else None
    for k, v in data.items():
        if v is None:
            continue
        c = _data_count(v)
        if T is None:
            T = c
        elif c != T:
            raise ValueError(f"{k} holds {c} tasks but the weights/other data hold {T}")
    if T is None:
        raise ValueError("batched=True but nothing carries a task dimension")
    views = []
    for t in range(T):
        pt = {k: (None if p is None else ({n: v[t] for n, v in p.items()} if counts.get(k) is not None else p))
              for k, p in params.items()}
        views.append((pt, {k: _data_slice(v, t) for k, v in data.items()}))
        _refuse_empty(views[-1][1], t)
    return T, views


def _refuse_empty(data: Mapping[str, Any], task: Optional[int]) -> None:
    """A set with no examples has no mean: every estimate over it would be NaN or a silent 0."""
    for k, v in data.items():
        if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == 0:
            where = "" if task is None else f" for task {task}"
            raise ValueError(f"{k} has no examples{where} (shape {tuple(v.shape)}): a diagnostic needs at least one "
                             "example per set")


# ---------------------------------------------------------------------------------------
# model evaluation, modes, state preservation
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def evaluation(model: nn.Module, bn_mode: str = "eval") -> Iterator[None]:
    """Evaluate ``model`` without touching its state.

    Inside: every module is in eval mode (Dropout off: no RNG is drawn), except
    normalisation layers which are in train mode when ``bn_mode="batch"``
    (statistics of the evaluated batch; :func:`call_model` then hands them
    copies of the buffers so the running statistics are not updated). On exit
    the modules' ``training`` flags, all buffers and the global RNG state
    (CPU and the CUDA devices in use) are restored.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t in list(model.parameters()) + list(model.buffers()) if t.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices):
            model.eval()
            if bn_mode == "batch":
                for m in model.modules():
                    if isinstance(m, nn.modules.batchnorm._NormBase):
                        m.train()
            yield
    finally:
        for m, f in flags:
            m.training = f
        with torch.no_grad():
            for b, saved in buffers:
                if not torch.equal(b, saved):
                    b.copy_(saved)


def call_model(model: nn.Module, params: Params, x: Tensor, bn_mode: str = "eval") -> Tensor:
    """:func:`diffopt.unroll.functional.call`; with ``bn_mode="batch"`` the buffers are passed as copies
    (so batch-statistics BatchNorm never updates the module's running statistics). Attention runs on a
    twice-differentiable kernel (:func:`diffopt.unroll.double_differentiable`): the curvature and
    meta-gradient diagnostics differentiate these outputs twice."""
    buffers = {n: b.clone() for n, b in model.named_buffers()} if bn_mode == "batch" else None
    with double_differentiable():
        return call(model, params, x) if buffers is None else call(model, params, x, buffers)


# ---------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------
LossFn = Callable[[Tensor, Tensor], Tensor]


def per_example_loss(lik: Optional[Likelihood], loss_fn: Optional[LossFn]) -> Callable[[Tensor, Tensor], Tensor]:
    """A vectorised ``(out, y) -> (examples,)`` loss: the likelihood's NLL, or ``loss_fn`` per example.

    ``loss_fn(out, y) -> scalar`` is a mean-reduced loss such as
    ``torch.nn.functional.cross_entropy``; it is applied to one example at a time.
    """
    if loss_fn is None:
        assert lik is not None
        return lik.nll

    def losses(out: Tensor, y: Tensor) -> Tensor:
        return torch.stack([loss_fn(out[i : i + 1], y[i : i + 1]).reshape(()) for i in range(out.shape[0])])

    return losses


def mean_loss(lik: Optional[Likelihood], loss_fn: Optional[LossFn]) -> Callable[[Tensor, Tensor], Tensor]:
    """A scalar ``(out, y) -> loss``: mean NLL, or ``loss_fn`` itself."""
    if loss_fn is None:
        assert lik is not None
        return lambda out, y: lik.nll(out, y).mean()
    return loss_fn


@contextlib.contextmanager
def explained_errors(model: nn.Module, params: Params, x: Tensor, y: Optional[Tensor],
                     lik: Optional[Likelihood], bn_mode: str = "eval") -> Iterator[None]:
    """On failure inside, check shapes/labels against the likelihood and raise a clear error if they are wrong."""
    try:
        yield
    except (RuntimeError, IndexError) as exc:
        if lik is None:
            raise
        try:
            with torch.no_grad():
                out = call_model(model, {n: p.detach() for n, p in params.items()}, x[:1], bn_mode)
        except Exception:
            raise exc
        lik.check(out, y)  # raises ValueError naming the fix when that was the cause
        raise


# ---------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------
def autograd_grad(output: Tensor, inputs: Sequence[Tensor], *, create_graph: bool = False,
                  retain_graph: Optional[bool] = None) -> List[Tensor]:
    """``torch.autograd.grad`` (one backward unit) with unused inputs as zeros and a clear error."""
    if not output.requires_grad:
        raise RuntimeError(
            "the loss does not depend differentiably on the given weights (its graph is cut: detach, no_grad, "
            "integer or non-differentiable ops on the path from the weights to the output); check the model's "
            "forward and that the weights passed are the ones it uses"
        )
    gs = torch.autograd.grad(output, list(inputs), create_graph=create_graph, retain_graph=retain_graph,
                             allow_unused=True)
    _cost.record(backward=1, graph_backward=int(create_graph))
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, inputs)]


def hessian_vector(grads: Sequence[Tensor], inputs: Sequence[Tensor], vs: Sequence[Tensor], *,
                   what: str = "this diagnostic", retain_graph: bool = True) -> List[Tensor]:
    """``H v`` from gradients built with ``create_graph=True`` (one HVP unit)."""
    terms = [(g * v).sum() for g, v in zip(grads, vs) if g.requires_grad]
    if not terms:
        raise SecondOrderUnavailable(second_order_fix(
            what, "no gradient carries a graph back to the weights (the backward of some op leaves autograd; if "
            "the loss is truly linear in the weights the Hessian is zero and this diagnostic is uninformative)"))
    dot = terms[0]
    for t in terms[1:]:
        dot = dot + t
    try:
        hv = torch.autograd.grad(dot, list(inputs), retain_graph=retain_graph, allow_unused=True)
    except RuntimeError as exc:
        raise SecondOrderUnavailable(second_order_fix(what, str(exc).splitlines()[0])) from exc
    _cost.record(hvp=1)
    return [torch.zeros_like(p) if h is None else h for h, p in zip(hv, inputs)]


_NON_DIFFERENTIABLE_NODES = {"Error", "DelayedError", "NotImplemented"}


def check_twice_differentiable(tensors: Sequence[Tensor], what: str) -> None:
    """Raise :class:`SecondOrderUnavailable` if the graph behind ``tensors`` holds a node that cannot be
    differentiated (``@once_differentiable`` backward, ops without a derivative formula).

    Needed because ``torch.autograd.grad(..., inputs)`` silently skips such nodes when they do not lie on a
    path to ``inputs`` — as with ``@once_differentiable``, whose error node hangs off detached aliases — and
    would return a Hessian / meta-gradient with terms missing.
    """
    seen = set()
    stack = [t.grad_fn for t in tensors if isinstance(t, Tensor) and t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if type(fn).__name__ in _NON_DIFFERENTIABLE_NODES:
            raise SecondOrderUnavailable(second_order_fix(
                what, "the backward graph contains a node that cannot be differentiated again "
                f"({type(fn).__name__}: e.g. a custom autograd.Function marked @once_differentiable)"))
        stack.extend(nxt for nxt, _ in fn.next_functions)


def resolve_method(method: str, model: nn.Module, bn_mode: str) -> str:
    if method == "auto":
        return "jacrev" if (bn_mode == "batch" and has_batchnorm(model)) else "vmap"
    if method not in ("vmap", "jacrev", "loop"):
        raise ValueError(f"per_example must be 'auto', 'vmap', 'jacrev' or 'loop', got {method!r}")
    if method == "vmap" and bn_mode == "batch" and has_batchnorm(model):
        raise ValueError("per-example gradients by vmap evaluate one example at a time, which changes what "
                         "batch-statistics BatchNorm computes: use per_example='jacrev' (or 'auto') with bn_mode='batch'")
    return method


def per_example_grads(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Optional[Tensor],
    loss: Callable[[Tensor, Tensor], Tensor],
    *,
    bn_mode: str = "eval",
    method: str = "auto",
) -> Tuple[Params, Tensor]:
    """Per-example gradients ``∇_w loss(f_w(x_i), y_i)`` as ``name -> (n, *shape)``, and the outputs.

    ``loss(out, y) -> (examples,)`` is vectorised. Methods:

    * ``"vmap"`` — the reference ``vmap(grad(...))`` over single examples
      (1 forward + 1 backward unit);
    * ``"jacrev"`` — ``jacrev`` of the vector of per-example losses of one batch
      forward (1 forward + n backward units). The only correct choice when
      examples interact (BatchNorm on batch statistics): ∂ℓ_i/∂w then includes
      the effect of w on the batch statistics.
    * ``"loop"`` — plain ``torch.autograd.grad`` per example (n forward + n backward).
    """
    method = resolve_method(method, model, bn_mode)
    detached = {n: p.detach() for n, p in params.items()}
    n = x.shape[0]
    yy = y if y is not None else x.new_zeros(n)
    if method == "vmap":
        def single(p: Params, xi: Tensor, yi: Tensor) -> Tuple[Tensor, Tensor]:
            out = call_model(model, p, xi.unsqueeze(0), bn_mode)
            return loss(out, yi.unsqueeze(0)).sum(), out.squeeze(0)

        g, out = vmap(grad(single, has_aux=True), in_dims=(None, 0, 0))(detached, x, yy)
        _cost.record(backward=1)
        return dict(g), out
    if method == "jacrev":
        def all_losses(p: Params) -> Tuple[Tensor, Tensor]:
            out = call_model(model, p, x, bn_mode)
            return loss(out, yy), out

        g, out = jacrev(all_losses, has_aux=True)(detached)
        _cost.record(backward=n)
        return dict(g), out
    gs: Dict[str, List[Tensor]] = {k: [] for k in detached}
    outs = []
    for i in range(n):
        p = differentiable_copies(detached)
        out = call_model(model, p, x[i : i + 1], bn_mode)
        for k, gi in zip(p, autograd_grad(loss(out, yy[i : i + 1]).sum(), list(p.values()))):
            gs[k].append(gi)
        outs.append(out.detach().squeeze(0))
    return {k: torch.stack(v) for k, v in gs.items()}, torch.stack(outs)


def per_example_jacobians(
    model: nn.Module, params: Params, x: Tensor, *, bn_mode: str = "eval", method: str = "auto"
) -> Tuple[Params, Tensor]:
    """Per-example output Jacobians ``J_i = ∂f_w(x_i)/∂w`` as ``name -> (n, D, *shape)``, and the outputs.

    ``"vmap"``: 1 forward + D backward units; ``"jacrev"`` (examples interact):
    1 forward + n·D backward units.
    """
    method = resolve_method(method, model, bn_mode)
    detached = {k: p.detach() for k, p in params.items()}
    n = x.shape[0]
    if method == "jacrev":
        def outputs(p: Params) -> Tuple[Tensor, Tensor]:
            out = call_model(model, p, x, bn_mode)
            return out.reshape(n, -1), out

        J, out = jacrev(outputs, has_aux=True)(detached)
        _cost.record(backward=n * int(out[0].numel()))
        return dict(J), out

    def single(p: Params, xi: Tensor) -> Tuple[Tensor, Tensor]:
        out = call_model(model, p, xi.unsqueeze(0), bn_mode).squeeze(0)
        return out.reshape(-1), out

    if method == "loop":
        raise ValueError("per-example Jacobians support per_example='vmap', 'jacrev' or 'auto'")
    J, out = vmap(jacrev(single, has_aux=True), in_dims=(None, 0))(detached, x)
    _cost.record(backward=int(out[0].numel()))
    return dict(J), out


# ---------------------------------------------------------------------------------------
# a reference adaptation: plain SGD
# ---------------------------------------------------------------------------------------
class SGDAdapt:
    """``adapt(params, x, y) -> params``: ``steps`` steps of plain gradient descent on the support loss.

    ``φ_{k+1} = φ_k − lr·∇ L_S(φ_k)`` (the update rule of :class:`diffopt.optim.SGD`) with
    ``L_S`` the mean loss (``loss_fn``, or the likelihood's mean NLL). When the given weights require grad the steps
    are built with ``create_graph=True`` so second-order meta-gradients flow
    back to them (unless ``first_order=True``); otherwise no graph is kept.
    ``step(params, x, y)`` is one step, so diagnostics can record per-step values.
    Inside a diagnostic the model runs in the diagnostic's evaluation mode;
    called directly, the model's own train/eval mode applies.

    Cost per call: ``steps`` forwards and ``steps`` backwards.
    """

    counts_itself = True  # records its own adapt unit

    def __init__(self, model: nn.Module, lr: float, steps: int = 1, *, loss_fn: Optional[LossFn] = None,
                 likelihood: Optional[Likelihood] = None, bn_mode: str = "eval", first_order: bool = False) -> None:
        if loss_fn is None and likelihood is None:
            raise ValueError("sgd_adapt needs loss_fn= or likelihood=")
        self.model, self.lr, self.steps = model, lr, int(steps)
        # the update is diffopt.optim.SGD's rule (no momentum, no weight decay): φ − lr·g
        self.rule = SGDRule()
        self.hyper = {**SGDRule.defaults, "lr": lr}
        self.lik = likelihood if loss_fn is None else None
        self.loss = mean_loss(likelihood, loss_fn)
        self.bn_mode, self.first_order = bn_mode, first_order

    def step(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Params:
        params = dict(params)
        graph = torch.is_grad_enabled() and any(p.requires_grad for p in params.values())
        current = params if graph else differentiable_copies(params)
        if graph and not all(p.requires_grad for p in current.values()):
            current = {n: (p if p.requires_grad else p.detach().requires_grad_(True)) for n, p in current.items()}
        with torch.enable_grad():
            out = call_model(self.model, current, x, self.bn_mode)
            if self.lik is not None:
                self.lik.check(out, y)
            loss = self.loss(out, y)
            gs = autograd_grad(loss, list(current.values()), create_graph=graph and not self.first_order)
        if graph and not self.first_order and not any(g.requires_grad for g in gs):
            raise SecondOrderUnavailable(second_order_fix(
                "a differentiable inner step", "the inner gradient carries no graph back to the weights (the "
                "backward of some op leaves autograd; a loss linear in the weights has a zero Hessian)"))
        new = {n: self.rule.update_one(p, g, self.rule.init_state(p, self.hyper), self.hyper)[0]
               for (n, p), g in zip(current.items(), gs)}
        return new if graph else {n: p.detach() for n, p in new.items()}

    def __call__(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Params:
        _cost.record(adapt=1)
        params = dict(params)
        for _ in range(self.steps):
            params = self.step(params, x, y)
        return params

    def __repr__(self) -> str:
        return f"sgd_adapt(lr={self.lr}, steps={self.steps})"


def sgd_adapt(model: nn.Module, lr: float, steps: int = 1, *, loss_fn: Optional[LossFn] = None,
              likelihood: Any = "categorical", sigma: Optional[float] = None, bn_mode: str = "eval",
              first_order: bool = False) -> SGDAdapt:
    """A plain-SGD ``adapt(params, x, y) -> params`` for the diagnostics (see :class:`SGDAdapt`)."""
    from ._likelihood import resolve_likelihood

    lik = None if loss_fn is not None else resolve_likelihood(likelihood, sigma, what="sgd_adapt")
    return SGDAdapt(model, lr, steps, loss_fn=loss_fn, likelihood=lik, bn_mode=bn_mode, first_order=first_order)


def call_adapt(adapt: Callable, params: Params, x: Tensor, y: Tensor) -> Params:
    """Call a user ``adapt`` (counted as one adapt unit unless it counts itself) and normalise its result."""
    if not getattr(adapt, "counts_itself", False):
        _cost.record(adapt=1)
    out = adapt(dict(params), x, y)
    if isinstance(out, Mapping):
        missing = [n for n in params if n not in out]
        if missing:
            raise ValueError(f"adapt returned weights without {missing}; it must return a dict with the same names")
        return {n: out[n] for n in params}
    if isinstance(out, (list, tuple)) and len(out) == len(params) and all(isinstance(t, Tensor) for t in out):
        return dict(zip(params, out))
    raise TypeError("adapt(params, x, y) must return a dict name -> tensor (or a list in the same order)")


def resolve_generator(generator: Optional[torch.Generator], seed: int, device: Any = "cpu") -> torch.Generator:
    """An explicit generator (never the global one): the given one, or a fresh one seeded with ``seed``."""
    if generator is not None:
        return generator
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def device_of(params: Params) -> torch.device:
    for p in params.values():
        return p.device
    return torch.device("cpu")

