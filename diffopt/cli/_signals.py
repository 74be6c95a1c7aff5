"""Signals shared by the long-running commands (``train``, ``train-optimizer``)."""
from __future__ import annotations

import signal
from typing import Any

__all__ = ["interrupt_on"]


class interrupt_on:
    """Within the block, ``signum`` raises ``KeyboardInterrupt`` as SIGINT does, and is appended to
    ``received``: an atomic save in progress removes its temporary file and the previous checkpoint
    stays in place. Outside the main thread (where Python cannot install a handler) it does nothing."""

    def __init__(self, signum: int, received: list[int]) -> None:
        self.signum, self.received, self.previous = signum, received, None

    def _handler(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        raise KeyboardInterrupt

    def __enter__(self) -> None:
        try:
            self.previous = signal.signal(self.signum, self._handler)
        except ValueError:  # not the main thread
            self.previous = None

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(self.signum, self.previous)
