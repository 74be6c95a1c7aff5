"""What ``diffopt train`` runs: the task source, model and learner a :class:`TrainSettings` asks
for (:func:`build`), the training itself (:func:`train`, also as one rank of a
``torchrun`` group), and the rebuild of a learner from such a run's checkpoint
(:func:`rebuild`, which ``diffopt diagnose`` uses).

The command line (:mod:`diffopt.cli.train`) only turns its arguments into a
:class:`TrainSettings` and prints the summary :func:`train` returns.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import torch

from .. import distributed, recipes
from ..recipes import EpisodeSource, SinusoidSource
from ..tasks import load_omniglot, omniglot_splits, synthetic_glyphs, synthetic_vectors
from ..errors import CheckpointError
from .trainer import Trainer, config_differences, load_checkpoint, outer_adam

PROTOCOL_DEFAULTS = {  # meta-batch, shots, query, inner lr for each task family
    "sinusoid": (25, 10, 10, 0.01),
    "synthetic": (8, 1, 15, 0.4),
    "glyphs": (4, 1, 15, 0.4),
    "omniglot": (32, 1, 15, 0.4),
}
ITERATIONS_PER_EPOCH = 500  # MAML++'s epoch (Antoniou et al., 2019): its annealing schedules count these
TASKS = tuple(PROTOCOL_DEFAULTS)
OMNIGLOT_NEEDS_ROOT = "--task omniglot needs --data-root (the folder with images_background/ and images_evaluation/)"
METRIC_ALGORITHMS = ("protonet", "matching", "siamese")  # learners that need an embedding, not a classifier head
BACKENDS = ("auto", "gloo", "nccl", "mpi", "ucc")  # torch.distributed's; auto: nccl with CUDA, else gloo
DEFAULT_WAYS, DEFAULT_EVAL_STEPS, DEFAULT_OMNIGLOT_TRAIN_CLASSES = 5, (0, 1, 5, 10), 1200  # for settings left None
UNTRAINABLE_MODES = {  # engine modes 'diffopt train' cannot meta-train the initialisation in, and why
    "implicit": "implicit differentiation needs a proximal term to give the initialisation a meta-gradient; "
                "train iMAML with --algo imaml",
    "forward": "forward mode differentiates the inner optimizer's hyperparameters only, so the initialisation "
               "would get no meta-gradient; use second_order, first_order or checkpointed",
    "truncated": "truncated back-propagation needs truncate=k, which has no flag; use --mode checkpointed (the "
                 "same meta-gradient with less memory) or the Python API (InnerLoop(mode=Truncated(k)))",
}


@dataclasses.dataclass
class TrainSettings:
    """A ``diffopt train`` run. ``None`` means the task family's protocol default
    (:data:`PROTOCOL_DEFAULTS`: meta-batch, shots, query, inner learning rate; the outer
    learning rate is 1.0 for Reptile's ε, 1e-3 for Adam otherwise; 5 inner steps for MAML++, 1
    for the others; 5 ways for the classification families; test-time steps 0, 1, 5 and 10; 1200
    Omniglot training characters). A setting the run would ignore is refused by :meth:`validate`
    (``ways`` on sinusoid, ``data_root`` or ``omniglot_train_classes`` off Omniglot, ``eval_steps``,
    ``inner_lr`` or ``inner_steps`` for the metric learners); :meth:`with_defaults` fills the rest.

    ``overwrite`` allows a run without ``resume`` to replace an existing checkpoint
    and metrics file; without it such a run is refused."""

    task: str = "sinusoid"
    algo: str = "maml"
    mode: str | None = None
    iterations: int = 1000
    meta_batch: int | None = None
    inner_steps: int | None = None
    inner_lr: float | None = None
    outer_lr: float | None = None
    ways: int | None = None
    shots: int | None = None
    query: int | None = None
    test_tasks: int = 600
    eval_every: int = 0
    eval_steps: tuple[int, ...] | None = None
    seed: int = 0
    data_root: str | None = None
    omniglot_train_classes: int | None = None
    checkpoint: str | None = None
    checkpoint_every: int = 1000
    resume: bool = False
    overwrite: bool = False
    metrics: str | None = None
    threads: int | None = None
    progress: bool = True
    backend: str = "auto"
    timeout: float = 300.0

    def validate(self) -> None:
        """Refuse values no run can use, naming the setting and its flag (``ValueError``)."""
        counts = {"iterations": 0, "meta_batch": 1, "inner_steps": 0, "ways": 1, "shots": 1, "query": 1,
                  "test_tasks": 1, "eval_every": 0, "omniglot_train_classes": 1, "checkpoint_every": 1,
                  "threads": 1}
        for name, minimum in counts.items():
            value = getattr(self, name)
            if value is None and name not in ("iterations", "test_tasks", "eval_every", "checkpoint_every"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be an integer >= {minimum}, got {value!r}")
        for name in ("inner_lr", "outer_lr"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be a finite number > 0, got {value!r}")
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout (--timeout) must be a finite number of seconds > 0, got {self.timeout!r}")
        steps = None if self.eval_steps is None else tuple(self.eval_steps)
        if steps is not None and (not steps or any(isinstance(k, bool) or not isinstance(k, int) or k < 0
                                                   for k in steps)):
            raise ValueError(f"eval_steps (--eval-steps) must be one or more integers >= 0, got {list(steps)}")
        if self.resume and self.checkpoint is None:
            raise ValueError("--resume continues the run saved at --checkpoint; give --checkpoint PATH")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend (--backend) must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        self._validate_for_algorithm()

    def _validate_for_algorithm(self) -> None:
        """Refuse a flag the task or algorithm would ignore, and an engine mode it cannot be trained in here."""
        if self.task != "omniglot":
            for flag, value in (("--data-root", self.data_root), ("--omniglot-train-classes",
                                                                  self.omniglot_train_classes)):
                if value is not None:
                    raise ValueError(f"{flag} applies only to --task omniglot (the Omniglot images and their class "
                                     f"split); {self.task}'s tasks are generated")
        if self.task == "sinusoid" and self.ways is not None:
            raise ValueError("--ways does not apply to sinusoid, a regression task (one output, no classes)")
        if self.algo in METRIC_ALGORITHMS:
            given = [flag for flag, value in (("--inner-lr", self.inner_lr), ("--inner-steps", self.inner_steps),
                                              ("--eval-steps", self.eval_steps)) if value is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} do not apply to {self.algo}, which has no inner loop "
                                 "(it is evaluated once, with no test-time steps)")
        elif self.algo not in recipes.INNER_LR_ALGORITHMS and self.inner_lr is not None:
            raise ValueError(f"--inner-lr does not apply to {self.algo}: its per-parameter inner rates start uniform "
                             "in (0.005, 0.1) and are meta-learned")
        why = UNTRAINABLE_MODES.get(self.mode or "")
        if why is not None:
            raise ValueError(f"--mode {self.mode}: {why}")


    def with_defaults(self) -> TrainSettings:
        """These settings with ``ways``, ``eval_steps`` and ``omniglot_train_classes`` left ``None`` set to
        their defaults (5 ways for classification; steps 0, 1, 5, 10; 1200 Omniglot training characters)."""
        return dataclasses.replace(
            self,
            ways=self.ways if self.ways is not None or self.task == "sinusoid" else DEFAULT_WAYS,
            eval_steps=tuple(self.eval_steps) if self.eval_steps is not None else DEFAULT_EVAL_STEPS,
            omniglot_train_classes=(self.omniglot_train_classes if self.omniglot_train_classes is not None
                                    or self.task != "omniglot" else DEFAULT_OMNIGLOT_TRAIN_CLASSES),
        )


def set_epoch(learner: Any, iteration: int) -> None:
    """``Trainer(before_step=...)`` for learners with epoch-based schedules (MAML++)."""
    learner.set_epoch(iteration // ITERATIONS_PER_EPOCH)


def build(settings: TrainSettings) -> tuple[Any, Any, dict[str, Any]]:
    """(task source, learner, config) for a run's settings; ``config`` records the values applied."""
    if settings.task not in PROTOCOL_DEFAULTS:
        raise ValueError(f"task={settings.task!r}: choose one of {', '.join(PROTOCOL_DEFAULTS)}")
    settings.validate()
    settings = settings.with_defaults()
    meta_batch, shots, query, inner_lr = PROTOCOL_DEFAULTS[settings.task]
    meta_batch = settings.meta_batch or meta_batch
    shots = settings.shots if settings.shots is not None else shots
    query = settings.query if settings.query is not None else query
    inner_lr = settings.inner_lr if settings.inner_lr is not None else inner_lr
    if settings.inner_steps is not None:
        inner_steps = settings.inner_steps
    else:
        inner_steps = 5 if settings.algo == "mamlpp" else 1  # MAML++'s K (Antoniou et al., 2019)
    torch.manual_seed(settings.seed)
    if settings.task == "sinusoid":
        source = SinusoidSource(meta_batch, shots, query, test_tasks=settings.test_tasks)
        model, embedding, classification = recipes.sinusoid_mlp(), None, False
    else:
        if settings.task == "synthetic":
            data = synthetic_vectors(seed=settings.seed)
            train, test = data.split([0.7, 0.3], seed=settings.seed)[0], data.split([0.7, 0.3], seed=settings.seed)[1]
        elif settings.task == "glyphs":
            data = synthetic_glyphs(seed=settings.seed)
            train, test = data.split([0.7, 0.3], seed=settings.seed)[0], data.split([0.7, 0.3], seed=settings.seed)[1]
        else:
            if settings.data_root is None:
                raise ValueError(OMNIGLOT_NEEDS_ROOT)
            characters = load_omniglot(settings.data_root, seed=settings.seed)
            if settings.omniglot_train_classes >= characters.num_groups:
                raise ValueError(
                    f"--omniglot-train-classes {settings.omniglot_train_classes}: the folder {settings.data_root} has "
                    f"{characters.num_groups} characters; use fewer so that some remain for testing"
                )
            splits = omniglot_splits(characters, seed=settings.seed, num_train=settings.omniglot_train_classes)
            train, test = splits.train, splits.test
            for name, split, fix in (("training", train, "raise"), ("test", test, "lower")):
                if split.num_classes < settings.ways:
                    raise ValueError(
                        f"--ways {settings.ways}: the Omniglot {name} split has only {split.num_classes} classes "
                        f"({split.num_groups} character(s) × their rotations) with --omniglot-train-classes "
                        f"{settings.omniglot_train_classes} of the folder's {characters.num_groups} characters; "
                        f"{fix} --omniglot-train-classes or lower --ways"
                    )
        source = EpisodeSource(train, test, meta_batch=meta_batch, ways=settings.ways, shots=shots, query=query,
                               test_tasks=settings.test_tasks, name=settings.task)
        classification = True
        metric = settings.algo in METRIC_ALGORITHMS
        if train.example_shape == (1, 28, 28) or len(train.example_shape) == 3:
            channels = train.example_shape[0]
            encoder = recipes.conv4_encoder(channels)
            # the classifier head is drawn only when used, after the encoder (the seed's stream of draws)
            model = encoder if metric else torch.nn.Sequential(*encoder, torch.nn.Linear(64, settings.ways))
            embedding = 64
        else:
            features = train.example_shape[0]
            if metric:
                model = torch.nn.Sequential(torch.nn.Linear(features, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
            else:
                model = recipes.mlp_classifier(features, settings.ways)
            embedding = 64
    # Reptile's ε is the outer learning rate: its schedule sets the SGD step, so the learner gets the value
    outer_lr = settings.outer_lr if settings.outer_lr is not None else (1.0 if settings.algo == "reptile" else 1e-3)
    options: dict[str, Any] = {"outer_lr": outer_lr} if settings.algo == "reptile" else {}
    learner = recipes.make_learner(settings.algo, model, classification=classification, ways=settings.ways,
                                   inner_lr=inner_lr, inner_steps=inner_steps, mode=settings.mode,
                                   embedding_dim=embedding, **options)
    config = {"algo": settings.algo, "inner_lr": inner_lr, "outer_lr": outer_lr}
    if settings.task == "omniglot":  # the class split: a resume or a diagnosis must rebuild the same one
        config["omniglot_train_classes"] = settings.omniglot_train_classes
    return source, learner, config


def train(settings: TrainSettings) -> dict[str, Any] | None:
    """Train as the settings say; under torchrun (WORLD_SIZE > 1) as one rank of the group.

    Returns the summary on rank 0 and None on the other ranks.
    """
    if settings.threads:
        torch.set_num_threads(settings.threads)
    context = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        context = distributed.initialize(settings.backend, settings.timeout)
    try:
        return _train(settings, context)
    finally:
        if context is not None:
            distributed.shutdown()


def check_outputs(settings: TrainSettings) -> None:
    """Refuse to replace an earlier run's checkpoint or metrics without ``resume`` or ``overwrite``."""
    refuse_replacing(settings.checkpoint, settings.metrics, resume=settings.resume, overwrite=settings.overwrite)


def refuse_replacing(checkpoint: str | None, metrics: str | None, *, resume: bool, overwrite: bool) -> None:
    """A run's ``--checkpoint`` and ``--metrics`` that already exist are an earlier run's: refused unless
    ``resume`` continues it or ``overwrite`` replaces it (``diffopt train`` and ``train-optimizer``)."""
    if resume or overwrite:
        return
    for path, flag in ((checkpoint, "--checkpoint"), (metrics, "--metrics")):
        if path is not None and Path(path).is_file():
            raise ValueError(
                f"{flag} {path} already exists: continue that run with --resume, or replace it with --overwrite"
            )


def _train(settings: TrainSettings, context: Any) -> dict[str, Any] | None:
    check_outputs(settings)  # every rank: one refusing alone would leave the others waiting
    source, learner, config = build(settings)
    outer_lr = config["outer_lr"]
    optimizer = (torch.optim.SGD(learner.parameters(), lr=outer_lr) if settings.algo == "reptile"
                 else outer_adam(learner.parameters(), lr=outer_lr))
    trainer = Trainer(learner, source, optimizer, iterations=settings.iterations, seed=settings.seed,
                      eval_every=settings.eval_every, eval_steps=settings.with_defaults().eval_steps,
                      checkpoint=settings.checkpoint,
                      checkpoint_every=settings.checkpoint_every, resume=settings.resume, metrics=settings.metrics,
                      progress=settings.progress, config=config, distributed=context,
                      before_step=set_epoch if hasattr(learner, "set_epoch") else None)
    history = trainer.fit()
    if not trainer.is_main:
        return None
    return {"iterations": trainer.iteration, "world_size": 1 if context is None else context.world_size,
            "final": history[-1]["eval"]}


def settings_from_checkpoint(config: dict[str, Any], tasks: int, data_root: str | None) -> TrainSettings:
    """The settings that rebuild the learner and task source of a ``diffopt train`` checkpoint's
    configuration, with ``tasks`` held-out test tasks."""
    if "algo" not in config or "tasks" not in config or "task" not in config.get("tasks", {}):
        raise ValueError("the checkpoint was not written by 'diffopt train' (its configuration has no algorithm "
                         "and task family); rebuild the learner in Python, load its weights and call "
                         "diffopt.diagnostics.diagnose(learner, tasks, ...)")
    source, learner, algo = config["tasks"], config.get("learner", {}), config["algo"]
    return TrainSettings(
        task=source["task"], algo=algo, meta_batch=source.get("meta_batch"), shots=source.get("shots"),
        query=source.get("query"), ways=source.get("ways"), test_tasks=tasks, seed=config.get("seed", 0),
        inner_lr=config.get("inner_lr") if algo in recipes.INNER_LR_ALGORITHMS else None,
        inner_steps=None if algo in METRIC_ALGORITHMS else learner.get("inner_steps", 1),
        mode=learner.get("mode") if algo in recipes.MODE_ALGORITHMS else None,
        data_root=data_root, outer_lr=config.get("outer_lr", 1e-3),
        omniglot_train_classes=config.get("omniglot_train_classes"),
    )


def rebuild(path: str, tasks: int = 25, data_root: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """``(learner, task source, payload)`` from a ``diffopt train`` checkpoint, weights loaded.

    The checkpoint is read with ``weights_only=True``; the learner's configuration
    is checked against the rebuilt one. The global RNG state is restored after
    the rebuild (building a model draws its initial weights from it).
    """
    payload = load_checkpoint(path)
    config = payload.get("config", {})
    settings = settings_from_checkpoint(config, tasks, data_root)
    with torch.random.fork_rng(devices=[]):
        source, learner, _ = build(settings)
    saved = config.get("learner")
    if saved is not None:
        diff = config_differences(saved, learner.config())
        if diff:
            raise ValueError(f"{path}: the rebuilt learner does not match the checkpoint's: " + "; ".join(diff))
    if not isinstance(payload.get("learner"), dict):
        raise CheckpointError(f"{path} is not a complete diffopt training checkpoint (it has no learner weights)")
    try:
        learner.load_state_dict(payload["learner"])
    except Exception as error:  # noqa: BLE001 - size mismatch, missing keys: one line
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: its learner weights do not fit the rebuilt learner ({reason})") from None
    learner.eval()
    return learner, source, payload
