"""Reusable hypothesis strategies and reference runners for testing diffopt.

Everything here is generic so that it can later move into a public
``diffopt.testing`` module:

* :func:`optimizer_configs` — valid torch.optim keyword arguments (numbers and
  flags) for each of the eleven optimizers, covering every option;
* :func:`hyper_cases` — configurations whose differentiable hyperparameters sit
  where finite differences are well conditioned, with the list of
  hyperparameters to turn into learnable tensors;
* :func:`problems` / :func:`mlp_problems` — small smooth float64 problems (tanh
  networks, cross-entropy), optionally with tied weights, frozen parameters,
  parameters the loss does not use and rows whose gradient is exactly zero;
* runners for torch.optim and for the twin, error measures, a conditioning
  check for parity, and central finite differences.

All problems are float64 and every tensor is created with an explicit dtype, so
they behave the same whatever ``torch.get_default_dtype()`` is.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import reject
from hypothesis import strategies as st
from torch import Tensor

import diffopt

F64 = torch.float64

OPTIMIZER_NAMES: tuple[str, ...] = (
    "SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam", "RMSprop", "Rprop", "ASGD",
)

#: Optimizers whose denominators take a square root of an accumulated square.
SQRT_OPTIMIZERS: tuple[str, ...] = ("Adam", "AdamW", "Adagrad", "Adadelta", "NAdam", "RAdam", "RMSprop")


def torch_class(name: str) -> type[torch.optim.Optimizer]:
    return getattr(torch.optim, name)


def twin_class(name: str) -> type[diffopt.optim.DifferentiableOptimizer]:
    return diffopt.optim.OPTIMIZERS[name]


def examples(n: int) -> int:
    """``n`` hypothesis examples, scaled by the environment variable ``DIFFOPT_TEST_SCALE``."""
    return max(1, round(n * float(os.environ.get("DIFFOPT_TEST_SCALE", "1"))))


# -- measured errors (printed by conftest when DIFFOPT_ERROR_REPORT=1) ----------------------

MEASURED: dict[tuple[str, str], float] = defaultdict(float)
COUNTS: dict[tuple[str, str], int] = defaultdict(int)


def record(kind: str, name: str, value: float) -> float:
    """Remember the worst ``value`` seen for (``kind``, ``name``); returns ``value``."""
    key = (kind, name)
    MEASURED[key] = max(MEASURED[key], float(value))
    return float(value)


# -- numbers -----------------------------------------------------------------------------------

def floats(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def log_floats(low: float, high: float) -> st.SearchStrategy[float]:
    """Floats spread evenly in log scale over ``[low, high]``."""
    return floats(math.log(low), math.log(high)).map(lambda v: min(max(math.exp(v), low), high))


def zero_or(strategy: st.SearchStrategy[float]) -> st.SearchStrategy[float]:
    return st.one_of(st.just(0.0), strategy)


def default_or(default: float, strategy: st.SearchStrategy[float]) -> st.SearchStrategy[float]:
    return st.one_of(st.just(default), strategy)


# -- torch.optim configurations ---------------------------------------------------------------

@st.composite
def _betas(draw: st.DrawFn) -> tuple[float, float]:
    return (draw(default_or(0.9, floats(0.0, 0.99))), draw(default_or(0.999, floats(0.5, 0.9999))))


_WD = zero_or(log_floats(1e-4, 0.1))
_EPS_ADAM = default_or(1e-8, log_floats(1e-10, 1e-3))


@st.composite
def _sgd(draw: st.DrawFn) -> dict[str, Any]:
    momentum = draw(zero_or(floats(0.05, 0.95)))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov else draw(zero_or(floats(0.05, 0.9)))
    return {"lr": draw(log_floats(1e-3, 0.2)), "momentum": momentum, "dampening": dampening,
            "weight_decay": draw(_WD), "nesterov": nesterov, "maximize": draw(st.booleans())}


@st.composite
def _adam(draw: st.DrawFn, decoupled_option: bool = True) -> dict[str, Any]:
    cfg = {"lr": draw(log_floats(1e-3, 0.1)), "betas": draw(_betas()), "eps": draw(_EPS_ADAM),
           "weight_decay": draw(_WD), "amsgrad": draw(st.booleans()), "maximize": draw(st.booleans())}
    if decoupled_option:
        cfg["decoupled_weight_decay"] = draw(st.booleans())
    return cfg


@st.composite
def _adagrad(draw: st.DrawFn) -> dict[str, Any]:
    return {"lr": draw(log_floats(1e-3, 0.3)), "lr_decay": draw(zero_or(floats(1e-3, 0.5))),
            "weight_decay": draw(_WD), "initial_accumulator_value": draw(zero_or(floats(1e-3, 1.0))),
            "eps": draw(default_or(1e-10, log_floats(1e-12, 1e-3))), "maximize": draw(st.booleans())}


@st.composite
def _adadelta(draw: st.DrawFn) -> dict[str, Any]:
    return {"lr": draw(log_floats(0.05, 2.0)), "rho": draw(default_or(0.9, floats(0.0, 0.99))),
            "eps": draw(default_or(1e-6, log_floats(1e-9, 1e-3))), "weight_decay": draw(_WD),
            "maximize": draw(st.booleans())}


@st.composite
def _adamax(draw: st.DrawFn) -> dict[str, Any]:
    return {"lr": draw(log_floats(1e-3, 0.1)), "betas": draw(_betas()), "eps": draw(_EPS_ADAM),
            "weight_decay": draw(_WD), "maximize": draw(st.booleans())}


@st.composite
def _nadam(draw: st.DrawFn) -> dict[str, Any]:
    return {"lr": draw(log_floats(1e-3, 0.1)), "betas": draw(_betas()), "eps": draw(_EPS_ADAM),
            "weight_decay": draw(_WD), "momentum_decay": draw(default_or(4e-3, floats(0.0, 0.1))),
            "decoupled_weight_decay": draw(st.booleans()), "maximize": draw(st.booleans())}


@st.composite
def _radam(draw: st.DrawFn) -> dict[str, Any]:
    return {"lr": draw(log_floats(1e-3, 0.1)), "betas": draw(_betas()), "eps": draw(_EPS_ADAM),
            "weight_decay": draw(_WD), "decoupled_weight_decay": draw(st.booleans()),
            "maximize": draw(st.booleans())}


@st.composite
def _rmsprop(draw: st.DrawFn) -> dict[str, Any]:
    centered = draw(st.booleans())
    # Centered RMSprop with a small alpha divides by sqrt(v - g_avg^2), a difference of
    # nearly equal numbers: torch's own trajectory then moves by more than 1e-10 when the
    # initial weights move by 1e-15 relative (measured), so 1e-10 parity is not defined there.
    alpha = draw(default_or(0.99, floats(0.5 if centered else 0.05, 0.999)))
    return {"lr": draw(log_floats(1e-3, 0.05)), "alpha": alpha, "eps": draw(_EPS_ADAM), "weight_decay": draw(_WD),
            "momentum": draw(zero_or(floats(0.05, 0.95))), "centered": centered, "maximize": draw(st.booleans())}


@st.composite
def _rprop(draw: st.DrawFn) -> dict[str, Any]:
    etas = (draw(default_or(0.5, floats(0.1, 0.9))), draw(default_or(1.2, floats(1.05, 2.0))))
    sizes = (draw(default_or(1e-6, log_floats(1e-8, 1e-3))), draw(default_or(50.0, log_floats(0.02, 50.0))))
    return {"lr": draw(log_floats(1e-3, 0.1)), "etas": etas, "step_sizes": sizes, "maximize": draw(st.booleans())}


@st.composite
def _asgd(draw: st.DrawFn) -> dict[str, Any]:
    return {"lr": draw(log_floats(1e-3, 0.2)), "lambd": draw(default_or(1e-4, floats(0.0, 0.5))),
            "alpha": draw(default_or(0.75, floats(0.0, 1.5))),
            "t0": draw(st.one_of(st.just(1e6), st.integers(0, 15).map(float))),
            "weight_decay": draw(_WD), "maximize": draw(st.booleans())}


@st.composite
def _adafactor(draw: st.DrawFn) -> dict[str, Any]:
    eps1 = draw(st.one_of(st.none(), log_floats(1e-30, 1e-3)))
    return {"lr": draw(log_floats(1e-3, 0.1)), "beta2_decay": draw(default_or(-0.8, floats(-1.0, -0.1))),
            "eps": (eps1, draw(default_or(1e-3, log_floats(1e-5, 0.1)))), "d": draw(default_or(1.0, floats(1.0, 3.0))),
            "weight_decay": draw(_WD), "maximize": draw(st.booleans())}


@st.composite
def _muon(draw: st.DrawFn) -> dict[str, Any]:
    return {"lr": draw(log_floats(1e-3, 0.05)), "weight_decay": draw(default_or(0.1, zero_or(floats(1e-3, 0.3)))),
            "momentum": draw(default_or(0.95, floats(0.0, 0.99))), "nesterov": draw(st.booleans()),
            "ns_steps": draw(default_or(5, st.integers(0, 7))), "eps": draw(default_or(1e-7, log_floats(1e-9, 1e-3))),
            "adjust_lr_fn": draw(st.sampled_from([None, "original", "match_rms_adamw"]))}


_CONFIGS: dict[str, Callable[[], st.SearchStrategy[dict[str, Any]]]] = {
    "SGD": _sgd, "Adam": _adam, "AdamW": lambda: _adam(decoupled_option=False), "Adagrad": _adagrad,
    "Adadelta": _adadelta, "Adamax": _adamax, "NAdam": _nadam, "RAdam": _radam, "RMSprop": _rmsprop,
    "Rprop": _rprop, "ASGD": _asgd, "Adafactor": _adafactor, "Muon": _muon,
}


@st.composite
def _with_flags(draw: st.DrawFn, name: str, flags: dict[str, bool]) -> dict[str, Any]:
    config = draw(_CONFIGS[name]())
    config.update(flags)
    if name == "SGD" and config["nesterov"]:
        if config["momentum"] == 0:
            config["momentum"] = draw(floats(0.05, 0.95))
        config["dampening"] = 0.0
    return config


def optimizer_configs(name: str, **flags: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Valid keyword arguments for ``torch.optim.<name>`` (and its twin), every option covered.

    ``flags`` fixes boolean options (``nesterov=True`` also makes momentum positive
    and dampening zero, as torch requires).
    """
    return _with_flags(name, flags) if flags else _CONFIGS[name]()


def boolean_options(name: str) -> list[str]:
    """The boolean options of ``torch.optim.<name>`` that the twin mirrors."""
    options = sorted(twin_class(name).rule_class.flags)
    if name == "AdamW":  # torch.optim.AdamW fixes decoupled weight decay
        options.remove("decoupled_weight_decay")
    return options


def flag_combinations(name: str) -> list[dict[str, bool]]:
    """Every combination of :func:`boolean_options` of ``name``."""
    options = boolean_options(name)
    return [
        {option: bool(bits >> k & 1) for k, option in enumerate(options)} for bits in range(2 ** len(options))
    ]


# -- differentiable hyperparameters -----------------------------------------------------------

#: Where each optimizer's differentiable hyperparameters live: ``(key,)`` or ``(key, index)``,
#: with a range in which the loss depends smoothly and noticeably on them.
HYPER_RANGES: dict[str, dict[tuple[Any, ...], tuple[float, float]]] = {
    "SGD": {("lr",): (0.02, 0.3), ("momentum",): (0.2, 0.9), ("dampening",): (0.1, 0.8),
            ("weight_decay",): (0.01, 0.3)},
    "Adam": {("lr",): (0.02, 0.1), ("betas", 0): (0.5, 0.95), ("betas", 1): (0.8, 0.999),
             ("eps",): (1e-3, 0.1), ("weight_decay",): (0.1, 1.0)},
    "Adagrad": {("lr",): (0.02, 0.3), ("lr_decay",): (0.01, 0.5), ("weight_decay",): (0.1, 1.0),
                ("initial_accumulator_value",): (0.01, 1.0), ("eps",): (1e-3, 0.1)},
    "Adadelta": {("lr",): (0.2, 2.0), ("rho",): (0.5, 0.95), ("eps",): (1e-4, 1e-2),
                 ("weight_decay",): (0.1, 1.0)},
    "Adamax": {("lr",): (0.02, 0.1), ("betas", 0): (0.5, 0.95), ("betas", 1): (0.9, 0.999),
               ("eps",): (1e-3, 0.1), ("weight_decay",): (0.1, 1.0)},
    "NAdam": {("lr",): (0.02, 0.1), ("betas", 0): (0.5, 0.95), ("betas", 1): (0.8, 0.999),
              ("eps",): (1e-3, 0.1), ("weight_decay",): (0.1, 1.0), ("momentum_decay",): (0.1, 1.0)},
    "RAdam": {("lr",): (0.02, 0.1), ("betas", 0): (0.5, 0.95), ("betas", 1): (0.99, 0.999),
              ("eps",): (0.01, 0.5), ("weight_decay",): (0.1, 1.0)},
    "RMSprop": {("lr",): (0.01, 0.05), ("alpha",): (0.5, 0.99), ("eps",): (1e-3, 0.1),
                ("weight_decay",): (0.1, 1.0), ("momentum",): (0.1, 0.9)},
    "Rprop": {("lr",): (0.05, 0.3), ("etas", 0): (0.3, 0.8), ("etas", 1): (1.1, 1.5),
              ("step_sizes", 1): (0.05, 0.2)},
    "ASGD": {("lr",): (0.05, 0.3), ("lambd",): (0.1, 1.0), ("alpha",): (0.25, 1.0),
             ("weight_decay",): (0.3, 2.0)},
}
HYPER_RANGES["AdamW"] = HYPER_RANGES["Adam"]
# Adafactor and Muon (not in OPTIMIZER_NAMES: Muon takes matrices only, and their tests live in
# tests/test_optim_adafactor_muon.py).
HYPER_RANGES["Adafactor"] = {("lr",): (0.01, 0.1), ("beta2_decay",): (-0.9, -0.3), ("weight_decay",): (0.1, 1.0)}
HYPER_RANGES["Muon"] = {("lr",): (0.01, 0.05), ("momentum",): (0.5, 0.95), ("weight_decay",): (0.05, 0.5)}


def path_name(path: Sequence[Any]) -> str:
    return path[0] if len(path) == 1 else f"{path[0]}[{path[1]}]"


def get_path(config: dict[str, Any], path: Sequence[Any]) -> Any:
    value = config[path[0]]
    return value if len(path) == 1 else value[path[1]]


def set_path(config: dict[str, Any], path: Sequence[Any], value: Any) -> dict[str, Any]:
    """A copy of ``config`` with the entry at ``path`` replaced."""
    out = dict(config)
    if len(path) == 1:
        out[path[0]] = value
    else:
        pair = list(out[path[0]])
        pair[path[1]] = value
        out[path[0]] = tuple(pair)
    return out


@dataclass
class HyperCase:
    """A configuration plus the hyperparameters to make learnable."""

    name: str
    config: dict[str, Any]
    paths: list[tuple[Any, ...]]

    def with_values(self, values: Sequence[Any]) -> dict[str, Any]:
        config = dict(self.config)
        for path, value in zip(self.paths, values):
            config = set_path(config, path, value)
        return config

    def tensors(self, requires_grad: bool = True) -> list[Tensor]:
        return [torch.tensor(get_path(self.config, p), dtype=F64, requires_grad=requires_grad) for p in self.paths]


@st.composite
def hyper_cases(draw: st.DrawFn, name: str, all_paths: bool = False) -> HyperCase:
    """A configuration of ``name`` with its differentiable hyperparameters in FD-friendly ranges.

    ``paths`` lists the hyperparameters to make learnable: ``lr`` always, and
    every other one when ``all_paths`` (otherwise a drawn non-empty subset).
    """
    config = draw(optimizer_configs(name))
    ranges = HYPER_RANGES[name]
    for path, (low, high) in ranges.items():
        config = set_path(config, path, draw(log_floats(low, high)))
    if name == "SGD" and config["nesterov"]:
        config["dampening"] = 0.0
    if name == "Rprop":
        # Make the step-size ceiling bind after one to three growing steps, so that it matters;
        # the exponent stays away from integers, where lr * up**j == ceiling is a kink.
        lr, up = config["lr"], config["etas"][1]
        config["step_sizes"] = (1e-6, lr * up ** (draw(st.integers(0, 2)) + draw(floats(0.2, 0.8))))
    if name == "ASGD":
        config["t0"] = float(draw(st.integers(0, 2)))
    paths = list(ranges)
    if name == "SGD" and config["nesterov"]:
        paths.remove(("dampening",))
    if name == "Rprop":
        paths = [p for p in paths if p != ("step_sizes", 1)] + [("step_sizes", 1)]
    if not all_paths:
        others = [p for p in paths if p != ("lr",)]
        chosen = draw(st.lists(st.sampled_from(others), unique=True, max_size=len(others))) if others else []
        paths = [("lr",)] + [p for p in others if p in chosen]
    return HyperCase(name, config, paths)


# -- problems ---------------------------------------------------------------------------------

@dataclass
class Problem:
    """Initial parameters (float64 leaves) and a smooth loss of the parameter list."""

    params: list[Tensor]
    loss: Callable[[Sequence[Tensor]], Tensor]
    names: list[str]
    groups: list[list[int]] = field(default_factory=list)
    unused: list[int] = field(default_factory=list)
    frozen: list[int] = field(default_factory=list)

    def fresh(self) -> list[Tensor]:
        """New leaf copies of the initial parameters (same ``requires_grad``)."""
        return [p.detach().clone().requires_grad_(p.requires_grad) for p in self.params]

    def grouped(self, params: Sequence[Tensor], group_configs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Parameter-group dicts over ``params`` with one config per group."""
        groups = self.groups or [list(range(len(params)))]
        configs = list(group_configs) + [{}] * (len(groups) - len(group_configs))
        return [{"params": [params[i] for i in idx], **cfg} for idx, cfg in zip(groups, configs)]


def _randn(generator: torch.Generator, *shape: int, scale: float = 0.5) -> Tensor:
    return torch.randn(*shape, generator=generator, dtype=F64) * scale


@st.composite
def problems(
    draw: st.DrawFn,
    *,
    tied: bool | None = None,
    frozen: bool | None = None,
    unused: bool | None = None,
    sparse: bool | None = None,
    min_groups: int = 1,
    max_groups: int = 2,
) -> Problem:
    """A small embedding -> tanh -> decoder network with cross-entropy loss.

    Options (drawn when ``None``): ``tied`` decodes with the embedding matrix
    itself (the same tensor used twice); ``frozen`` adds a used parameter with
    ``requires_grad=False``; ``unused`` adds a parameter the loss ignores;
    ``sparse`` adds a table of which only some rows are used, so the other rows
    have a gradient of exactly zero. Parameters are split into one or more groups.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    tied = draw(st.booleans()) if tied is None else tied
    frozen = draw(st.booleans()) if frozen is None else frozen
    unused = draw(st.booleans()) if unused is None else unused
    sparse = draw(st.booleans()) if sparse is None else sparse
    n_groups = draw(st.integers(min_groups, max_groups))
    g = torch.Generator().manual_seed(seed)
    vocab, dim, n = 5, 3, 6
    idx = torch.randint(0, vocab, (n,), generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    names = ["embedding", "hidden.weight", "hidden.bias"]
    params = [_randn(g, vocab, dim), _randn(g, dim, dim), _randn(g, dim, scale=0.1)]
    slots: dict[str, int] = {}
    if not tied:
        slots["decoder"] = len(params)
        names.append("decoder.weight")
        params.append(_randn(g, vocab, dim))
    if sparse:
        slots["table"] = len(params)
        names.append("table")
        params.append(_randn(g, 6, dim))
        rows = torch.randint(0, 3, (n,), generator=g)  # rows 3..5 never used: exactly zero gradient
    if frozen:
        slots["frozen"] = len(params)
        names.append("frozen.scale")
        params.append((1 + _randn(g, dim, scale=0.2)).requires_grad_(False))
    if unused:
        slots["unused"] = len(params)
        names.append("unused")
        params.append(_randn(g, 2, 2))
    for i, p in enumerate(params):
        p.requires_grad_(i != slots.get("frozen"))

    def loss(ps: Sequence[Tensor]) -> Tensor:
        emb = ps[0]
        h = torch.tanh(emb[idx] @ ps[1].T + ps[2])
        if "table" in slots:
            h = h + torch.tanh(ps[slots["table"]][rows])
        if "frozen" in slots:
            h = h * ps[slots["frozen"]]
        decoder = emb if tied else ps[slots["decoder"]]
        logits = h @ decoder.T
        return torch.nn.functional.cross_entropy(logits, targets) + 0.01 * (emb * emb).sum()

    order = list(range(len(params)))
    if n_groups > 1:
        cut = draw(st.integers(1, len(params) - 1))
        groups = [order[:cut], order[cut:]]
    else:
        groups = [order]
    return Problem(params, loss, names, groups,
                   unused=[slots["unused"]] if unused else [], frozen=[slots["frozen"]] if frozen else [])


@st.composite
def mlp_problems(draw: st.DrawFn, hidden: int = 4, n: int = 8) -> Problem:
    """A one-hidden-layer tanh regression network (smooth everywhere), parameters in one group."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x, y = _randn(g, n, 3, scale=1.0), _randn(g, n, 1, scale=1.0)
    params = [_randn(g, hidden, 3, scale=0.7), _randn(g, hidden, scale=0.1), _randn(g, 1, hidden, scale=1.0),
              _randn(g, 1, scale=0.1)]
    for p in params:
        p.requires_grad_(True)

    def loss(ps: Sequence[Tensor]) -> Tensor:
        h = torch.tanh(x @ ps[0].T + ps[1])
        return ((h @ ps[2].T + ps[3] - y) ** 2).mean()

    return Problem(params, loss, ["w1", "b1", "w2", "b2"], [list(range(4))])


# -- runners ----------------------------------------------------------------------------------

def split_defaults(configs: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Constructor defaults (the first config) and per-group overrides (group k > 0 gets ``configs[k]``)."""
    return dict(configs[0]), [{}] + [dict(c) for c in configs[1:]]


def torch_run(name: str, problem: Problem, configs: Sequence[dict[str, Any]], steps: int,
              params: list[Tensor] | None = None,
              before_step: Callable[[list[Tensor]], None] | None = None,
              ) -> tuple[list[list[Tensor]], torch.optim.Optimizer, list[Tensor]]:
    """``steps`` steps of ``torch.optim.<name>``; returns the trajectory, the optimizer and the params."""
    params = problem.fresh() if params is None else params
    defaults, overrides = split_defaults(configs)
    opt = torch_class(name)(problem.grouped(params, overrides), **defaults)
    trajectory = []
    for _ in range(steps):
        opt.zero_grad()
        problem.loss(params).backward()
        if before_step is not None:
            before_step(params)
        opt.step()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory, opt, params


def twin_run(name: str, problem: Problem, configs: Sequence[dict[str, Any]], steps: int,
             params: list[Tensor] | None = None, **options: Any,
             ) -> tuple[list[list[Tensor]], diffopt.optim.DifferentiableOptimizer, list[Tensor]]:
    """``steps`` differentiable steps of the twin; returns the trajectory, the optimizer and the last params."""
    params = problem.fresh() if params is None else params
    defaults, overrides = split_defaults(configs)
    opt = twin_class(name)(problem.grouped(params, overrides), **defaults, **options)
    trajectory, current = [], params
    for _ in range(steps):
        current = opt.step(problem.loss(current))
        trajectory.append([p.detach() for p in current])
    return trajectory, opt, current


def continue_twin(opt: diffopt.optim.DifferentiableOptimizer, problem: Problem, steps: int,
                  params: list[Tensor] | None = None) -> list[list[Tensor]]:
    current = list(opt.params) if params is None else params
    trajectory = []
    for _ in range(steps):
        current = opt.step(problem.loss(current), params=current)
        trajectory.append([p.detach() for p in current])
    return trajectory


def continue_torch(opt: torch.optim.Optimizer, problem: Problem, params: list[Tensor],
                   steps: int) -> list[list[Tensor]]:
    trajectory = []
    for _ in range(steps):
        opt.zero_grad()
        problem.loss(params).backward()
        opt.step()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory


# -- error measures ---------------------------------------------------------------------------

def parity_error(ours: Tensor, reference: Tensor) -> float:
    """``max |ours - ref| / max(1, |ref|)``: absolute for |ref| <= 1, relative above."""
    ours, reference = ours.detach().to(F64), reference.detach().to(F64)
    if ours.shape != reference.shape:
        raise AssertionError(f"shape {tuple(ours.shape)} != {tuple(reference.shape)}")
    if ours.numel() == 0:
        return 0.0
    return float(((ours - reference).abs() / reference.abs().clamp(min=1.0)).max())


def trajectory_error(ours: Sequence[Sequence[Tensor]], reference: Sequence[Sequence[Tensor]]) -> float:
    assert len(ours) == len(reference)
    return max(parity_error(a, b) for step_a, step_b in zip(ours, reference) for a, b in zip(step_a, step_b))


def torch_states(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[dict[str, Any] | None]:
    """torch.optim's per-parameter state, in parameter order (``None`` where it has none)."""
    return [dict(opt.state[p]) if opt.state.get(p) else None for p in params]


def state_error(ours: Sequence[dict[str, Any] | None], reference: Sequence[dict[str, Any] | None]) -> float:
    """Worst difference between two lists of optimizer states, asserting the same keys.

    ``ours`` may be a twin's ``state`` (``step`` as an int, ASGD's ``eta``/``mu`` as
    floats) and ``reference`` torch's (:func:`torch_states`).
    """
    worst = 0.0
    for i, (mine, theirs) in enumerate(zip(ours, reference)):
        if not theirs:
            assert not mine or all(
                v is None for v in mine.values() if not isinstance(v, (int, float))
            ), f"param {i}: the reference has no state, ours has {sorted(mine)}"
            continue
        assert mine is not None and set(theirs) == set(mine), (
            f"param {i}: state keys {sorted(mine or {})} != reference {sorted(theirs)}"
        )
        for key, value in theirs.items():
            if value is None or mine[key] is None:
                assert value is None and mine[key] is None, key
                continue
            worst = max(worst, parity_error(torch.as_tensor(mine[key]).to(F64), torch.as_tensor(value).to(F64)))
    return worst


def torch_sensitivity(name: str, problem: Problem, configs: Sequence[dict[str, Any]], steps: int,
                      reference: tuple[Sequence[Sequence[Tensor]], Sequence[dict[str, Any] | None]],
                      tries: int = 2, seed: int = 0) -> float:
    """How far torch.optim's own trajectory and final state (``reference``) move when the
    initial weights move by ~1e-15 relative.

    A measure of conditioning: where this exceeds the parity tolerance, two
    implementations that differ by rounding alone cannot agree to that tolerance.
    """
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(tries):
        perturbed = [
            (p.detach() * (1 + 1e-15 * torch.randn(p.shape, generator=g, dtype=F64))).requires_grad_(p.requires_grad)
            for p in problem.params
        ]
        moved, opt, moved_params = torch_run(name, problem, configs, steps, params=perturbed)
        worst = max(worst, trajectory_error(moved, reference[0]),
                    state_error(torch_states(opt, moved_params), reference[1]))
    return worst


def discard_if_ill_conditioned(
    error: float, name: str, problem: Problem, configs: Sequence[dict[str, Any]], steps: int,
    reference: tuple[Sequence[Sequence[Tensor]], Sequence[dict[str, Any] | None]], tol: float = 1e-10,
) -> None:
    """Discard (``hypothesis.reject()``) an example whose parity ``error`` exceeds ``tol`` only
    because torch.optim's own trajectory is ill-conditioned there.

    Rounding-level differences (a fused ``addcmul`` against ``mul`` + ``add``, ...) are
    amplified by ill-conditioned trajectories (e.g. maximize driving centered RMSprop's
    variance towards 0). If torch's own ``steps``-step trajectory or final state
    (``reference``) moves by more than ``tol / 10`` when the initial weights move by
    1e-15 relative, parity to ``tol`` is not defined for the example. Discards are
    counted in ``COUNTS``; an error above ``tol`` on a well-conditioned example is left
    for the caller to fail on.
    """
    if error > tol and torch_sensitivity(name, problem, configs, steps, reference) > tol / 10:
        COUNTS[("ill-conditioned, discarded", name)] += 1
        reject()


def central_differences(f: Callable[[float], Any], scale: float = 1.0,
                        steps: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3)) -> Iterator[float]:
    """Central differences ``(f(h) - f(-h)) / 2h`` of ``t -> f(t)`` at 0 for ``h = c * scale``, c in
    ``steps`` (smallest first), each followed by the Richardson extrapolation of it and the
    previous one, ``(r^2 D(c_prev) - D(c)) / (r^2 - 1)`` with ``r = c / c_prev``; lazily."""
    scale = float(scale)
    previous = None
    for c in steps:
        h = c * scale
        d = (float(f(h)) - float(f(-h))) / (2 * h)
        yield d
        if previous is not None:
            ratio2 = (c / previous[0]) ** 2
            yield (ratio2 * previous[1] - d) / (ratio2 - 1)
        previous = (c, d)


def random_like(tensors: Sequence[Tensor], seed: int, unit: bool = False) -> list[Tensor]:
    """N(0, 1) tensors shaped like ``tensors``; with ``unit``, scaled to unit norm together."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(t.shape, generator=g, dtype=F64) for t in tensors]
    if unit:
        norm = math.sqrt(sum(float((o * o).sum()) for o in out))
        out = [o / norm for o in out]
    return out
