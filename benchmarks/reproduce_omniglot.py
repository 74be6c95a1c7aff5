"""Omniglot few-shot classification under the papers' protocols, from a local Omniglot folder.

The data cannot be downloaded by this script: ``--data-root`` is the folder holding
``images_background/`` and ``images_evaluation/`` (the layout of the official zip files,
``<subset>/<Alphabet>/<character>/*.png``). Protocol (Vinyals et al. 2016; Finn et al. 2017):
1200 meta-training characters, the rest for testing, 90° rotations as new classes, 28×28 images,
600 test tasks, accuracy mean ± 95% CI.

Methods and settings
--------------------
* ``maml`` / ``fomaml``: MAML's network (4 × [3×3 conv stride 2, 64 filters, BatchNorm, ReLU], spatial
  mean, linear head) with transductive BatchNorm (batch statistics of the support set in the inner
  loop and of the query set at prediction, train and test alike), Adam 1e-3.
  5-way: α = 0.4, 1 inner step in training, 3 at test, meta-batch 32.
  20-way: α = 0.1, 5 inner steps in training and at test, meta-batch 16.
* ``protonet``: Conv-4 (max-pool) encoder, squared Euclidean distance, one episode per update,
  trained with 60 ways (``--protonet-train-ways``) and 5 query points per class; Adam 1e-3.
* ``matching``: Conv-4 encoder, cosine attention (no full-context embedding), one episode per update,
  training ways = test ways; Adam 1e-3.
* ``siamese``: Conv-4 encoder, L1 distance + logistic verifier trained on every (query, support) pair
  of an episode; at test a query takes the class of its most similar support example; Adam 1e-3.

Default schedule: 60,000 iterations (``--iterations`` to shorten); default query points per class at
test: 15 (``--query``).

    python benchmarks/reproduce_omniglot.py --data-root ~/data/omniglot --methods maml,protonet \\
        --settings 5w1s,20w1s --iterations 60000 --json omniglot.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffopt.recipes import EpisodeSource, conv4_encoder, conv_block, make_learner
from diffopt.tasks import omniglot_splits
from diffopt.training import Trainer

METHODS = ("maml", "fomaml", "protonet", "matching", "siamese")
SETTINGS = {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1), "20w5s": (20, 5)}
NAMES = {"maml": "MAML", "fomaml": "first-order MAML", "protonet": "Prototypical Networks",
         "matching": "Matching Networks", "siamese": "Siamese Networks"}
# references.md (accuracy %, 95% CI where published)
PAPER: dict[str, dict[str, tuple[float, float | None]]] = {
    "maml": {"5w1s": (98.7, 0.4), "5w5s": (99.9, 0.1), "20w1s": (95.8, 0.3), "20w5s": (98.9, 0.2)},
    "fomaml": {"5w1s": (98.3, 0.5), "5w5s": (99.2, 0.2), "20w1s": (89.4, 0.5), "20w5s": (97.9, 0.1)},
    "protonet": {"5w1s": (98.8, None), "5w5s": (99.7, None), "20w1s": (96.0, None), "20w5s": (98.9, None)},
    "matching": {"5w1s": (98.1, None), "5w5s": (98.9, None), "20w1s": (93.8, None), "20w5s": (98.5, None)},
    "siamese": {"5w1s": (97.3, None), "5w5s": (98.4, None), "20w1s": (88.2, None), "20w5s": (97.0, None)},
}


def maml_protocol(ways: int) -> dict[str, Any]:
    """MAML's Omniglot settings: (α, train steps, test steps, meta-batch)."""
    if ways >= 20:
        return {"inner_lr": 0.1, "train_steps": 5, "test_steps": 5, "meta_batch": 16}
    return {"inner_lr": 0.4, "train_steps": 1, "test_steps": 3, "meta_batch": 32}


def maml_network(ways: int) -> nn.Sequential:
    """MAML's Omniglot network: stride-2 convolutions (no pooling), mean over space, linear head.
    BatchNorm keeps no running statistics: it always normalises with the current batch (transductive)."""
    blocks = [conv_block(1 if i == 0 else 64, 64, pooling=False) for i in range(4)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, ways))


class SplitSource:
    """Training episodes from one :class:`EpisodeSource`, test episodes from another (different ways or
    query counts at training and test time, as Prototypical Networks train with 60 ways)."""

    def __init__(self, train: EpisodeSource, test: EpisodeSource) -> None:
        self.train_source, self.test_source = train, test

    def train_batch(self, generator: torch.Generator):
        return self.train_source.train_batch(generator)

    def test_batches(self):
        return self.test_source.test_batches()

    def config(self) -> dict[str, Any]:
        return {"train": self.train_source.config(), "test": self.test_source.config()}


def run_one(method: str, setting: str, splits: Any, args: argparse.Namespace) -> dict[str, Any]:
    ways, shots = SETTINGS[setting]
    query = args.query
    torch.manual_seed(args.seed)
    settings: dict[str, Any] = {"ways": ways, "shots": shots, "test_query": query}
    if method in ("maml", "fomaml"):
        p = maml_protocol(ways)
        meta_batch = args.meta_batch or p["meta_batch"]
        learner = make_learner(method, maml_network(ways), classification=True, ways=ways, inner_lr=p["inner_lr"],
                               inner_steps=p["train_steps"])
        train_query = query
        eval_steps: tuple[int, ...] = (0, p["test_steps"])
        settings.update(p, meta_batch=meta_batch)
        train_ways = ways
    else:
        meta_batch = args.meta_batch or 1
        train_ways = min(args.protonet_train_ways, splits.train.num_classes) if method == "protonet" else ways
        train_query = args.protonet_train_query if method == "protonet" else query
        learner = make_learner(method, conv4_encoder(1), classification=True, ways=ways, embedding_dim=64)
        eval_steps = (0,)
        settings.update(meta_batch=meta_batch, train_ways=train_ways, train_query=train_query)
    train_source = EpisodeSource(splits.train, splits.train, meta_batch=meta_batch, ways=train_ways, shots=shots,
                                 query=train_query, test_tasks=args.test_tasks, name="omniglot")
    test_source = EpisodeSource(splits.train, splits.test, meta_batch=meta_batch, ways=ways, shots=shots,
                                query=query, test_tasks=args.test_tasks, name="omniglot")
    source = SplitSource(train_source, test_source)
    optimizer = torch.optim.Adam(learner.parameters(), lr=args.outer_lr)
    started = time.perf_counter()
    trainer = Trainer(learner, source, optimizer, iterations=args.iterations, seed=args.seed, eval_steps=eval_steps,
                      progress=args.progress, log_every=max(args.iterations // 10, 1))
    trainer.fit()
    seconds = time.perf_counter() - started
    final = trainer.history[-1]["eval"]["accuracy"]
    accuracy = final[str(eval_steps[-1])] if method in ("maml", "fomaml") else final
    return {"method": method, "setting": setting, "accuracy": {"mean": 100 * accuracy["mean"],
                                                               "ci95": 100 * accuracy["ci95"],
                                                               "tasks": accuracy["tasks"]},
            "paper": PAPER[method][setting][0], "paper_ci95": PAPER[method][setting][1], "settings": settings,
            "seconds": seconds}


def table(rows: list[dict[str, Any]], settings: list[str]) -> str:
    lines = ["| method | " + " | ".join(f"{SETTINGS[s][0]}-way {SETTINGS[s][1]}-shot" for s in settings) + " |",
             "|---" * (len(settings) + 1) + "|"]
    by = {(r["method"], r["setting"]): r for r in rows}
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for s in settings:
            r = by.get((method, s))
            if r is None:
                cells.append("–")
                continue
            paper = f"{r['paper']}" + (f" ± {r['paper_ci95']}" if r["paper_ci95"] is not None else "")
            cells.append(f"{r['accuracy']['mean']:.1f} ± {r['accuracy']['ci95']:.1f} (paper {paper})")
        lines.append(f"| {NAMES[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_fake_omniglot(root: str | Path, characters: int = 40, drawings: int = 20, alphabets: int = 4) -> Path:
    """A synthetic folder in Omniglot's published layout (half the alphabets in ``images_background``,
    half in ``images_evaluation``), for running this script end to end where the real data is absent.
    Character ``k`` is a dark bar whose row and length encode ``k``; drawings shift it by a pixel."""
    import numpy as np

    from diffopt.tasks import write_png

    root = Path(root)
    per_alphabet = -(-characters // alphabets)
    for k in range(characters):
        a = k // per_alphabet
        subset = "images_background" if a < (alphabets + 1) // 2 else "images_evaluation"
        folder = root / subset / f"Alphabet_{a}" / f"character{k % per_alphabet + 1:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for d in range(drawings):
            img = np.ones((28, 28), dtype=bool)
            row, length = (3 * k) % 24, 6 + (7 * k) % 16
            shift = d % 4
            img[row:row + 4, 2 + shift:2 + shift + length] = False
            write_png(img, folder / f"{k:04d}_{d + 1:02d}.png")
    return root


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, help="Omniglot folder (images_background/, images_evaluation/)")
    p.add_argument("--write-fake", type=int, default=0, metavar="CHARACTERS",
                   help="first write a synthetic folder of this many characters (20 drawings each) at --data-root")
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--settings", type=lambda s: s.split(","), default=list(SETTINGS),
                   help=f"comma-separated, from {', '.join(SETTINGS)}")
    p.add_argument("--iterations", type=int, default=60000)
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--query", type=int, default=15, help="query points per class (test; training too except ProtoNets)")
    p.add_argument("--meta-batch", type=int, default=None, help="override the protocol's meta-batch")
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--protonet-train-ways", type=int, default=60)
    p.add_argument("--protonet-train-query", type=int, default=5)
    p.add_argument("--omniglot-train-classes", type=int, default=1200,
                   help="meta-training characters (the protocol's 1200; smaller only for test folders)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    for m in args.methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for s in args.settings:
        if s not in SETTINGS:
            raise SystemExit(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.write_fake:
        write_fake_omniglot(args.data_root, args.write_fake)
    splits = omniglot_splits(args.data_root, seed=args.seed, num_train=args.omniglot_train_classes)
    rows = []
    for method in args.methods:
        for setting in args.settings:
            rows.append(run_one(method, setting, splits, args))
            r = rows[-1]
            print(f"{NAMES[method]} {setting}: {r['accuracy']['mean']:.1f} ± {r['accuracy']['ci95']:.1f} "
                  f"(paper {r['paper']}), {r['seconds']:.0f} s", flush=True)
    out = {"iterations": args.iterations, "test_tasks": args.test_tasks, "query": args.query,
           "train_characters": splits.train.num_groups, "test_characters": splits.test.num_groups,
           "torch": torch.__version__, "rows": rows, "table": table(rows, args.settings),
           "total_seconds": time.perf_counter() - started}
    print(f"\nOmniglot: {args.iterations} iterations, {args.test_tasks} test tasks, "
          f"{out['train_characters']} training / {out['test_characters']} test characters; accuracy % mean ± 95% CI\n")
    print(out["table"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
