r"""Metric-based meta-learners: Prototypical, Matching and Siamese networks.

They learn an embedding in which a new task is solved by comparison with its
support set, without an inner optimisation loop.

* Prototypical Networks (Snell, Swersky & Zemel, 2017): class prototypes
  :math:`c_k = \frac1{|S_k|}\sum_{x\in S_k} f(x)`, logits :math:`-\|f(x)-c_k\|^2`.
* Matching Networks (Vinyals et al., 2016): attention over the support set,
  :math:`p(y|x) = \sum_i \mathrm{softmax}_i(\cos(f(x), g(x_i)))\,\mathbb 1[y_i = y]`,
  with optional full-context embeddings (a bidirectional LSTM over the support
  embeddings for g, an attention LSTM for f).
* Siamese Networks (Koch, Zemel & Salakhutdinov, 2015): a verification network
  :math:`\sigma(w^\top|f(x_1)-f(x_2)| + b)` trained on same/different pairs; a
  query is classified as the label of its most similar support example.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import MetaLearner, check_episode, embed_episode, ways_of


def one_hot(labels: Tensor, ways: int, dtype: torch.dtype) -> Tensor:
    return F.one_hot(labels, ways).to(dtype)


class PrototypicalNetwork(MetaLearner):
    """Prototypical Networks; ``distance`` is "squared_euclidean" (the paper's) or "cosine"."""

    def __init__(self, encoder: nn.Module, distance: str = "squared_euclidean") -> None:
        super().__init__()
        if distance not in ("squared_euclidean", "cosine"):
            raise ValueError(f"distance={distance!r}: choose 'squared_euclidean' or 'cosine'")
        self.encoder, self.distance = encoder, distance

    def prototypes(self, support: Tensor, support_y: Tensor) -> Tensor:
        """Mean support embedding per class: (T, N, D)."""
        ways = ways_of(support_y)
        weights = one_hot(support_y, ways, support.dtype)               # (T, S, N)
        counts = weights.sum(1)                                        # (T, N)
        if bool((counts == 0).any()):
            raise ValueError("every class 0..N-1 needs at least one support example in every task")
        return weights.transpose(1, 2) @ support / counts.unsqueeze(-1)

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        check_episode(support_x, support_y, query_x)
        support, query = embed_episode(self.encoder, support_x, query_x)
        centres = self.prototypes(support, support_y)
        if self.distance == "cosine":
            return F.normalize(query, dim=-1) @ F.normalize(centres, dim=-1).transpose(1, 2)
        return -((query.unsqueeze(2) - centres.unsqueeze(1)) ** 2).sum(-1)

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        check_episode(support_x, support_y, query_x, query_y)
        logits = self.predict(support_x, support_y, query_x)
        return F.cross_entropy(logits.flatten(0, 1), query_y.flatten())

    def config(self) -> dict[str, Any]:
        return {"algorithm": "PrototypicalNetwork", "distance": self.distance,
                "parameters": [list(p.shape) for p in self.parameters()]}


class FullContextEmbedding(nn.Module):
    """Matching Networks' full-context embeddings for an embedding size ``dim``.

    g: a bidirectional LSTM over the support embeddings, added to them (skip).
    f: an LSTM run for ``steps`` read steps on the query embedding, attending over
    the support set with a softmax of dot products at every step.
    """

    def __init__(self, dim: int, steps: int = 5) -> None:
        super().__init__()
        self.support_lstm = nn.LSTM(dim, dim, bidirectional=True, batch_first=True)
        self.query_cell = nn.LSTMCell(2 * dim, dim)
        self.steps = steps

    def support(self, support: Tensor) -> Tensor:
        out, _ = self.support_lstm(support)
        forward, backward = out.chunk(2, dim=-1)
        return support + forward + backward

    def query(self, query: Tensor, support: Tensor) -> Tensor:
        tasks, n, dim = query.shape
        flat = query.reshape(tasks * n, dim)
        h, c = torch.zeros_like(flat), torch.zeros_like(flat)
        read = torch.zeros_like(flat)
        for _ in range(self.steps):
            h, c = self.query_cell(torch.cat([flat, read], -1), (h, c))
            h = h + flat
            attention = torch.softmax((h.reshape(tasks, n, dim) @ support.transpose(1, 2)), -1)
            read = (attention @ support).reshape(tasks * n, dim)
        return h.reshape(tasks, n, dim)


class MatchingNetwork(MetaLearner):
    """Matching Networks with cosine attention; ``full_context`` adds FCE (needs ``embedding_dim``)."""

    def __init__(self, encoder: nn.Module, full_context: bool = False, embedding_dim: int | None = None,
                 fce_steps: int = 5) -> None:
        super().__init__()
        self.encoder = encoder
        self.full_context = full_context
        if full_context:
            if embedding_dim is None:
                raise ValueError("full_context=True needs embedding_dim, the encoder's output size")
            self.fce = FullContextEmbedding(embedding_dim, fce_steps)

    def attention(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Attention of every query over the support set: (T, Q, S)."""
        support, query = embed_episode(self.encoder, support_x, query_x)
        if self.full_context:
            support = self.fce.support(support)
            query = self.fce.query(query, support)
        cosine = F.normalize(query, dim=-1, eps=1e-8) @ F.normalize(support, dim=-1, eps=1e-8).transpose(1, 2)
        return torch.softmax(cosine, -1)

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Log class probabilities (T, Q, N)."""
        check_episode(support_x, support_y, query_x)
        attention = self.attention(support_x, support_y, query_x)
        probabilities = attention @ one_hot(support_y, ways_of(support_y), attention.dtype)
        return torch.log(probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny))

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        check_episode(support_x, support_y, query_x, query_y)
        log_probabilities = self.predict(support_x, support_y, query_x)
        return F.nll_loss(log_probabilities.flatten(0, 1), query_y.flatten())

    def config(self) -> dict[str, Any]:
        return {"algorithm": "MatchingNetwork", "full_context": self.full_context,
                "parameters": [list(p.shape) for p in self.parameters()]}


class SiameseNetwork(MetaLearner):
    """Siamese verification network over the encoder's embeddings (size ``embedding_dim``).

    Training pairs are every (query, support) pair of an episode, labelled same
    or different class; positives are weighted by (N − 1) so both classes count
    equally. At test time a query takes the label of its most similar support
    example (``predict`` returns, per class, the best similarity logit).
    """

    def __init__(self, encoder: nn.Module, embedding_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.verifier = nn.Linear(embedding_dim, 1)

    def similarity(self, support_x: Tensor, query_x: Tensor) -> Tensor:
        """Same-class logits for every (query, support) pair: (T, Q, S)."""
        support, query = embed_episode(self.encoder, support_x, query_x)
        distance = (query.unsqueeze(2) - support.unsqueeze(1)).abs()
        return self.verifier(distance).squeeze(-1)

    def predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        check_episode(support_x, support_y, query_x)
        logits = self.similarity(support_x, query_x)                          # (T, Q, S)
        ways = ways_of(support_y)
        mask = F.one_hot(support_y, ways).bool()                              # (T, S, N)
        expanded = logits.unsqueeze(-1).expand(*logits.shape, ways)
        fill = torch.finfo(logits.dtype).min
        return expanded.masked_fill(~mask.unsqueeze(1), fill).amax(2)         # (T, Q, N)

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        check_episode(support_x, support_y, query_x, query_y)
        logits = self.similarity(support_x, query_x)
        same = (query_y.unsqueeze(2) == support_y.unsqueeze(1)).to(logits.dtype)
        ways = ways_of(support_y)
        weight = torch.ones(1, dtype=logits.dtype, device=logits.device) * max(ways - 1, 1)
        return F.binary_cross_entropy_with_logits(logits, same, pos_weight=weight)

    def config(self) -> dict[str, Any]:
        return {"algorithm": "SiameseNetwork", "parameters": [list(p.shape) for p in self.parameters()]}
