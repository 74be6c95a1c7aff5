"""Omniglot (Lake et al. 2015) read from a local folder, in its published layout.

Layout (the official repository's ``python/images_background.zip`` and
``python/images_evaluation.zip``, unzipped into one root folder)::

    root/images_background/<Alphabet>/<character01>/<drawing>.png   30 alphabets, 964 characters
    root/images_evaluation/<Alphabet>/<character01>/<drawing>.png   20 alphabets, 659 characters

1623 characters in all, 20 drawings each, 105×105 1-bit grayscale PNGs
(black strokes on white). Nothing is downloaded: the data must already be there.

Protocol (Vinyals et al. 2016, used by MAML, Prototypical Networks, Reptile,
iMAML; see ``references.md``): all 1623 characters are pooled and shuffled
(seeded), 1200 are used for meta-training and the rest for meta-testing
(class-disjoint); every character rotated by 90°, 180° and 270° is a new class
that stays in its source's split; images are resized to 28×28.

Pixel convention: float values in ``[0, 1]`` with **strokes = 1 and background
= 0** (``1 − intensity``, as MAML's data generator does), shape ``(1, 28, 28)``
per example. Resizing uses ``torch.nn.functional.interpolate`` (``"area"`` by
default, i.e. averaging, which keeps values in ``[0, 1]``).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import check_count, derive_seed
from .episodes import ROTATION_ANGLES, FewShotDataset
from .png import read_png_gray
from ..errors import OmniglotLayoutError

__all__ = [
    "OMNIGLOT_SUBSETS",
    "OMNIGLOT_NUM_CHARACTERS",
    "OMNIGLOT_DOWNLOAD_URLS",
    "OmniglotLayoutError",
    "OmniglotSplits",
    "scan_omniglot",
    "load_omniglot",
    "omniglot_splits",
]

OMNIGLOT_SUBSETS = ("images_background", "images_evaluation")
#: characters per subset in the real data set, and drawings per character
OMNIGLOT_CHARACTERS_PER_SUBSET = {"images_background": 964, "images_evaluation": 659}
OMNIGLOT_NUM_CHARACTERS = 1623
OMNIGLOT_DRAWINGS_PER_CHARACTER = 20
OMNIGLOT_DOWNLOAD_URLS = {
    "images_background": "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip",
    "images_evaluation": "https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip",
}
_CACHE_FORMAT = 1
_IGNORED = {"__MACOSX"}

PathLike = Union[str, "os.PathLike[str]"]


def _layout_help(root: Path) -> str:
    urls = "\n".join(f"    {u}" for u in OMNIGLOT_DOWNLOAD_URLS.values())
    return (
        f"Expected layout:\n"
        f"    {root}/images_background/<Alphabet>/<character01>/<drawing>.png\n"
        f"    {root}/images_evaluation/<Alphabet>/<character01>/<drawing>.png\n"
        f"Get the data from the official Omniglot repository (https://github.com/brendenlake/omniglot, folder "
        f"python/):\n{urls}\nand unzip both archives into {root} (this library never downloads)."
    )


def _entries(path: Path, limit: int = 8) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError:
        return "(unreadable)"
    if not names:
        return "nothing (empty folder)"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in _IGNORED)


def _pngs(path: Path) -> list[Path]:
    return sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".png" and not p.name.startswith(".")
    )


def _find_nested(root: Path, name: str, depth: int = 3) -> Optional[Path]:
    frontier = [root]
    for _ in range(depth):
        nxt = []
        for d in frontier:
            try:
                for p in _visible_dirs(d):
                    if p.name == name:
                        return p
                    nxt.append(p)
            except OSError:
                continue
        frontier = nxt[:200]
    return None


def scan_omniglot(root: PathLike, subsets: Sequence[str] = OMNIGLOT_SUBSETS) -> list[tuple[str, list[Path]]]:
    """Check the folder layout and list ``(class name, PNG paths)`` per character, sorted.

    Class names are ``"<subset>/<Alphabet>/<character>"``. Raises
    :class:`OmniglotLayoutError` saying what was expected and what was found.
    """
    root = Path(root).expanduser()
    subsets = tuple(subsets)
    for s in subsets:
        if s not in OMNIGLOT_SUBSETS:
            raise ValueError(f"subsets entry {s!r} is not an Omniglot subset; use some of {OMNIGLOT_SUBSETS}")
    if not subsets:
        raise ValueError(f"subsets is empty; use some of {OMNIGLOT_SUBSETS}")
    if not root.exists():
        raise OmniglotLayoutError(f"Omniglot folder not found: {root} does not exist.\n{_layout_help(root)}")
    if not root.is_dir():
        raise OmniglotLayoutError(f"Omniglot root {root} is a file, not a folder.\n{_layout_help(root)}")
    classes: list[tuple[str, list[Path]]] = []
    for subset in subsets:
        folder = root / subset
        if not folder.is_dir():
            hint = ""
            if (root / f"{subset}.zip").exists():
                hint = f"Found {subset}.zip in {root}: unzip it there (it contains the {subset}/ folder).\n"
            else:
                nested = _find_nested(root, subset)
                if nested is not None:
                    hint = f"Found {nested}: pass root={nested.parent} instead.\n"
            raise OmniglotLayoutError(
                f"Omniglot folder {root} has no {subset}/ folder; found: {_entries(root)}.\n{hint}{_layout_help(root)}"
            )
        alphabets = _visible_dirs(folder)
        if not alphabets:
            found = _entries(folder)
            raise OmniglotLayoutError(
                f"{folder} holds no alphabet folders (found: {found}); expected {subset}/<Alphabet>/<character>/*.png."
                + (" PNG files sit directly in it: they must be two folder levels deeper." if _pngs(folder) else "")
            )
        for alphabet in alphabets:
            if _pngs(alphabet):
                raise OmniglotLayoutError(
                    f"found PNG files directly in the alphabet folder {alphabet}; expected them one level deeper, "
                    f"in character folders: {subset}/<Alphabet>/<character>/*.png (character folders are at the "
                    f"wrong depth)"
                )
            characters = _visible_dirs(alphabet)
            if not characters:
                raise OmniglotLayoutError(
                    f"alphabet folder {alphabet} holds no character folders (found: {_entries(alphabet)}); "
                    f"expected {subset}/<Alphabet>/<character>/*.png"
                )
            for character in characters:
                files = _pngs(character)
                if not files:
                    inner = _visible_dirs(character)
                    extra = (
                        f" It holds folders ({_entries(character)}): there is an extra folder level; expected "
                        f"{subset}/<Alphabet>/<character>/*.png."
                        if inner
                        else f" Found: {_entries(character)}."
                    )
                    raise OmniglotLayoutError(f"character folder {character} holds no PNG files.{extra}")
                classes.append((f"{subset}/{alphabet.name}/{character.name}", files))
    return classes


def _fingerprint(classes: list[tuple[str, list[Path]]]) -> str:
    h = hashlib.sha1()
    for name, files in classes:
        h.update(name.encode())
        for f in files:
            stat = f.stat()
            h.update(f"/{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()


def _decode_class(files: list[Path], image_size: Optional[int], resize: str, invert: bool) -> torch.Tensor:
    """Decode one character's PNGs into ``(n, 1, size, size)`` floats in ``[0, 1]``."""
    images = [read_png_gray(f) for f in files]
    shapes = sorted({im.shape for im in images})
    if image_size is None and len(shapes) > 1:
        raise ValueError(
            f"images of {files[0].parent} have different sizes {shapes}; pass image_size= to resize them"
        )
    out: list[Optional[torch.Tensor]] = [None] * len(images)
    for shape in shapes:  # resize all images of one size together
        idx = [i for i, im in enumerate(images) if im.shape == shape]
        t = torch.from_numpy(np.stack([images[i] for i in idx]))[:, None]
        if invert:
            t = 1.0 - t
        if image_size is not None and tuple(shape) != (image_size, image_size):
            size = (image_size, image_size)
            if resize == "area":
                t = F.interpolate(t, size=size, mode="area")
            elif resize == "bilinear":
                t = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
            else:
                t = F.interpolate(t, size=size, mode="nearest")
        t = t.clamp_(0.0, 1.0)
        for j, i in enumerate(idx):
            out[i] = t[j]
    return torch.stack(out)  # type: ignore[arg-type]


def load_omniglot(
    root: PathLike,
    *,
    subsets: Sequence[str] = OMNIGLOT_SUBSETS,
    image_size: Optional[int] = 28,
    resize: str = "area",
    invert: bool = True,
    cache: Union[bool, PathLike, None] = None,
    strict: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> FewShotDataset:
    """Load Omniglot characters from ``root`` as a :class:`FewShotDataset` (one class per character).

    Args:
        root: folder holding ``images_background/`` and ``images_evaluation/``.
        subsets: which of the two to read (default both: 1623 characters).
        image_size: side of the resized square images (28 in the standard
            protocol); ``None`` keeps the original 105×105.
        resize: ``"area"`` (pixel averaging), ``"bilinear"`` (antialiased) or ``"nearest"``.
        invert: ``True`` (default) gives strokes = 1, background = 0; ``False``
            keeps the file's intensities (strokes = 0, background = 1).
        cache: a ``.pt`` path (or ``True`` for ``root/omniglot_<size>_<resize>.pt``)
            where the decoded tensors are saved with ``torch.save`` and loaded with
            ``weights_only=True``; it is rebuilt when the files or options change.
        strict: also check the real data set's counts (964 + 659 characters, 20 drawings each).
        dtype: floating dtype of the examples.
        seed: seed of the returned data set's generator.

    Returns a :class:`FewShotDataset` of examples ``(1, image_size, image_size)``, with
    classes named ``"<subset>/<Alphabet>/<character>"`` in sorted order.

    Raises:
        OmniglotLayoutError: the folder is missing or not in the published layout.
    """
    if resize not in ("area", "bilinear", "nearest"):
        raise ValueError(f"resize={resize!r}: use 'area', 'bilinear' or 'nearest'")
    if image_size is not None:
        check_count("image_size", image_size, 1)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    root = Path(root).expanduser()
    classes = scan_omniglot(root, subsets)
    if strict:
        for subset in subsets:
            n = sum(name.startswith(subset + "/") for name, _ in classes)
            if n != OMNIGLOT_CHARACTERS_PER_SUBSET[subset]:
                raise OmniglotLayoutError(
                    f"{root / subset} holds {n} characters; the published data has "
                    f"{OMNIGLOT_CHARACTERS_PER_SUBSET[subset]} (pass strict=False to accept it)"
                )
        bad = [(name, len(files)) for name, files in classes if len(files) != OMNIGLOT_DRAWINGS_PER_CHARACTER]
        if bad:
            raise OmniglotLayoutError(
                f"{len(bad)} characters do not have {OMNIGLOT_DRAWINGS_PER_CHARACTER} drawings, e.g. {bad[0][0]} has "
                f"{bad[0][1]} (pass strict=False to accept it)"
            )

    cache_path: Optional[Path] = None
    if cache is True:
        cache_path = root / f"omniglot_{image_size or 'full'}_{resize}.pt"
    elif cache not in (None, False):
        cache_path = Path(cache).expanduser()  # type: ignore[arg-type]
    meta = {
        "format": _CACHE_FORMAT,
        "subsets": list(subsets),
        "image_size": -1 if image_size is None else int(image_size),
        "resize": resize,
        "invert": bool(invert),
        "fingerprint": _fingerprint(classes),
    }
    names = [name for name, _ in classes]
    if cache_path is not None and cache_path.is_file():
        try:
            saved = torch.load(cache_path, weights_only=True)
        except Exception:  # unreadable or foreign file: rebuild it
            saved = None
        if isinstance(saved, dict) and all(saved.get(k) == v for k, v in meta.items()) and saved.get("names") == names:
            counts = saved["counts"].tolist()
            chunks = torch.split(saved["images"], counts)
            return FewShotDataset(dict(zip(names, chunks)), seed=seed, dtype=dtype)

    tensors = [_decode_class(files, image_size, resize, invert) for _, files in classes]
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(meta)
        payload["names"] = names
        payload["counts"] = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int64)
        payload["images"] = torch.cat(tensors)
        tmp = cache_path.with_name(cache_path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, cache_path)
    return FewShotDataset(dict(zip(names, tensors)), seed=seed, dtype=dtype)


class OmniglotSplits(NamedTuple):
    """Class-disjoint meta-train / meta-validation / meta-test data sets."""

    train: FewShotDataset
    val: FewShotDataset
    test: FewShotDataset


def omniglot_splits(
    data: Union[PathLike, FewShotDataset],
    *,
    num_train: int = 1200,
    num_val: int = 0,
    rotations: Optional[Sequence[int]] = ROTATION_ANGLES,
    split_seed: int = 1,
    seed: int = 0,
    **load_options: object,
) -> OmniglotSplits:
    """The standard Omniglot protocol: 1200 meta-training characters, the rest for testing, plus rotations.

    Args:
        data: the Omniglot root folder (read with :func:`load_omniglot`, which gets
            ``load_options``), or a data set it returned.
        num_train: meta-training characters (1200 in Vinyals et al. / MAML).
        num_val: meta-validation characters, taken from the characters left after
            ``num_train`` (default 0: an empty validation split, as MAML). The
            test split gets the rest (423 of the real 1623 with the defaults).
        rotations: angles added as new classes to every split (the 4× protocol:
            4800 training classes); ``None`` or ``(0,)`` for no rotations.
        split_seed: seed of the character shuffle before the cut.
        seed: seed of the splits' sampling generators (split ``i`` uses one derived from ``(seed, i)``).
    """
    if isinstance(data, FewShotDataset):
        if load_options:
            raise TypeError(f"load options {sorted(load_options)} only apply when data is a folder path")
        dataset = data
    else:
        dataset = load_omniglot(data, seed=seed, **load_options)  # type: ignore[arg-type]
    check_count("num_train", num_train, 0)
    check_count("num_val", num_val, 0)
    total = dataset.num_groups
    if num_train + num_val > total:
        raise ValueError(
            f"num_train={num_train} + num_val={num_val} = {num_train + num_val} characters requested, but the data "
            f"has only {total} (the full Omniglot has {OMNIGLOT_NUM_CHARACTERS}); lower num_train/num_val"
        )
    parts = list(dataset.split((num_train, num_val, None), seed=split_seed))
    if rotations is not None and tuple(rotations) != (0,):
        parts = [d.with_rotations(rotations) for d in parts]
    for i, d in enumerate(parts):
        d.reseed(derive_seed(seed, i + 1))
    return OmniglotSplits(*parts)
