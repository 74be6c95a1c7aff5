"""The progress bar of training and benchmark runs: :mod:`tqdm` (``tqdm.auto``: a widget in
notebooks, a bar redrawn in place on a terminal, with rate and ETA).

``Progress(..., enabled=False)`` (``progress=False`` in the library, ``--no-progress`` on
the command line) draws nothing, for logs. Written to a stream that is not a terminal
(a log file, CI), the bar is redrawn at most every 30 s.
"""
from __future__ import annotations

import sys
from typing import TextIO

from tqdm.auto import tqdm

__all__ = ["Progress"]


class Progress:
    """A ``tqdm`` bar with the interface the training loops use.

    Args:
        total: the number of steps of the whole run.
        description: the text before the bar.
        start: steps already done (a resumed run starts there).
        enabled: ``False`` draws nothing (``tqdm(disable=True)``).
        stream: where to draw (default ``sys.stderr``).
    """

    def __init__(self, total: int, description: str = "", *, start: int = 0, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.total, self.description, self.count = max(total, 1), description, start
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.postfix = ""
        self._bar = tqdm(total=self.total, initial=start, desc=description or None, file=self.stream,
                         disable=not enabled, dynamic_ncols=True, leave=True,
                         mininterval=0.1 if self.interactive else 30.0)

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.count += n
        if postfix is not None:
            self.postfix = postfix
            self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
