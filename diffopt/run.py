"""``diffopt train``: build the task source, model and learner a command line asks for, and train."""
from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from . import distributed, recipes
from .recipes import EpisodeSource, SinusoidSource
from .tasks import omniglot_splits, synthetic_glyphs, synthetic_vectors
from .training import Trainer

PROTOCOL_DEFAULTS = {  # meta-batch, shots, query, inner lr for each task family
    "sinusoid": (25, 10, 10, 0.01),
    "synthetic": (8, 1, 15, 0.4),
    "glyphs": (4, 1, 15, 0.4),
    "omniglot": (32, 1, 15, 0.4),
}
ITERATIONS_PER_EPOCH = 500  # MAML++'s epoch (Antoniou et al., 2019): its annealing schedules count these


def set_epoch(learner: Any, iteration: int) -> None:
    """``Trainer(before_step=...)`` for learners with epoch-based schedules (MAML++)."""
    learner.set_epoch(iteration // ITERATIONS_PER_EPOCH)


def build(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """(task source, learner, config) for parsed ``diffopt train`` arguments."""
    meta_batch, shots, query, inner_lr = PROTOCOL_DEFAULTS[args.task]
    meta_batch = args.meta_batch or meta_batch
    shots = args.shots if args.shots is not None else shots
    query = args.query if args.query is not None else query
    inner_lr = args.inner_lr if args.inner_lr is not None else inner_lr
    if args.algo == "mamlpp" and args.inner_steps == 1:
        args.inner_steps = 5
    torch.manual_seed(args.seed)
    if args.task == "sinusoid":
        source = SinusoidSource(meta_batch, shots, query, test_tasks=args.test_tasks)
        model, embedding, classification = recipes.sinusoid_mlp(), None, False
    else:
        if args.task == "synthetic":
            data = synthetic_vectors(seed=args.seed)
            train, test = data.split([0.7, 0.3], seed=args.seed)[0], data.split([0.7, 0.3], seed=args.seed)[1]
        elif args.task == "glyphs":
            data = synthetic_glyphs(seed=args.seed)
            train, test = data.split([0.7, 0.3], seed=args.seed)[0], data.split([0.7, 0.3], seed=args.seed)[1]
        else:
            if args.data_root is None:
                raise SystemExit("--task omniglot needs --data-root (the folder with images_background/ and "
                                 "images_evaluation/)")
            splits = omniglot_splits(args.data_root, seed=args.seed,
                                     num_train=getattr(args, "omniglot_train_classes", 1200))
            train, test = splits.train, splits.test
        source = EpisodeSource(train, test, meta_batch=meta_batch, ways=args.ways, shots=shots, query=query,
                               test_tasks=args.test_tasks, name=args.task)
        classification = True
        metric = args.algo in ("protonet", "matching", "siamese")
        if train.example_shape == (1, 28, 28) or len(train.example_shape) == 3:
            channels = train.example_shape[0]
            encoder = recipes.conv4_encoder(channels)
            model, embedding = (encoder if metric else torch.nn.Sequential(*encoder, torch.nn.Linear(64, args.ways))), 64
        else:
            features = train.example_shape[0]
            if metric:
                model = torch.nn.Sequential(torch.nn.Linear(features, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
            else:
                model = recipes.mlp_classifier(features, args.ways)
            embedding = 64
    options: dict[str, Any] = {}
    learner = recipes.make_learner(args.algo, model, classification=classification, ways=args.ways,
                                   inner_lr=inner_lr, inner_steps=args.inner_steps, mode=args.mode,
                                   embedding_dim=embedding, **options)
    config = {"algo": args.algo, "inner_lr": inner_lr, "outer_lr": args.outer_lr}
    return source, learner, config


def train_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train as the arguments say; under torchrun (WORLD_SIZE > 1) as one rank of the group.

    Returns the summary on rank 0 and None on the other ranks.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    context = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        context = distributed.initialize(args.backend, args.timeout)
    try:
        return _train(args, context)
    finally:
        if context is not None:
            distributed.shutdown()


def _train(args: argparse.Namespace, context: Any) -> dict[str, Any] | None:
    source, learner, config = build(args)
    outer_lr = 1.0 if args.algo == "reptile" and args.outer_lr == 1e-3 else args.outer_lr
    optimizer = (torch.optim.SGD(learner.parameters(), lr=outer_lr) if args.algo == "reptile"
                 else torch.optim.Adam(learner.parameters(), lr=outer_lr))
    steps = tuple(int(s) for s in args.eval_steps.split(",") if s.strip())
    trainer = Trainer(learner, source, optimizer, iterations=args.iterations, seed=args.seed,
                      eval_every=args.eval_every, eval_steps=steps, checkpoint=args.checkpoint,
                      checkpoint_every=args.checkpoint_every, resume=args.resume, metrics=args.metrics,
                      progress=not args.no_progress, config=config, distributed=context,
                      before_step=set_epoch if hasattr(learner, "set_epoch") else None)
    history = trainer.fit()
    if not trainer.is_main:
        return None
    return {"iterations": trainer.iteration, "world_size": 1 if context is None else context.world_size,
            "final": history[-1]["eval"]}
