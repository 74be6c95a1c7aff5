"""Saving and loading learned rules: plain tensors and a JSON config, never pickled code.

A file is a ``torch.save`` of::

    {"format": "diffopt-learned-rule", "version": 1, "kind": "mlp",
     "config": "<JSON text>", "features": ["grad", ...], "metadata": "<JSON text>",
     "tensors": {"weight.0": Tensor, ...}, "diffopt_version": "0.1.0"}

read back with ``torch.load(weights_only=True)``. Loading refuses, with a
message that says why, a file that is not a learned rule, one from another
format version, one of an unknown kind, one whose feature set differs from
what this code computes for its kind (or from the ``features=`` the caller
expects), one whose tensors do not match its config — checked from the config
alone, on PyTorch's ``meta`` device, before any network is built, so a small file
claiming ``hidden=[30000, 30000]`` allocates nothing —, one whose tensors hold NaN
or infinity, and (for rules with per-parameter tensors) parameters of other
shapes than it was trained for. A file that is empty, truncated, corrupt, not a
``torch.save`` file or that contains pickled code gets one line saying which
(:func:`diffopt._io.safe_load`). Files are written atomically (:func:`diffopt._io.atomic_save`, as training checkpoints are).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..._io import atomic_save, non_finite_tensors, safe_load
from ..._version import __version__
from .._hyper import PerParameter
from ..optimizer import DifferentiableOptimizer
from .curvature import MetaCurvature, factor_shapes
from .factory import RULES
from .hypergradient import HypergradientAdam, HypergradientSGD
from .lr import LearnedSGD, meta_sgd, per_layer_per_step
from .lstm import LSTM_FEATURES, LSTMOptimizer, LSTMRuleNet
from .mlp import MLP_FEATURES, MLPOptimizer, MLPRuleNet
from ...errors import LearnedRuleError

__all__ = ["FORMAT", "VERSION", "KINDS", "LearnedRuleError", "SavedRule", "read", "save", "load_differentiable",
           "to_payload", "from_payload", "build", "export", "live_tensors", "transfer"]

FORMAT = "diffopt-learned-rule"
VERSION = 1
KINDS = RULES


@dataclass
class SavedRule:
    kind: str
    config: dict[str, Any]
    features: list[str]
    tensors: dict[str, Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION


# -- export ---------------------------------------------------------------------------------
def _unwrap(optimizer: Any) -> DifferentiableOptimizer:
    inner = getattr(optimizer, "functional", None)
    return inner if isinstance(inner, DifferentiableOptimizer) else optimizer


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def live_tensors(optimizer: Any) -> dict[str, Tensor]:
    """The learned tensors of ``optimizer`` by their saved names (the live tensors, not copies)."""
    opt = _unwrap(optimizer)
    if isinstance(opt, (LSTMOptimizer, MLPOptimizer)):
        return dict(zip(opt.net.weight_names(), opt.net.weights()))
    if isinstance(opt, LearnedSGD):
        return {f"lr.{i}": t for i, t in enumerate(opt.lrs)}
    out: dict[str, Tensor] = {}
    if isinstance(opt, MetaCurvature):
        for i, factors in enumerate(opt.factors):
            for j, t in enumerate(factors):
                out[f"curvature.{i}.{j}"] = t
        if isinstance(opt.param_groups[0]["lr"], Tensor):
            out["lr"] = opt.param_groups[0]["lr"]
        return out
    if isinstance(opt, (HypergradientSGD, HypergradientAdam)):
        for key in ("lr", "hyper_lr"):
            if isinstance(opt.param_groups[0][key], Tensor):
                out[key] = opt.param_groups[0][key]
        return out
    raise TypeError(
        f"save: {type(opt).__name__} is not a learned rule; expected one of LSTMOptimizer, MLPOptimizer, "
        "MetaCurvature, HypergradientSGD/Adam or the optimizers of meta_sgd / per_layer_per_step"
    )


def _one_setting_per_option(opt: Any) -> None:
    """A saved rule holds one value per option (group 0's): refuse groups that set another, which a save
    would drop silently (a second group's lr or output_scale). (A drop-in optimizer's ``state_dict`` keeps
    every group's settings in its ``param_groups`` and is not refused.)"""
    first = opt.param_groups[0]
    for k, group in enumerate(opt.param_groups[1:], 1):
        for key, value in group.items():
            other = first.get(key)
            if key == "params" or value is other:
                continue
            same = (torch.equal(value, other) if isinstance(value, Tensor) and isinstance(other, Tensor)
                    and value.shape == other.shape else not isinstance(value, Tensor) and value == other)
            if not same:
                raise LearnedRuleError(
                    f"save: parameter group {k} sets {key}={value!r}, group 0 {other!r}; a saved rule keeps one "
                    f"value per option, so the file would lose group {k}'s. Give every group the same settings, "
                    "or save one rule per group")


def export(optimizer: Any) -> SavedRule:
    """The learned rule of ``optimizer`` (a learned optimizer or a drop-in wrapping one) as a :class:`SavedRule`."""
    opt = _unwrap(optimizer)
    tensors = {k: t.detach().clone() for k, t in live_tensors(opt).items()}
    if isinstance(opt, (LSTMOptimizer, MLPOptimizer)):
        return SavedRule(opt.kind, opt.config(), opt.features(), tensors)
    shapes = [list(p.shape) for p in opt.params]
    if isinstance(opt, LearnedSGD):
        config = {"shapes": shapes, "sgd": opt.sgd_options(), "hold_last": opt.hold_last}
        return SavedRule(opt.kind, config, [], tensors)
    if isinstance(opt, MetaCurvature):
        config = {**opt.config(), "shapes": shapes}
        if "lr" in tensors:
            config["lr"] = None
        return SavedRule(opt.kind, config, [], tensors)
    config = {k: _plain(v) for k, v in opt.config().items()}
    return SavedRule(opt.kind, config, [], tensors)


def to_payload(optimizer: Any, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dict :func:`save` writes (also embedded in the drop-in optimizer's ``state_dict``)."""
    rule = export(optimizer)
    return {
        "format": FORMAT, "version": VERSION, "kind": rule.kind, "config": json.dumps(rule.config, sort_keys=True),
        "features": list(rule.features), "metadata": json.dumps(metadata or {}, default=str),
        "tensors": dict(rule.tensors), "diffopt_version": __version__,
    }


def save(optimizer: Any, path: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None) -> None:
    """Write the learned rule of ``optimizer`` to ``path`` (atomically; see the module docstring). The file
    keeps one value per option: parameter groups with different settings are refused."""
    _one_setting_per_option(_unwrap(optimizer))
    atomic_save(path, to_payload(optimizer, metadata))


# -- import ---------------------------------------------------------------------------------
def expected_features(kind: str, config: dict[str, Any]) -> list[str]:
    """The features this code computes for a rule of ``kind`` with ``config``."""
    if kind == "lstm":
        return list(LSTM_FEATURES)
    if kind == "mlp":
        features = config.get("features")
        if not isinstance(features, list) or any(f not in MLP_FEATURES for f in features):
            raise LearnedRuleError(
                f"the saved MLP rule uses features {features}, but this diffopt's MLP rule computes only "
                f"{list(MLP_FEATURES)}; it was written by a different diffopt or feature set"
            )
        return list(features)
    return []


def from_payload(payload: Any, where: str = "the payload", *, features: Sequence[str] | None = None) -> SavedRule:
    """Validate a loaded payload and return it as a :class:`SavedRule` (raises :class:`LearnedRuleError`)."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise LearnedRuleError(f"{where} is not a diffopt learned-rule file (format {FORMAT!r} expected)")
    version = payload.get("version")
    if version != VERSION:
        raise LearnedRuleError(
            f"{where} has learned-rule format version {version!r}, but this diffopt "
            f"({__version__}) reads version {VERSION}; re-train or re-export it with a matching diffopt"
            + (f" (it was written by diffopt {payload.get('diffopt_version')})" if payload.get("diffopt_version") else "")
        )
    kind = payload.get("kind")
    if kind not in KINDS:
        raise LearnedRuleError(f"{where} holds a rule of unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
    try:
        config = json.loads(payload.get("config", "{}"))
        metadata = json.loads(payload.get("metadata", "{}"))
    except (TypeError, ValueError) as error:
        raise LearnedRuleError(f"{where}: its config is not valid JSON ({error})") from error
    if not isinstance(config, dict) or not isinstance(metadata, dict):
        raise LearnedRuleError(f"{where}: its config and metadata must be JSON objects")
    saved_features = list(payload.get("features", []))
    computed = expected_features(kind, config)
    if saved_features != computed:
        raise LearnedRuleError(
            f"{where}: the saved {kind} rule was trained on features {saved_features}, but this diffopt computes "
            f"{computed} for it; a rule only works with the feature set it was trained on"
        )
    if features is not None and list(features) != saved_features:
        raise LearnedRuleError(
            f"{where}: the saved {kind} rule uses features {saved_features}, not the expected {list(features)}"
        )
    tensors = payload.get("tensors")
    if not isinstance(tensors, dict) or not all(isinstance(t, Tensor) for t in tensors.values()):
        raise LearnedRuleError(f"{where}: 'tensors' must map names to tensors")
    check_tensors(kind, config, tensors, where)
    bad = non_finite_tensors(tensors)
    if bad:
        raise LearnedRuleError(f"{where}: the saved {kind} rule's tensors {', '.join(sorted(bad)[:5])} hold NaN or "
                               "infinity; it was saved after meta-training diverged")
    return SavedRule(kind, config, saved_features, dict(tensors), metadata, version)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def expected_shapes(kind: str, config: dict[str, Any], where: str = "the payload") -> dict[str, tuple[int, ...]] | None:
    """The tensor names and shapes the config of an LSTM or MLP rule implies, computed on the ``meta``
    device (no memory is allocated however large the config claims to be); ``None`` for other kinds."""
    if kind == "lstm":
        if not (_positive_int(config.get("hidden_size")) and _positive_int(config.get("layers"))):
            raise LearnedRuleError(f"{where}: the saved lstm rule's hidden_size and layers must be integers >= 1, "
                                   f"got {config.get('hidden_size')!r} and {config.get('layers')!r}")
        with torch.device("meta"):
            net: Any = LSTMRuleNet(config["hidden_size"], config["layers"])
    elif kind == "mlp":
        hidden = config.get("hidden")
        if not isinstance(hidden, list) or not all(_positive_int(h) for h in hidden):
            raise LearnedRuleError(f"{where}: the saved mlp rule's hidden must be a list of integers >= 1, got {hidden!r}")
        with torch.device("meta"):
            net = MLPRuleNet(config["features"], hidden)
    else:
        return None
    return {name: tuple(w.shape) for name, w in zip(net.weight_names(), net.weights())}


def check_tensors(kind: str, config: dict[str, Any], tensors: dict[str, Tensor], where: str = "the payload") -> None:
    """Refuse tensors that do not match what the config implies, before anything is built."""
    shapes = expected_shapes(kind, config, where)
    if shapes is None:
        return
    if sorted(tensors) != sorted(shapes):
        raise LearnedRuleError(f"{where}: the saved {kind} rule has tensors {sorted(tensors)}, its config implies "
                               f"{sorted(shapes)}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise LearnedRuleError(
                f"{where}: the saved {kind} rule's tensor {name!r} has shape {tuple(tensors[name].shape)}; its config "
                f"implies {shape}"
            )


def read(path: str | os.PathLike[str], *, features: Sequence[str] | None = None) -> SavedRule:
    """Load and validate a saved rule (``torch.load(weights_only=True)``: no code is unpickled)."""
    payload = safe_load(path, "diffopt learned-rule file", LearnedRuleError)
    return from_payload(payload, str(path), features=features)


def _load_into(module: nn.Module, names: list[str], weights: tuple[Tensor, ...], tensors: dict[str, Tensor],
               kind: str) -> None:
    if sorted(tensors) != sorted(names):
        raise LearnedRuleError(f"the saved {kind} rule has tensors {sorted(tensors)}, its config implies {sorted(names)}")
    with torch.no_grad():
        for name, target in zip(names, weights):
            value = tensors[name]
            if value.shape != target.shape:
                raise LearnedRuleError(
                    f"the saved {kind} rule's tensor {name!r} has shape {tuple(value.shape)}; its config implies "
                    f"{tuple(target.shape)}"
                )
            target.copy_(value)


def _check_shapes(kind: str, config: dict[str, Any], params: list[Tensor]) -> None:
    shapes = [list(p.shape) for p in params]
    if shapes != config["shapes"]:
        raise LearnedRuleError(
            f"the saved {kind} rule has learned tensors for parameters of shapes {config['shapes']}, but the "
            f"parameters given have shapes {shapes}; it only applies to the model it was trained for"
        )


def _as(value: Tensor, like: Tensor, requires_grad: bool) -> Tensor:
    return nn.Parameter(value.to(dtype=like.dtype, device=like.device).clone(), requires_grad=requires_grad)


def build(rule: SavedRule, params: Iterable[Any], *, requires_grad: bool = False, **overrides: Any) -> DifferentiableOptimizer:
    """A differentiable optimizer on ``params`` running the saved rule (tensors copied; learnable if ``requires_grad``)."""
    params = list(params)
    if not params:
        raise ValueError("load: got an empty parameter list")
    plain = [p[1] if isinstance(p, tuple) else p for p in params]
    plain = [t for g in plain for t in (g["params"] if isinstance(g, dict) else [g])]
    like = plain[0]
    kind, config, tensors = rule.kind, dict(rule.config), rule.tensors
    dtype = like.dtype if like.is_floating_point() else None
    if kind == "lstm":
        net = LSTMRuleNet(config["hidden_size"], config["layers"], dtype=dtype).to(like.device)
        _load_into(net, net.weight_names(), net.weights(), tensors, kind)
        net.requires_grad_(requires_grad)
        options = {k: config[k] for k in ("preprocess", "output_scale", "nonfinite", "maximize")}
        return LSTMOptimizer(params, net, **{**options, **overrides})
    if kind == "mlp":
        net = MLPRuleNet(config["features"], config["hidden"], dtype=dtype).to(like.device)
        _load_into(net, net.weight_names(), net.weights(), tensors, kind)
        net.requires_grad_(requires_grad)
        options = {k: config[k] for k in ("eps", "magnitude_scale", "nonfinite", "maximize")}
        return MLPOptimizer(params, net, **{**options, **overrides})
    if kind in ("meta_sgd", "per_layer_per_step"):
        _check_shapes(kind, config, plain)
        names = [f"lr.{i}" for i in range(len(plain))]
        if sorted(tensors) != sorted(names):
            raise LearnedRuleError(f"the saved {kind} rule has tensors {sorted(tensors)}, expected {sorted(names)}")
        options = {**config["sgd"], **overrides}
        if kind == "meta_sgd":
            opt = meta_sgd(plain, 0.0, requires_grad=requires_grad, **options)
        else:
            steps = int(tensors["lr.0"].shape[0])
            opt = per_layer_per_step(plain, steps, 0.0, hold_last=config["hold_last"], requires_grad=requires_grad,
                                     **options)
        with torch.no_grad():
            for i, target in enumerate(opt.lrs):
                if tensors[f"lr.{i}"].shape != target.shape:
                    raise LearnedRuleError(f"the saved {kind} rule's lr.{i} has shape {tuple(tensors[f'lr.{i}'].shape)}")
                target.copy_(tensors[f"lr.{i}"])
        return opt
    if kind == "meta_curvature":
        _check_shapes(kind, config, plain)
        factors = []
        for i, p in enumerate(plain):
            shapes = factor_shapes(p.shape, config["bias"])
            entry = []
            for j, shape in enumerate(shapes):
                key = f"curvature.{i}.{j}"
                if key not in tensors or tuple(tensors[key].shape) != shape:
                    raise LearnedRuleError(f"the saved meta_curvature rule lacks {key} of shape {shape}")
                entry.append(_as(tensors[key], p, requires_grad))
            factors.append(tuple(entry))
        lr = _as(tensors["lr"], like, requires_grad) if "lr" in tensors else config["lr"]
        options = {"bias": config["bias"], "weight_decay": config["weight_decay"], "maximize": config["maximize"],
                   **overrides}
        return MetaCurvature(plain, lr, curvature=PerParameter(factors), **options)
    # hypergradient
    cls = HypergradientSGD if kind == "hypergradient_sgd" else HypergradientAdam
    options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()}
    for key in ("lr", "hyper_lr"):
        if key in tensors:
            options[key] = _as(tensors[key], like, requires_grad)
    return cls(params, **{**options, **overrides})


def transfer(optimizer: Any, params: Iterable[Any]) -> DifferentiableOptimizer:
    """The same learned rule on other parameters (another model, or another task family).

    LSTM and MLP rules share their network with ``optimizer`` (meta-gradients
    reach the same tensors); per-parameter rules are copied and need matching shapes.
    """
    opt = _unwrap(optimizer)
    if isinstance(opt, (LSTMOptimizer, MLPOptimizer)):
        config = opt.config()
        keys = ("preprocess", "output_scale") if isinstance(opt, LSTMOptimizer) else ("eps", "magnitude_scale")
        return type(opt)(params, opt.net, nonfinite=config["nonfinite"], maximize=config["maximize"],
                         **{k: config[k] for k in keys})
    _one_setting_per_option(opt)
    return build(export(opt), params)


def load_differentiable(path: str | os.PathLike[str], params: Iterable[Any], *, features: Sequence[str] | None = None,
                        requires_grad: bool = False, **overrides: Any) -> DifferentiableOptimizer:
    """The saved rule as a differentiable optimizer on ``params`` (for the engine / further meta-training)."""
    return build(read(path, features=features), params, requires_grad=requires_grad, **overrides)
