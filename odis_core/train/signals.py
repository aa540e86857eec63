"""A clean stop on SIGTERM (what Slurm sends before it kills a job) and SIGINT (Ctrl-C).

The first signal only sets a flag: the training loop finishes its step, writes a checkpoint
and ends. A second signal means "now": the process exits at once with 128 + the signal
number (the checkpoint on disk is whole: every write is atomic).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: `received` is the first stop signal's number (None until one came).
    `on_second(signum)` runs just before a second signal ends the process."""

    def __init__(self, on_second: Callable[[int], None] | None = None) -> None:
        self.received: int | None = None
        self.on_second = on_second
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            return
        if self.on_second is not None:
            self.on_second(signum)
        os._exit(128 + signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signals need it
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        """The shell's status for the signal: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + (self.received or 0)


def ignore_stop_signals_in_worker(_worker_id: int) -> None:
    """DataLoader workers share the terminal's process group (Ctrl-C reaches them) and a
    job's signals: they leave the stop to the main process, which shuts them down."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
