"""Adapt a part of a model, keep the rest: LoRA adapters and parameter selections.

The engine adapts exactly the parameters its inner optimizer holds; everything else is
shared by the tasks (and meta-learned if it requires grad, frozen if not). So adapting a
part of a model is choosing the optimizer's parameters:

* :func:`select_parameters` — ``"head"``, ``"norms"``, ``"lora"``, ``"all"`` or
  ``fnmatch`` patterns over ``named_parameters()`` names (``"*.q_proj.*"``);
* :func:`add_lora` — LoRA (Hu et al., 2021, arXiv:2106.09685) for users without
  ``peft``: each chosen ``nn.Linear`` becomes :class:`LoRALinear`,
  :math:`y = W x + b + \\tfrac{\\alpha}{r} B A x` with ``W``, ``b`` frozen and ``A`` (r × in),
  ``B`` (out × r) new parameters. A ``peft`` model (``get_peft_model``) works as it is:
  its adapters are the parameters named ``lora_``.

::

    add_lora(model, ["q_proj", "v_proj"], rank=4)                  # or peft.get_peft_model(...)
    inner = diffopt.optim.SGD(select_parameters(model, "lora"), lr=0.1)
    loop = InnerLoop(model, inner, loss_fn, steps=5)               # meta-gradients reach A and B's initialisation

Only the adapted tensors are expanded over the tasks and differentiated in the inner
steps, so the inner loop's memory for fast weights and their gradients grows with the
adapted part, not with the model.

:class:`PaddedSequences` adapts the *inputs*: the engine passes one tensor per task to the
model, so a Hugging Face model that needs an attention mask for padded sequences takes the
token ids and the mask stacked into one tensor (``PaddedSequences.pack(ids, mask)``).
"""
from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["LoRALinear", "PaddedSequences", "add_lora", "select_parameters", "SELECTIONS"]

SELECTIONS = ("all", "head", "norms", "lora")


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) · B A x`` with ``base`` frozen (its parameters get
    ``requires_grad=False``). ``A`` is drawn as ``nn.Linear`` draws a weight
    (Kaiming-uniform), ``B`` starts at zero (so the wrapped layer starts equal to
    ``base``) unless ``init="random"`` (both random: a non-trivial start, for tests)."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float | None = None, init: str = "zeros") -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if init not in ("zeros", "random"):
            raise ValueError(f"init must be 'zeros' or 'random', got {init!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        options = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **options))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **options))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init == "random":
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scaling * ((x @ self.lora_A.T) @ self.lora_B.T)


def add_lora(model: nn.Module, targets: Sequence[str], rank: int = 4, alpha: float | None = None,
             init: str = "zeros") -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` whose name (or its last component) matches one
    of ``targets`` (``fnmatch`` patterns: ``"q_proj"``, ``"layers.0.*"``) by a
    :class:`LoRALinear`; return the names replaced. A target that matches nothing raises."""
    modules = dict(model.named_modules())
    chosen = [(name, module) for name, module in modules.items()
              if isinstance(module, nn.Linear) and _matches(name, targets)]
    if not chosen:
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        conv1d = [n for n, m in modules.items() if type(m).__name__ == "Conv1D" and _matches(n, targets)]
        hint = (f"; {conv1d[0]} is transformers' Conv1D (GPT-2's layers), not an nn.Linear: adapt it with peft "
                "(LoraConfig(target_modules=[...], fan_in_fan_out=True)), which InnerLoop takes as it is") if conv1d else ""
        raise ValueError(f"add_lora: no nn.Linear of {type(model).__name__} matches {list(targets)}; "
                         f"its linear layers are {linears[:12]}{' ...' if len(linears) > 12 else ''}{hint}")
    for name, _ in chosen:
        parent_name = name.rpartition(".")[0]
        if isinstance(modules[parent_name], nn.MultiheadAttention):
            raise ValueError(f"add_lora: {name} is nn.MultiheadAttention's output projection, whose weight the "
                             "attention reads directly (F.multi_head_attention_forward), so a LoRA wrapper would "
                             "break it; leave it out of targets, or adapt it as it is with select_parameters(model, "
                             f"['{name}.*'])")
    owners: dict[int, list[str]] = {}
    for module_name, module in modules.items():
        for param_name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{module_name}.{param_name}" if module_name else param_name)
    for name, module in chosen:
        tied = [other for other in owners.get(id(module.weight), []) if other != f"{name}.weight"]
        if tied:
            warnings.warn(f"add_lora: {name}.weight is tied to {', '.join(tied)}; freezing it as the LoRA base "
                          "freezes that too", UserWarning, stacklevel=2)
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank, alpha, init))
    return [name for name, _ in chosen]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    last = name.rpartition(".")[2]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) for p in patterns)


def select_parameters(model: nn.Module, which: str | Sequence[str]) -> list[nn.Parameter]:
    """Parameters of ``model`` to adapt, in ``named_parameters()`` order.

    ``which``: ``"all"``; ``"head"`` (the output layer: a Hugging Face model's
    ``get_output_embeddings()``, else the last module that holds parameters of its own);
    ``"norms"`` (every module whose class name contains ``Norm``: LayerNorm, RMSNorm,
    BatchNorm, GroupNorm); ``"lora"`` (parameters named ``lora_``, from :func:`add_lora`
    or ``peft``); or a list of ``fnmatch`` patterns over parameter names. A selection
    that finds nothing raises, naming what exists. Frozen parameters are returned too (to unfreeze
    with ``requires_grad_()``, say); an :class:`InnerLoop` whose optimizer holds only frozen ones refuses
    to run, since it would adapt nothing (a peft model's ``"head"`` is tied to its frozen embeddings).
    """
    named = list(model.named_parameters())
    if isinstance(which, str):
        if which not in SELECTIONS:
            raise ValueError(f"select_parameters: {which!r} is not one of {SELECTIONS}; give a list of name "
                             "patterns (e.g. ['*.q_proj.*']) to choose by name")
        wanted = _selection(model, which, named)
    else:
        patterns = list(which)
        wanted = {n for n, _ in named if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    chosen = [p for n, p in named if n in wanted]
    if not chosen:
        raise ValueError(f"select_parameters({which!r}) matched no parameter of {type(model).__name__}; its "
                         f"parameters are {[n for n, _ in named][:12]}{' ...' if len(named) > 12 else ''}")
    return chosen


def _selection(model: nn.Module, which: str, named: list[tuple[str, nn.Parameter]]) -> set[str]:
    if which == "all":
        return {n for n, _ in named}
    if which == "lora":
        return {n for n, _ in named if "lora_" in n}
    owners = {id(p): n for n, p in named}
    if which == "norms":
        modules = [m for m in model.modules() if "Norm" in type(m).__name__]
    else:  # head
        output = getattr(model, "get_output_embeddings", None)
        head = output() if callable(output) else None
        if head is None:
            holders = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
            head = holders[-1] if holders else None
        modules = [head] if head is not None else []
    return {owners[id(p)] for m in modules for p in m.parameters(recurse=False) if id(p) in owners}


class PaddedSequences(nn.Module):
    """A Hugging Face model run on padded sequences: its input packs each sequence's token ids and
    attention mask as ``x[..., 0, :]`` and ``x[..., 1, :]`` (:meth:`pack`), since the engine gives
    the model one tensor per task. The forward calls ``model(input_ids=ids, attention_mask=mask,
    position_ids=...)``, the positions counted over the unmasked tokens (``cumsum(mask) - 1``, as
    Hugging Face's ``generate`` does), so a left-padded sequence gets the logits it has unpadded.
    Give the targets of padded inputs the loss's ignore index (``-100`` for ``F.cross_entropy``)::

        model = PaddedSequences(transformers.AutoModelForCausalLM.from_config(config))
        x = PaddedSequences.pack(ids, mask)              # (tasks, examples, 2, length)
        y = torch.where(mask.bool(), next_ids, -100)     # no target where the input is padding
        loop = InnerLoop(model, diffopt.optim.SGD(select_parameters(model, "lora"), lr=0.1), lm_loss, steps=5)

    ``positions=False`` leaves the positions to the model (right padding needs none).
    """

    def __init__(self, model: nn.Module, positions: bool = True) -> None:
        super().__init__()
        self.model = model
        self.positions = positions
        config = getattr(model, "config", None)
        self._extra = {"use_cache": False} if hasattr(config, "use_cache") else {}

    @staticmethod
    def pack(ids: Tensor, mask: Tensor) -> Tensor:
        """``(..., length)`` token ids and 0/1 attention mask -> ``(..., 2, length)``."""
        if ids.shape != mask.shape:
            raise ValueError(f"PaddedSequences.pack: ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must have "
                             "the same shape")
        if ids.is_floating_point():
            raise TypeError(f"PaddedSequences.pack: ids must be integer token ids, got {ids.dtype}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            found = torch.unique(mask[(mask != 0) & (mask != 1)])[:3].tolist()
            raise ValueError(f"PaddedSequences.pack: mask must hold 1 for a token and 0 for padding (Hugging Face's "
                             f"attention_mask), found {found}; an additive mask (0 / -inf or finfo.min) becomes "
                             "(mask == 0).long()")
        return torch.stack([ids, mask.to(ids.dtype)], dim=-2)

    def forward(self, packed: Tensor) -> object:
        if packed.dim() < 2 or packed.shape[-2] != 2 or packed.is_floating_point():
            raise ValueError(f"PaddedSequences: expected integer inputs of shape (..., 2, length), token ids and "
                             f"attention mask stacked by PaddedSequences.pack(ids, mask); got {packed.dtype} of "
                             f"shape {tuple(packed.shape)}")
        ids, mask = packed.unbind(-2)
        inputs = {"input_ids": ids, "attention_mask": mask, **self._extra}
        if self.positions:
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
        return self.model(**inputs)

    def get_output_embeddings(self) -> nn.Module | None:
        """The wrapped model's output layer (``select_parameters(model, "head")``)."""
        output = getattr(self.model, "get_output_embeddings", None)
        return output() if callable(output) else None
