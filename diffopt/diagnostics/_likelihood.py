"""The predictive distribution p_w(y|x) that turns model outputs into nats.

* ``"categorical"`` (classification): p = softmax(f_w(x)) over the last dim of
  logits of shape ``(examples, classes)``; labels are class indices.
* ``"gaussian"`` (regression): p = 𝒩(f_w(x), σ²) independently per output
  dimension, with σ a *declared* argument (there is no default: nats of a
  regression model are meaningless without it).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["Likelihood", "resolve_likelihood"]

_CATEGORICAL = {"categorical", "classification", "softmax", "cross_entropy"}
_GAUSSIAN = {"gaussian", "regression", "normal", "mse"}


class Likelihood:
    """A predictive likelihood: ``kind`` is ``"categorical"`` or ``"gaussian"``."""

    def __init__(self, kind: str, sigma: Optional[float] = None, num_classes: Optional[int] = None) -> None:
        self.kind = kind
        self.sigma = sigma
        self.num_classes = num_classes

    @property
    def categorical(self) -> bool:
        return self.kind == "categorical"

    def describe(self) -> str:
        if self.categorical:
            return "categorical (softmax)"
        return f"gaussian (sigma={self.sigma:g})"

    def __repr__(self) -> str:
        return f"Likelihood({self.kind!r}, sigma={self.sigma}, num_classes={self.num_classes})"

    # -- checks --------------------------------------------------------------------------
    def check(self, out: Tensor, y: Optional[Tensor] = None) -> None:
        """Raise a ValueError naming the fix when ``out``/``y`` do not fit this likelihood."""
        if self.categorical:
            if out.dim() != 2:
                raise ValueError(
                    f"categorical diagnostics expect logits of shape (examples, classes), got {tuple(out.shape)}; "
                    "for data with a leading task dimension pass batched=True (or lists of per-task tensors); "
                    "otherwise reshape the model output, or pass likelihood='gaussian', sigma=... for regression"
                )
            N = out.shape[-1]
            if self.num_classes is not None and N != self.num_classes:
                raise ValueError(
                    f"the model outputs {N} logits per example but num_classes={self.num_classes}: give the model "
                    f"a {self.num_classes}-way head (e.g. nn.Linear(features, {self.num_classes})) or pass "
                    f"num_classes={N}"
                )
            if N < 2:
                raise ValueError(
                    f"the model outputs {N} logit per example; a categorical likelihood needs at least 2 classes "
                    "(use a 2-logit head, or likelihood='gaussian', sigma=... for regression)"
                )
            if y is not None:
                if y.is_floating_point() or y.is_complex():
                    raise ValueError(
                        f"categorical diagnostics need integer class labels, got {y.dtype}; pass y.long(), or "
                        "likelihood='gaussian', sigma=... for regression targets"
                    )
                if y.numel() and (int(y.max()) >= N or int(y.min()) < 0):
                    raise ValueError(
                        f"labels range over [{int(y.min())}, {int(y.max())}] but the model outputs {N} logits per "
                        f"example: the head needs at least {int(y.max()) + 1} classes (nn.Linear(features, "
                        f"{int(y.max()) + 1})); pass num_classes= to check the head size"
                    )
        elif y is not None:
            self._gaussian_target(out, y)

    def _gaussian_target(self, out: Tensor, y: Tensor) -> Tensor:
        if y.shape == out.shape:
            return y
        if out.dim() == y.dim() + 1 and out.shape[-1] == 1 and out.shape[:-1] == y.shape:
            return y.unsqueeze(-1)
        raise ValueError(
            f"regression targets of shape {tuple(y.shape)} do not match model outputs of shape {tuple(out.shape)}"
        )

    # -- densities -----------------------------------------------------------------------
    def log_prob(self, out: Tensor, y: Tensor) -> Tensor:
        """Per-example ``ln p(y_i|x_i)`` (shape ``(examples,)``), in nats."""
        if self.categorical:
            # labels are clamped so that a wrong label never indexes out of bounds (a device-side assert on
            # CUDA); callers validate labels with check(out, y), which names the fix
            idx = y.long().clamp(0, out.shape[-1] - 1).unsqueeze(-1)
            return out.log_softmax(-1).gather(-1, idx).squeeze(-1)
        y = self._gaussian_target(out, y)
        s = float(self.sigma)
        z = (y - out) / s
        lp = -0.5 * z * z - 0.5 * math.log(2 * math.pi * s * s)
        return lp.reshape(out.shape[0], -1).sum(-1)

    def nll(self, out: Tensor, y: Tensor) -> Tensor:
        """Per-example negative log-likelihood in nats."""
        return -self.log_prob(out, y)

    def output_dim(self, out: Tensor) -> int:
        return int(out[0].numel()) if out.shape[0] else 0

    def lam(self, out: Tensor) -> Tensor:
        """Per-example Λ_i, the Hessian of -ln p w.r.t. the outputs: ``(examples, D, D)``."""
        out = out.detach()
        n = out.shape[0]
        if self.categorical:
            p = out.softmax(-1)
            return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        D = self.output_dim(out)
        eye = torch.eye(D, dtype=out.dtype, device=out.device) / float(self.sigma) ** 2
        return eye.expand(n, D, D)

    def sample(self, out: Tensor, generator: torch.Generator, samples: Optional[int] = None) -> Tensor:
        """Labels sampled from ``p(·|x)`` with an explicit generator (the global RNG is untouched).

        Shape ``(examples, ...)``, or ``(samples, examples, ...)`` when ``samples`` is given.
        """
        out = out.detach()
        S = 1 if samples is None else int(samples)
        if self.categorical:
            ys = torch.multinomial(out.softmax(-1), S, replacement=True, generator=generator).T
        else:
            noise = torch.randn((S,) + tuple(out.shape), generator=generator, dtype=out.dtype, device=out.device)
            ys = out + float(self.sigma) * noise
        return ys[0] if samples is None else ys


def resolve_likelihood(
    likelihood: Union[str, Likelihood] = "categorical",
    sigma: Optional[float] = None,
    num_classes: Optional[int] = None,
    *,
    what: str = "this diagnostic",
) -> Likelihood:
    """Validate the likelihood arguments; regression without ``sigma`` is an error naming the fix."""
    if isinstance(likelihood, Likelihood):
        kind, sigma, num_classes = likelihood.kind, (sigma if sigma is not None else likelihood.sigma), (
            num_classes if num_classes is not None else likelihood.num_classes
        )
    else:
        key = str(likelihood).lower()
        if key in _CATEGORICAL:
            kind = "categorical"
        elif key in _GAUSSIAN:
            kind = "gaussian"
        else:
            raise ValueError(f"unknown likelihood {likelihood!r}: use 'categorical' (classification) or 'gaussian' (regression)")
    if kind == "gaussian":
        if sigma is None:
            raise ValueError(
                f"{what} on a regression model needs the observation noise scale: pass sigma=<float>, the σ of "
                "p(y|x) = 𝒩(f(x), σ²) (nats of a regression model are only defined for a declared noise scale)"
            )
        sigma = float(sigma)
        if not sigma > 0 or not math.isfinite(sigma):
            raise ValueError(f"sigma must be a positive finite number, got {sigma}")
    return Likelihood(kind, sigma, num_classes)
