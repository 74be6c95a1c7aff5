"""Few-shot tasks for meta-learning: ``diffopt.tasks``.

* :class:`SinusoidTasks` — MAML's sinusoid regression (``y = A·sin(x − b)``).
* :class:`FewShotDataset` — N-way K-shot episodes over any labelled data:
  class-disjoint seeded splits, per-task label permutation, rotations as new classes.
* :func:`load_omniglot` / :func:`omniglot_splits` — Omniglot from a local folder
  in its published layout (1200 training characters + rotations, 28×28).
* :func:`synthetic_vectors` / :func:`synthetic_glyphs` — learnable few-shot
  families that need no download (vectors, and 1×28×28 images for Conv-4).
* :func:`read_png` / :func:`write_png` — a dependency-free PNG codec.
* :func:`mean_ci95` — mean and 95% confidence half-width over test tasks.

Every sampler draws from its own seeded :class:`torch.Generator` (or one passed
as ``generator=``); the global RNG is never touched.
"""
from ._checks import mean_ci95
from .episodes import ROTATION_ANGLES, Episode, EpisodeSet, FewShotDataset
from .omniglot import (
    OMNIGLOT_DOWNLOAD_URLS,
    OMNIGLOT_NUM_CHARACTERS,
    OMNIGLOT_SUBSETS,
    OmniglotLayoutError,
    OmniglotSplits,
    load_omniglot,
    omniglot_splits,
    scan_omniglot,
)
from .png import PngError, read_png, read_png_gray, write_png
from .sinusoid import SinusoidBatch, SinusoidTasks, sinusoid
from .synthetic import render_strokes, synthetic_glyphs, synthetic_vectors

__all__ = [
    "Episode",
    "EpisodeSet",
    "FewShotDataset",
    "ROTATION_ANGLES",
    "OMNIGLOT_DOWNLOAD_URLS",
    "OMNIGLOT_NUM_CHARACTERS",
    "OMNIGLOT_SUBSETS",
    "OmniglotLayoutError",
    "OmniglotSplits",
    "load_omniglot",
    "omniglot_splits",
    "scan_omniglot",
    "PngError",
    "read_png",
    "read_png_gray",
    "write_png",
    "SinusoidBatch",
    "SinusoidTasks",
    "sinusoid",
    "mean_ci95",
    "render_strokes",
    "synthetic_glyphs",
    "synthetic_vectors",
]
