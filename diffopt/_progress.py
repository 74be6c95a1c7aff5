"""A small progress bar: redrawn in place on a terminal, a line every 10% otherwise."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, description: str = "", *, start: int = 0, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.total, self.description, self.count = max(total, 1), description, start
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.perf_counter()
        self.first = start
        self._last_decile = -1
        self.postfix = ""

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.count += n
        if postfix is not None:
            self.postfix = postfix
        if not self.enabled:
            return
        decile = int(10 * self.count / self.total)
        if self.interactive or decile != self._last_decile or self.count >= self.total:
            self._last_decile = decile
            self._draw()

    def _draw(self) -> None:
        done = self.count - self.first
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        remaining = (self.total - self.count) / rate if rate > 0 else float("nan")
        width = 24
        filled = int(width * self.count / self.total)
        bar = "#" * filled + "-" * (width - filled)
        text = (f"{self.description} [{bar}] {self.count}/{self.total} {rate:.1f} it/s "
                f"eta {remaining:.0f}s {self.postfix}")
        if self.interactive:
            self.stream.write("\r" + text[:160])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.interactive:
            self.stream.write("\n")
            self.stream.flush()
