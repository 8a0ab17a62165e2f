"""What a command prints, captured per request: the page calls the commands' own functions (`plan`'s table, the
planner's `--vram` line, a re-plan after out of memory) and shows their output. Requests run in Gradio's worker
threads, so the capture is per thread: output of other requests still goes to the server's console."""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _PerThreadStdout(io.TextIOBase):
    """sys.stdout (or stderr) sending a thread's writes to its capture buffer when it has one, else to the real one."""

    def __init__(self, real):
        self.real = real
        self.local = threading.local()

    def write(self, text: str) -> int:
        buffer = getattr(self.local, "buffer", None)
        return (buffer if buffer is not None else self.real).write(text)

    def flush(self) -> None:
        self.real.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ... of the real stream
        return getattr(self.real, name)


@contextmanager
def captured(name: str = "stdout") -> Iterator[io.StringIO]:
    """Collect what this thread writes to sys.stdout (or sys.stderr) inside the block."""
    if not isinstance(getattr(sys, name), _PerThreadStdout):
        setattr(sys, name, _PerThreadStdout(getattr(sys, name)))
    stream = getattr(sys, name)
    buffer = io.StringIO()
    previous = getattr(stream.local, "buffer", None)
    stream.local.buffer = buffer
    try:
        yield buffer
    finally:
        stream.local.buffer = previous
