"""Out of memory in the middle of a run need not end it: re-plan the memory settings, put the lighter ones on the
loaded model, and go on from where it stopped.

Every memory setting a recovery may change is exact (offload, block swap, token chunks, checkpointing and its
stride, the VAE's tiling and strips: same image, same losses and weights), so a run that recovered ends as a run with
the final settings from the start would. The settings that change results are never touched (the base format, the T5
format). A recovery happens at most MAX_REPLANS times per run; then the run stops with the usual advice.

The library's own re-plan is `step_down` (every setting `MemorySettings.lighter` names for the stage that ran out);
the commands pass the planner's (urae_lite.plan.choose.replanner): the fastest plan for a budget lowered by what the
allocation was short of, or `step_down` when the planner has nothing smaller.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .memory import MemorySettings

MAX_REPLANS = 3
KEPT = ("quant", "t5_quant")  # change the numbers: never changed by a recovery


@dataclass(frozen=True)
class OutOfMemory:
    """Where a run ran out of memory, and by how much when the device can tell."""

    task: str  # generate | train
    stage: str  # the stage as the run reports it ("denoise", "training step 3", ...)
    part: str  # what ran: "text encoders", "transformer" or "vae decode" (MemorySettings.lighter's stages)
    n_blocks: int  # the transformer's blocks (the largest block swap)
    short_bytes: int | None = None  # the failed allocation beyond what was free (CUDA), None when unknown
    card_bytes: int | None = None  # the device's total memory (CUDA), None when unknown


Replanner = Callable[[MemorySettings, OutOfMemory], "MemorySettings | None"]


def step_down(memory: MemorySettings, oom: OutOfMemory) -> MemorySettings | None:
    """The next smaller plan without a planner: every exact setting `lighter` names for the stage, one step each;
    None when nothing is left to lighten."""
    tips = {k: v for k, v in memory.lighter(oom.task, oom.n_blocks, oom.part).items() if k not in KEPT}
    return memory.replace(**tips).check(oom.task, oom.n_blocks) if tips else None


_ASKED = re.compile(r"Tried to allocate ([0-9.]+) (B|KiB|MiB|GiB|TiB)")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def out_of_memory(
    error: BaseException, task: str, stage: str, part: str, n_blocks: int, device: torch.device
) -> OutOfMemory:
    """What `error` (a torch.cuda.OutOfMemoryError) tells: on CUDA, the bytes its allocation asked for beyond what
    the device had free (torch's message says how much it tried to allocate)."""
    short = card = None
    if device.type == "cuda" and torch.cuda.is_available():
        free, card = torch.cuda.mem_get_info(device)
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        found = _ASKED.search(str(error))
        if found:
            asked = int(float(found.group(1)) * _UNITS[found.group(2)])
            short = max(asked - free - unused, 0)
    return OutOfMemory(task, stage, part, n_blocks, short, card)


def part_of(stage: str) -> str:
    """The part of a generation a stage runs (the text encoders, the transformer or the VAE decode)."""
    return stage if stage in ("text encoders", "vae decode") else "transformer"


def announce(oom: OutOfMemory, old: MemorySettings, new: MemorySettings, attempt: int) -> None:
    """One line on stdout: where memory ran out and the settings the run goes on with."""
    changed = [n for n in new.for_task(oom.task) if getattr(new, n) != getattr(old, n)]
    print(
        f"out of memory in {oom.stage}: re-plan {attempt} of {MAX_REPLANS}, going on with "
        f"{new.describe(oom.task, changed)} (the same results)",
        flush=True,
    )
