"""Files written atomically and read without running pickled code.

Both the training checkpoints (:mod:`diffopt.training`) and the learned-rule
files (:mod:`diffopt.optim.learned.serialization`) are ``torch.save`` payloads:
written to a temporary file in the same folder, flushed and fsync'ed, then
moved into place with ``os.replace`` (atomic on POSIX, so a crash leaves the old
file or the new one, never half of one); read with
``torch.load(weights_only=True)``, which refuses any pickled code.

Reading never shows a traceback from the unpickler or from the zip reader, and
never torch's advice to retry with ``weights_only=False`` (the unsafe step):
:func:`safe_load` classifies what is wrong with a file in one line —
missing, a folder, empty or truncated, corrupt, not a ``torch.save`` file at all,
or refused because it contains code — and raises the caller's error class.

Temporary files are named ``.<target>.<pid>.<random>.tmp``. A process killed
with ``kill -9`` while saving leaves its temporary file behind; the next save of
the same target removes the ones whose process is gone (:func:`remove_stale_temporaries`).
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "safe_load", "check_writable", "remove_stale_temporaries", "non_finite_tensors",
           "describe_os_error"]

_ZIP_MAGIC = b"PK\x03\x04"


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's live process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files of ``path`` left by saving processes that no longer run.

    A temporary file whose name carries no process id (written by an older diffopt)
    counts as stale. Returns the removed paths.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    prefix = _temporary_prefix(path)
    for candidate in path.parent.iterdir():
        name = candidate.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        match = re.match(r"(\d+)\.", name[len(prefix):])
        if match is not None and (int(match.group(1)) == os.getpid() or _alive(int(match.group(1)))):
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except OSError:
            pass
    return removed


def check_writable(path: str | os.PathLike[str], what: str = "file", example: str = "run.pt") -> None:
    """Raise ``ValueError`` now if ``path`` could not be written later (a folder, or no writable parent);
    ``example``: a file name the message suggests inside a folder given instead of a file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"the {what} path {path} is a folder; give a file path such as {path / example}")
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"the {what} path {path} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"the {what} path {path} cannot be written: no permission to write in {parent}")


def describe_os_error(error: OSError) -> str:
    """``strerror`` and file name of an ``OSError`` in one line (``[Errno 28] No space left on device``)."""
    reason = error.strerror or str(error)
    return f"[Errno {error.errno}] {reason}" if error.errno is not None else reason


def atomic_save(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` atomically: a temporary file in the same folder, fsync, ``os.replace``, and an
    fsync of the folder, so that the rename itself survives a power loss (POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    handle, temporary = tempfile.mkstemp(prefix=f"{_temporary_prefix(path)}{os.getpid()}.", suffix=".tmp",
                                         dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """fsync a folder's entry table (where the platform allows opening a folder: not Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows, or a folder that cannot be opened
        return
    try:
        os.fsync(handle)
    except OSError:  # pragma: no cover - file systems that do not sync folders
        pass
    finally:
        os.close(handle)


def safe_load(path: str | os.PathLike[str], what: str = "diffopt file",
              error: type[Exception] = ValueError) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors and plain containers only.

    Any file that cannot be read that way raises ``error`` with one line saying why
    (``what`` names the kind of file expected, e.g. "diffopt checkpoint"):
    ``FileNotFoundError`` for a missing file, otherwise "is a folder", "is empty",
    "is truncated or corrupt", "is not a <what>" or "refused: it contains code".
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise error(f"{path} is a folder, not a {what}")
    try:
        with path.open("rb") as stream:
            head = stream.read(4)
    except OSError as problem:
        raise error(f"{path} could not be read: {describe_os_error(problem)}") from None
    if not head:
        raise error(f"{path} is empty (truncated): not a {what}")
    if head != _ZIP_MAGIC:
        raise error(f"{path} is not a {what} (not a torch.save file)")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception:  # noqa: BLE001 - BadZipFile, EOF, an unknown compression method...: all mean damage
        raise error(f"{path} is truncated or corrupt: not a readable {what}") from None
    if damaged is not None:
        raise error(f"{path} is corrupt (its part {damaged} fails its checksum): not a readable {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as problem:
        text = str(problem)
        if "Weights only load failed" in text or "Unsupported" in text or "GLOBAL" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            named = f" ({found.group(1)})" if found else ""
            raise error(f"{path} refused: it contains code{named}, and a {what} holds only tensors and plain "
                        "values; it was not loaded") from None
        raise error(f"{path} is corrupt: not a readable {what}") from None
    except Exception:  # noqa: BLE001 - miniz, EOF, IndexError...: all mean a damaged file
        raise error(f"{path} is truncated or corrupt: not a readable {what}") from None


def _tensors(value: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{name}[{index}]")


def non_finite_tensors(value: Any, name: str = "") -> list[str]:
    """The names of the floating-point tensors in a nested payload that hold NaN or infinity."""
    return [n for n, t in _tensors(value, name)
           if (t.is_floating_point() or t.is_complex()) and not t.is_meta and not bool(torch.isfinite(t).all())]

