"""Steering a running job: when to sample validation images, and stopping cleanly on Ctrl-C / SIGTERM.

Validation runs every `validation.every` steps, every `validation.every_minutes` minutes (OneTrainer's timer,
reset by any validation), and once after the step during which `output_dir/SAMPLE_NOW` appeared (the file is then
deleted). The first SIGINT or SIGTERM asks the loop to finish the current step, write a checkpoint and return;
a second SIGINT stops at once (KeyboardInterrupt, as without the handler). The handlers exist only while the
training loop runs (`safe_stop` restores the previous ones), so other commands keep Python's Ctrl-C behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from time import monotonic

from .config import ValidationConfig

logger = logging.getLogger("urae_lite.train")

SAMPLE_NOW = "SAMPLE_NOW"


class ValidationSchedule:
    """Decides after each step whether validation runs (`due`); with validation off (`ValidationConfig.enabled`):
    never (SAMPLE_NOW is removed with a warning, since the prompts were not embedded)."""

    def __init__(self, v: ValidationConfig, output_dir: str | Path):
        self.every, self.minutes, self.enabled = v.every, v.every_minutes, v.enabled
        self.request = Path(output_dir) / SAMPLE_NOW
        self.last = monotonic()

    def due(self, step: int) -> str | None:
        """Why validation runs after `step` (`every`, `every_minutes`, SAMPLE_NOW), or None."""
        if self.request.exists():
            self.request.unlink(missing_ok=True)
            if self.enabled:
                return SAMPLE_NOW
            logger.warning("%s ignored: validation is off (set validation.every and validation.prompts)", SAMPLE_NOW)
        if not self.enabled:
            return None
        if self.every and step % self.every == 0:
            return "every"
        if self.minutes and monotonic() - self.last >= 60 * self.minutes:
            return "every_minutes"
        return None

    def done(self) -> None:
        """A validation finished: the minutes count from now."""
        self.last = monotonic()


class StopRequest:
    """Set by the first SIGINT / SIGTERM while the loop runs; the loop checks `requested` after each step."""

    def __init__(self) -> None:
        self.signal: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def handle(self, signum: int, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:  # the second Ctrl-C: stop now, no checkpoint
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            logger.info(
                "%s: finishing this step, then writing a checkpoint and stopping (Ctrl-C again stops at once)",
                self.signal,
            )


@contextlib.contextmanager
def safe_stop() -> Iterator[StopRequest]:
    """SIGINT / SIGTERM -> a StopRequest while inside; the previous handlers come back on leaving. Outside the
    main thread (signals only reach it) the request is never set."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, request.handle)
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
