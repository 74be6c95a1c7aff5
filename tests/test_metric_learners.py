"""Prototypical, Matching and Siamese networks against hand computations (float64).

* ProtoNet: logits are −squared Euclidean distances (or cosines) to prototypes
  computed by looping over tasks, classes and queries;
* Matching Networks: attention is the softmax of cosine similarities computed
  by hand, class probabilities sum to 1, full-context embeddings run and match
  central finite differences;
* Siamese: same/different pair labels, the positive weighting, and
  nearest-support classification on a case built by hand.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from diffopt.algorithms import MatchingNetwork, PrototypicalNetwork, SiameseNetwork
from diffopt.recipes import make_learner
from strategies import examples

F64 = torch.float64
EXACT = 1e-12
QUICK = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=examples(15))


def encoder(seed: int, d_in: int = 3, d_out: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, d_out)).to(F64)


def episode(seed: int, tasks: int, ways: int, shots: int, query: int, d_in: int = 3, shuffle: bool = True):
    """Random inputs; labels 0..ways−1 in a random order per task when ``shuffle``."""
    g = torch.Generator().manual_seed(seed)
    sy = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone()
    qy = torch.arange(ways).repeat_interleave(query).expand(tasks, -1).clone()
    if shuffle:
        sy = torch.stack([row[torch.randperm(row.numel(), generator=g)] for row in sy])
        qy = torch.stack([row[torch.randperm(row.numel(), generator=g)] for row in qy])
    return (torch.randn(tasks, ways * shots, d_in, generator=g, dtype=F64), sy,
            torch.randn(tasks, ways * query, d_in, generator=g, dtype=F64), qy)


def close(a: Tensor, b: Tensor, tol: float = EXACT) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


episodes = st.fixed_dictionaries({
    "tasks": st.integers(1, 3), "ways": st.integers(2, 5), "shots": st.integers(1, 3), "query": st.integers(1, 3),
    "seed": st.integers(0, 2**16),
})


# =============================================================================================
# Prototypical Networks
# =============================================================================================

@QUICK
@given(e=episodes, distance=st.sampled_from(["squared_euclidean", "cosine"]))
def test_protonet_logits_are_negative_squared_distances_to_hand_prototypes(e, distance):
    f = encoder(e["seed"])
    sx, sy, qx, qy = episode(e["seed"] + 1, e["tasks"], e["ways"], e["shots"], e["query"])
    net = PrototypicalNetwork(f, distance=distance)
    logits = net.predict(sx, sy, qx)
    assert logits.shape == (e["tasks"], qx.shape[1], e["ways"])
    expected = torch.empty_like(logits)
    for t in range(e["tasks"]):
        for k in range(e["ways"]):
            members = [f(sx[t, i]) for i in range(sx.shape[1]) if sy[t, i] == k]
            prototype = sum(members) / len(members)
            for q in range(qx.shape[1]):
                z = f(qx[t, q])
                if distance == "squared_euclidean":
                    expected[t, q, k] = -sum((z[d] - prototype[d]) ** 2 for d in range(z.numel()))
                else:
                    expected[t, q, k] = (z @ prototype) / (z.norm() * prototype.norm())
    close(logits, expected)
    # the meta-loss is the cross-entropy of those logits, and its gradient reaches the encoder
    loss = net.meta_loss(sx, sy, qx, qy)
    hand = F.cross_entropy(expected.flatten(0, 1), qy.flatten())
    close(loss, hand)
    params = list(f.parameters())
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(hand, params)):
        close(a, b)


def test_protonet_needs_every_class_in_the_support_and_a_known_distance():
    net = PrototypicalNetwork(encoder(0))
    sx, sy, qx, qy = episode(1, 2, 3, 2, 2)
    sy = sy.clone()
    sy[1][sy[1] == 1] = 0  # task 1 has no support example of class 1, but class 2 exists
    with pytest.raises(ValueError, match="every class 0..N-1 needs at least one support example in every task"):
        net.predict(sx, sy, qx)
    with pytest.raises(ValueError, match="distance='manhattan'"):
        PrototypicalNetwork(encoder(0), distance="manhattan")
    with pytest.raises(ValueError, match="support labels are empty"):
        net.predict(sx[:, :0], sy[:, :0], qx)


def test_protonet_evaluate_reports_loss_and_accuracy_per_task():
    net = PrototypicalNetwork(encoder(2))
    sx, sy, qx, qy = episode(3, 4, 3, 2, 3)
    out = net.evaluate(sx, sy, qx, qy)
    logits = net.predict(sx, sy, qx).detach()
    assert set(out) == {"loss", "accuracy"} and out["loss"].shape == (4,) and not out["loss"].requires_grad
    for t in range(4):
        close(out["loss"][t], F.cross_entropy(logits[t], qy[t]))
        assert float(out["accuracy"][t]) == pytest.approx(float((logits[t].argmax(-1) == qy[t]).double().mean()))


# =============================================================================================
# Matching Networks
# =============================================================================================

@QUICK
@given(e=episodes)
def test_matching_attention_is_softmax_of_hand_cosines(e):
    f = encoder(e["seed"])
    sx, sy, qx, qy = episode(e["seed"] + 1, e["tasks"], e["ways"], e["shots"], e["query"])
    net = MatchingNetwork(f)
    attention = net.attention(sx, sy, qx)
    assert attention.shape == (e["tasks"], qx.shape[1], sx.shape[1])
    expected_attention = torch.empty_like(attention)
    expected_probabilities = torch.zeros(e["tasks"], qx.shape[1], e["ways"], dtype=F64)
    for t in range(e["tasks"]):
        for q in range(qx.shape[1]):
            z = f(qx[t, q])
            cosines = torch.stack([(z @ f(sx[t, i])) / (z.norm() * f(sx[t, i]).norm()) for i in range(sx.shape[1])])
            weights = cosines.exp() / cosines.exp().sum()
            expected_attention[t, q] = weights
            for i in range(sx.shape[1]):
                expected_probabilities[t, q, sy[t, i]] += weights[i]
    close(attention, expected_attention)
    log_probabilities = net.predict(sx, sy, qx)
    close(log_probabilities.exp(), expected_probabilities)
    close(log_probabilities.exp().sum(-1), torch.ones(e["tasks"], qx.shape[1], dtype=F64))
    close(net.meta_loss(sx, sy, qx, qy), F.nll_loss(expected_probabilities.log().flatten(0, 1), qy.flatten()))


def test_matching_full_context_embeddings_run_and_are_differentiable():
    f = encoder(5)
    sx, sy, qx, qy = episode(6, 2, 3, 2, 2)
    torch.manual_seed(7)
    net = MatchingNetwork(f, full_context=True, embedding_dim=4, fce_steps=3).to(F64)
    log_probabilities = net.predict(sx, sy, qx)
    close(log_probabilities.exp().sum(-1), torch.ones(2, 6, dtype=F64))
    # FCE changes the attention (it is not the plain cosine attention)
    plain = MatchingNetwork(f)
    assert not torch.allclose(net.attention(sx, sy, qx), plain.attention(sx, sy, qx))
    params = list(net.parameters())
    assert {id(p) for p in net.fce.parameters()} <= {id(p) for p in params}
    loss = net.meta_loss(sx, sy, qx, qy)
    grads = torch.autograd.grad(loss, params)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert all(float(g.abs().max()) > 0 for g in grads)  # the encoder, both LSTMs: every weight learns
    # the gradient against a central finite difference along a random direction
    g = torch.Generator().manual_seed(8)
    direction = [torch.randn(p.shape, generator=g, dtype=F64) for p in params]
    analytic = sum((gi * d).sum() for gi, d in zip(grads, direction))

    def at(h: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(h * d)
            value = float(net.meta_loss(sx, sy, qx, qy))
            for p, d in zip(params, direction):
                p.sub_(h * d)
        return value
    h = 1e-5
    numeric = (at(h) - at(-h)) / (2 * h)
    assert abs(numeric - float(analytic)) <= 1e-6 * max(1.0, abs(float(analytic)))
    with pytest.raises(ValueError, match="full_context=True needs embedding_dim"):
        MatchingNetwork(f, full_context=True)


# =============================================================================================
# Siamese networks
# =============================================================================================

@QUICK
@given(e=episodes)
def test_siamese_pair_labels_and_positive_weighting(e):
    f = encoder(e["seed"])
    sx, sy, qx, qy = episode(e["seed"] + 1, e["tasks"], e["ways"], e["shots"], e["query"])
    torch.manual_seed(e["seed"])
    net = SiameseNetwork(f, embedding_dim=4).to(F64)
    w, b = net.verifier.weight[0], net.verifier.bias[0]
    terms = []
    positives = negatives = 0
    for t in range(e["tasks"]):
        for q in range(qx.shape[1]):
            for s in range(sx.shape[1]):
                logit = w @ (f(qx[t, q]) - f(sx[t, s])).abs() + b
                same = bool(qy[t, q] == sy[t, s])
                positives, negatives = positives + same, negatives + (not same)
                p = torch.sigmoid(logit)
                terms.append(-(e["ways"] - 1) * p.log() if same else -(1 - p).log())
    # every query meets `shots` support examples of its class and (ways − 1)·shots of others:
    # the weight ways − 1 makes the two kinds count equally
    assert negatives == (e["ways"] - 1) * positives
    hand = torch.stack(terms).mean()
    loss = net.meta_loss(sx, sy, qx, qy)
    close(loss, hand)
    params = list(net.parameters())
    for a, c in zip(torch.autograd.grad(loss, params), torch.autograd.grad(hand, params)):
        close(a, c)


def test_siamese_classifies_by_the_most_similar_support_example():
    """1-D points, logit = −|x − s|: the nearest single support example decides, not the class mean."""
    net = SiameseNetwork(nn.Identity(), embedding_dim=1).to(F64)
    with torch.no_grad():
        net.verifier.weight.fill_(-1.0)
        net.verifier.bias.zero_()
    support = torch.tensor([[3.0], [5.0], [4.6], [30.0], [-20.0]], dtype=F64)
    labels = torch.tensor([0, 0, 1, 1, 2])
    queries = torch.tensor([[4.5], [5.2], [25.0], [-15.0]], dtype=F64)
    logits = net.predict(support[None], labels[None], queries[None])[0]
    # query 4.5: the nearest example is 4.6 (class 1) although class 0's mean (4) is much nearer than class 1's
    assert logits.argmax(-1).tolist() == [1, 0, 1, 2]
    expected = torch.tensor([[-0.5, -0.1, -24.5], [-0.2, -0.6, -25.2], [-20.0, -5.0, -45.0], [-18.0, -19.6, -5.0]],
                            dtype=F64)
    close(logits, expected)  # per class: the best similarity logit over that class's support examples
    protonet = PrototypicalNetwork(nn.Identity())
    assert protonet.predict(support[None], labels[None], queries[None])[0].argmax(-1).tolist()[0] == 0
    accuracy = net.evaluate(support[None], labels[None], queries[None], torch.tensor([[1, 0, 1, 2]]))["accuracy"]
    assert float(accuracy) == 1.0


# =============================================================================================
# Bad input, recipes
# =============================================================================================

def metric_learners() -> dict[str, nn.Module]:
    return {
        "PrototypicalNetwork": PrototypicalNetwork(encoder(0)),
        "MatchingNetwork": MatchingNetwork(encoder(0)),
        "MatchingNetworkFCE": MatchingNetwork(encoder(0), full_context=True, embedding_dim=4).to(F64),
        "SiameseNetwork": SiameseNetwork(encoder(0), embedding_dim=4).to(F64),
    }


@pytest.mark.parametrize("name", ["PrototypicalNetwork", "MatchingNetwork", "MatchingNetworkFCE", "SiameseNetwork"])
def test_mismatched_support_and_query_shapes_are_refused(name):
    learner = metric_learners()[name]
    sx, sy, qx, qy = episode(0, 2, 3, 2, 2)
    cases = {
        "support has 2 tasks but query has 1": (sx, sy, qx[:1], qy[:1]),
        r"support inputs \(2, 6\) and labels \(2, 5\)": (sx, sy[:, :5], qx, qy),
        r"support examples have shape \(3,\) but query examples \(4,\)": (sx, sy, torch.randn(2, 6, 4, dtype=F64), qy),
        "leading task dimension and an example dimension": (sx[0, :, 0], sy[0], qx[0, :, 0], qy[0]),
    }
    for message, batch in cases.items():
        with pytest.raises(ValueError, match=message):
            learner.meta_loss(*batch)
        with pytest.raises(ValueError, match=message):
            learner.predict(*batch[:3])
        with pytest.raises(ValueError, match=message):
            learner.evaluate(*batch)
    # query labels that do not match the query inputs, even when the totals agree (2·6 = 3·4)
    for labels, shape in ((qy[:, :5], r"\(2, 5\)"), (qy.reshape(3, 4), r"\(3, 4\)")):
        with pytest.raises(ValueError, match=r"query inputs \(2, 6\) and labels " + shape):
            learner.meta_loss(sx, sy, qx, labels)
        with pytest.raises(ValueError, match=r"query inputs \(2, 6\) and labels " + shape):
            learner.evaluate(sx, sy, qx, labels)


@pytest.mark.parametrize("name,cls", [("protonet", PrototypicalNetwork), ("matching", MatchingNetwork),
                                      ("siamese", SiameseNetwork)])
def test_recipes_build_metric_learners(name, cls):
    learner = make_learner(name, encoder(0), classification=True, embedding_dim=4)
    assert isinstance(learner, cls) and learner.config()["algorithm"] == cls.__name__
    assert math.isfinite(float(learner.to(F64).meta_loss(*episode(1, 2, 3, 1, 2)).detach()))


# =============================================================================================
# Encoders with batch statistics: a task's support and query are embedded as one batch
# =============================================================================================

def bn_encoder(seed: int, d_in: int = 3, d_out: int = 4) -> nn.Module:
    """An MLP with BatchNorm1d on batch statistics (as recipes.conv_block's BatchNorm2d)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Tanh(),
                         nn.Linear(6, d_out)).to(F64)


def bn_learners() -> dict[str, nn.Module]:
    return {
        "PrototypicalNetwork": PrototypicalNetwork(bn_encoder(0)),
        "MatchingNetwork": MatchingNetwork(bn_encoder(0)),
        "SiameseNetwork": SiameseNetwork(bn_encoder(0), embedding_dim=4).to(F64),
    }


def test_batchnorm_protonet_matches_a_hand_written_joint_batch_reference():
    """Snell et al.'s code: per task, encoder(cat(support, query)), prototypes from the support rows."""
    learner = bn_learners()["PrototypicalNetwork"].eval()
    sx, sy, qx, qy = episode(3, 2, 3, 2, 2)
    logits = learner.predict(sx, sy, qx)
    for t in range(2):
        z = learner.encoder(torch.cat([sx[t], qx[t]]))
        zs, zq = z[:sx.shape[1]], z[sx.shape[1]:]
        centres = torch.stack([zs[sy[t] == k].mean(0) for k in range(3)])
        reference = torch.stack([torch.stack([-((q - c) ** 2).sum() for c in centres]) for q in zq])
        close(logits[t], reference)


@pytest.mark.parametrize("name", ["PrototypicalNetwork", "MatchingNetwork", "SiameseNetwork"])
def test_batchnorm_query_equal_to_a_support_example_is_recognised_alone_or_with_others(name):
    """A query that is support example 0 has the same embedding, so (ProtoNet, 1-shot) is at distance 0
    from its prototype whether asked alone, with the others, or as the only query (a batch of one
    had crashed BatchNorm1d, and separate batches had put it at distance² −9.35 with Conv-4)."""
    learner = bn_learners()[name].eval()
    sx, sy, _, _ = episode(4, 1, 3, 1, 1)
    label = int(sy[0, 0])
    with torch.no_grad():
        for query in (sx[:, :1], sx):  # alone, and with the other support examples
            if name == "PrototypicalNetwork":
                assert float(learner.predict(sx, sy, query)[0, 0, label]) == pytest.approx(0.0, abs=1e-12)
            elif name == "MatchingNetwork":  # cosine 1 with itself: the most attended support example
                assert int(learner.attention(sx, sy, query)[0, 0].argmax()) == 0
            else:  # |f(x) − f(x)| = 0: the verifier's logit is its bias
                close(learner.similarity(sx, query)[0, 0, 0], learner.verifier.bias[0])
    assert math.isfinite(float(learner.meta_loss(sx, sy, sx[:, :1], sy[:, :1]).detach()))


@pytest.mark.parametrize("name", ["PrototypicalNetwork", "MatchingNetwork", "SiameseNetwork"])
def test_predictions_do_not_depend_on_how_queries_are_ordered_or_grouped(name):
    """With batch statistics the support and query of a task share one batch, so permuting the queries
    permutes the predictions; without BatchNorm, asking the queries one at a time gives the batch's."""
    sx, sy, qx, _ = episode(5, 2, 3, 2, 2)
    perm = torch.randperm(qx.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        learner = bn_learners()[name].eval()
        close(learner.predict(sx, sy, qx[:, perm]), learner.predict(sx, sy, qx)[:, perm])
        plain = metric_learners()[name].eval()
        batch = plain.predict(sx, sy, qx)
        one_by_one = torch.cat([plain.predict(sx, sy, qx[:, j:j + 1]) for j in range(qx.shape[1])], dim=1)
        close(one_by_one, batch)
