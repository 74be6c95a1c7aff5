"""Seeded meta-training runs that must learn, by a stated margin (each a few seconds on one CPU thread).

* MAML on MAML's sinusoid protocol (1-40-40-1, α = 0.01, one inner step): 300
  meta-iterations cut the query MSE after one test-time step by at least 50%
  from the initialisation, and adaptation then helps (1 step well below 0 steps).
* Prototypical Networks on ``diffopt.tasks.synthetic_vectors`` (5-way 1-shot,
  chance 0.2, nearest prototype on raw inputs about 0.45): test accuracy at least 0.6.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffopt.algorithms import MAML, PrototypicalNetwork
from diffopt.recipes import EpisodeSource, SinusoidSource, sinusoid_mlp
from diffopt.tasks import synthetic_vectors
from diffopt.training import Trainer, evaluate


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_maml_sinusoid_learns_to_adapt_in_one_step():
    source = SinusoidSource(meta_batch=10, shots=10, test_tasks=100, test_shots=10, test_query=50)
    torch.manual_seed(0)
    learner = MAML(sinusoid_mlp(), F.mse_loss, inner_lr=0.01, inner_steps=1)
    before = evaluate(learner, source.test_batches(), (0, 1))["loss"]
    trainer = Trainer(learner, source, torch.optim.Adam(learner.parameters(), lr=1e-2), iterations=300, seed=0,
                      eval_steps=(0, 1), progress=False)
    after = trainer.fit()[-1]["eval"]["loss"]
    assert after["1"]["mean"] <= 0.5 * before["1"]["mean"], (before, after)  # measured: 3.50 -> 1.25
    assert after["1"]["mean"] <= 0.6 * after["0"]["mean"]  # one step of adaptation now pays off


def vector_episodes(meta_batch: int = 8, test_tasks: int = 200) -> EpisodeSource:
    data = synthetic_vectors(num_classes=100, examples_per_class=20, seed=0)
    train, test = data.split([0.7, 0.3], seed=0)
    return EpisodeSource(train, test, meta_batch=meta_batch, ways=5, shots=1, query=5, test_tasks=test_tasks)


def test_protonet_synthetic_vectors_well_above_chance():
    source = vector_episodes()
    torch.manual_seed(0)
    learner = PrototypicalNetwork(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)))
    before = evaluate(learner, source.test_batches())["accuracy"]["mean"]
    trainer = Trainer(learner, source, torch.optim.Adam(learner.parameters(), lr=1e-3), iterations=200, seed=0,
                      progress=False)
    after = trainer.fit()[-1]["eval"]["accuracy"]
    assert after["tasks"] == 200
    assert after["mean"] >= 0.6 and after["mean"] - after["ci95"] > before + 0.2, (before, after)  # 0.27 -> 0.78
