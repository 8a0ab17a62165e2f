"""Time per stage and peak memory, printed at the end of every command."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

GiB = 2**30


def peak_rss_bytes() -> int:
    """Process-lifetime peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class RunReport:
    """Collects (stage, seconds) and reports them with the memory peaks."""

    stages: list[tuple[str, float]] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.stages.append((name, time.perf_counter() - start))

    def memory(self) -> dict[str, float]:
        out = {"peak_rss_gib": peak_rss_bytes() / GiB}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
            out["cuda_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
        return out

    def as_dict(self) -> dict:
        return {"stages_s": {name: round(sec, 3) for name, sec in self.stages}, "memory": self.memory()}

    def format(self) -> str:
        width = max([len(n) for n, _ in self.stages] + [5])
        lines = [f"{'stage':<{width}}  seconds"]
        lines += [f"{name:<{width}}  {sec:7.2f}" for name, sec in self.stages]
        lines.append(f"{'total':<{width}}  {sum(s for _, s in self.stages):7.2f}")
        lines += [f"{k.replace('_gib', '').replace('_', ' ')}: {v:.2f} GiB" for k, v in self.memory().items()]
        return "\n".join(lines)
