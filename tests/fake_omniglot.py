"""A generated folder in Omniglot's layout, for the loader, CLI and reproduction tests.

``root/images_background|images_evaluation/Alphabet_<a>/character<NN>/<k>_<d>.png``:
each character ``k`` is a black bar on white whose row and length encode ``k``, and
drawing ``d`` shifts it sideways, so characters differ and drawings of one are alike.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from diffopt.tasks import write_png


def character(k: int, drawing: int) -> np.ndarray:
    """28x28, white (True) with a 4-pixel black bar: row ``k % 24``, length ``6 + (k // 24) % 18``."""
    img = np.ones((28, 28), dtype=bool)
    row, length = k % 24, 6 + (k // 24) % 18
    img[row:row + 4, 2 + drawing:2 + drawing + length] = False
    return img


def write_fake_omniglot(root: Path, alphabets: dict[str, int], characters: int, drawings: int) -> int:
    """Write ``alphabets[subset]`` alphabets of ``characters`` characters per subset; returns the count."""
    k = 0
    for subset, count in alphabets.items():
        for a in range(count):
            for c in range(characters):
                folder = root / subset / f"Alphabet_{a}" / f"character{c + 1:02d}"
                folder.mkdir(parents=True)
                for d in range(drawings):
                    write_png(character(k, d), folder / f"{k:04d}_{d + 1:02d}.png")
                k += 1
    return k
