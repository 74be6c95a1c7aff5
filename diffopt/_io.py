"""Files written atomically and read without running pickled code.

Both the training checkpoints (:mod:`diffopt.training`) and the learned-rule
files (:mod:`diffopt.optim.learned.serialization`) are ``torch.save`` payloads:
written to a temporary file in the same folder, flushed and fsync'ed, then
moved into place with ``os.replace`` (atomic on POSIX, so a crash leaves the old
file or the new one, never half of one); read with
``torch.load(weights_only=True)``, which refuses any pickled code.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "safe_load"]


def atomic_save(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` atomically: a temporary file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def safe_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors and plain containers only."""
    return torch.load(path, map_location="cpu", weights_only=True)
