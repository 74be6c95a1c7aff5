r"""ANIL — Almost No Inner Loop (Raghu et al., 2020).

Only the head is adapted in the inner loop; the body (feature extractor) is
meta-learned in the outer loop alone. The body's features are computed once per
task and the inner loop runs on the head over those features, so an inner step
costs a head forward and backward only. The meta-gradient still reaches the
body through the features (second order through the head's inner steps).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..optim import SGD
from ..unroll import InnerLoop
from ._base import InnerLoopLearner, check_episode, embed_tasks

# Modes whose meta-gradient does not flow back through the inputs: run the full model instead.
WHOLE_MODEL_MODES = ("forward", "es", "pes")


class ANIL(InnerLoopLearner):
    """Adapt ``head`` on features of ``body``; meta-learn both.

    Args:
        body: the feature extractor (not adapted in the inner loop).
        head: the adapted part (typically a linear classifier or regressor).
        loss_fn, inner_lr, inner_steps, mode, vectorize, engine_options (keywords): as for :class:`MAML`.
    """

    def __init__(self, body: nn.Module, head: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                 inner_lr: float | Tensor = 0.1, inner_steps: int = 1, mode: str = "second_order",
                 vectorize: bool | str = "auto", **engine_options: Any) -> None:
        super().__init__()
        self.body, self.head = body, head
        self.loss_fn = loss_fn
        self.inner_steps, self.mode = inner_steps, mode
        self.features_once = mode not in WHOLE_MODEL_MODES
        if self.features_once:
            self.loop = InnerLoop(head, SGD(head.parameters(), lr=inner_lr), loss_fn, steps=inner_steps, mode=mode,
                                  vectorize=vectorize, **engine_options)
        else:
            whole = nn.Sequential(body, head)
            self.loop = InnerLoop(whole, SGD(head.parameters(), lr=inner_lr), loss_fn, steps=inner_steps, mode=mode,
                                  vectorize=vectorize, **engine_options)

    def features(self, x: Tensor) -> Tensor:
        """Body features of (T, N, ...) inputs, as (T, N, D)."""
        return embed_tasks(self.body, x)

    def inputs(self, x: Tensor) -> Tensor:
        return self.features(x) if self.features_once else x

    @property
    def adapts_features(self) -> bool:
        """The head adapts on the body's features, except in modes that run the whole model."""
        return self.features_once

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        check_episode(support_x, support_y, query_x, query_y)
        return self.loop.meta_loss(self.inputs(support_x), support_y, self.inputs(query_x), query_y)
