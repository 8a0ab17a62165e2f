"""The pipeline the page loads once and keeps between requests: the next request reuses it, puts new memory settings
on it in place (`UraePipeline.reconfigure`, the out-of-memory recovery's own path), loads only the transformer again
when the base format or the adapters changed, and everything when the model, T5 format or device did."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UraeError
from ..generate import fit_memory, load, make_image, resolve_job
from ..memory import MemorySettings
from ..output import GenerationResult
from ..report import RunReport
from .capture import captured
from .commands import parse


@dataclass
class ProgressReport(RunReport):
    """The CLI's report, also telling the page when a stage starts (text encoders, denoise, vae decode, ...)."""

    on_stage: Callable[[str], None] | None = None

    @contextmanager
    def stage(self, name: str):
        if self.on_stage is not None:
            self.on_stage(name)
        with super().stage(name):
            yield


@dataclass
class Generated:
    """One finished request: the result, where the PNG is, what the command printed, how the pipeline was had."""

    result: GenerationResult
    path: Path
    printed: str
    pipeline: str  # loaded | loaded transformer | reused | reconfigured
    report: RunReport = field(repr=False, default_factory=RunReport)


def _adapter_stamps(adapters: Sequence[str]) -> tuple:
    """Path, size and mtime of each adapter file: a file replaced under the same name is loaded again."""
    stamps = []
    for a in adapters:
        try:
            st = os.stat(a)
            stamps.append((str(a), st.st_size, st.st_mtime_ns))
        except OSError:
            stamps.append((str(a), None, None))
    return tuple(stamps)


class Session:
    """The loaded-once pipeline; one request uses it at a time (the page's queue runs one device job at a time, and
    a lock makes it so for any caller)."""

    def __init__(self, busy: Callable[[], str | None] = lambda: None):
        self.pipe = None
        self.key: tuple | None = None
        self.busy = busy  # a reason the device is taken (a training run this page started), or None
        self._lock = threading.RLock()  # `unload` runs inside a request too

    def generate(self, argv: Sequence[str], report: RunReport) -> Generated:
        """`urae-lite ARGV` (ARGV starting with `generate`) through the command's own
        steps, with the pipeline loaded only when needed."""
        args = parse(argv)
        reason = self.busy()
        if reason:
            raise UraeError(reason)
        with self._lock, captured() as printed:
            job = resolve_job(args)
            memory, replan = fit_memory(job)
            pipe, how = self._pipeline(job, memory, replan, report)
            result, path = make_image(pipe, job, report)
        return Generated(result, path, printed.getvalue(), how, report)

    def _pipeline(self, job, memory: MemorySettings, replan, report: RunReport):
        memory = memory.replace(offload=memory.resolved_offload(job.device.type))  # as load_pipeline resolves it
        shared_key = (job.files, memory.t5_quant, str(job.device))  # what the text encoders and VAE are made of
        key = (*shared_key, memory.quant, _adapter_stamps(job.args.adapter), job.args.svd_device)
        if self.pipe is not None and key == self.key:
            self.pipe.replan = replan  # the planner's re-plan is for this request's size
            if memory == self.pipe.memory:
                return self.pipe, "reused"
            self.pipe.reconfigure(memory)
            return self.pipe, "reconfigured"
        # a new base format or new adapters: only the transformer is loaded again
        reuse = self.pipe.shared_components() if self.pipe is not None and self.key[:3] == shared_key else None
        self.unload()  # the old transformer goes before the new one loads
        self.pipe = load(job, memory, replan, report, reuse=reuse)
        self.key = key
        return self.pipe, "loaded transformer" if reuse else "loaded"

    def unload(self) -> None:
        """Free the loaded pipeline (before another is loaded, or before a training run takes the device)."""
        with self._lock:
            self.pipe, self.key = None, None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
