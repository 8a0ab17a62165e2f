"""`--vram N` for `generate` and `train`: the planner's fastest memory settings that fit, keeping what the user set.

One function serves both commands: it searches the memory settings the user left open and returns the whole
MemorySettings of the pick; `generate` loads with it, `train` turns it into recipe overrides.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import psutil

from ..errors import UraeError
from ..memory import MemorySettings
from ..recovery import KEPT, OutOfMemory, Replanner, step_down
from ..vram_options import AUTO
from . import constants as C
from .search import best_config, options

if TYPE_CHECKING:
    from ..model_files import ModelFiles
    from .job import PlanConfig

HOST_SHARE = 0.75  # of this machine's RAM, for offloaded weights, swapped blocks and checkpoints: the rest runs the OS


def this_machine_ram_gib() -> float:
    """The host memory `--vram` may plan with when `--ram` is not given."""
    return psutil.virtual_memory().total * HOST_SHARE / C.GiB


def model_fields(files: ModelFiles) -> dict:
    """PlanConfig fields of a model's transformer: its config (widths, depth) and variant, as `resolve_files` read
    them from the config or the single file's tensor shapes (no weights are read)."""
    return {"transformer_config": files.config, "variant": files.variant}


def free_gib(device: str | None = None) -> float:
    """What `--vram auto` plans with: the CUDA device's free memory now (what the CUDA context and other processes
    left), in GiB."""
    import torch

    if not torch.cuda.is_available():
        raise UraeError("--vram auto plans for a CUDA device's free memory, and there is none: give --vram N (GiB)")
    free, _ = torch.cuda.mem_get_info(torch.device(device) if device else None)
    return free / C.GiB


def apply_vram(
    job: PlanConfig,
    fixed: Iterable[str],
    vram_gib: float | str,
    ram_gib: float | None = None,
    device: str | None = None,
) -> MemorySettings:
    """The planner's pick for `job` on a `vram_gib` card (or `auto`: the free memory of `device`): `job.memory` with
    the searched settings not in `fixed` (the ones the user set) replaced. `ram_gib` defaults to this machine's.
    Nothing fitting is one UraeError saying the smallest peak and what would get closest, or how much host memory the
    best plan needs. Prints one line with the pick."""
    ram = this_machine_ram_gib() if ram_gib is None else ram_gib
    label = f"--vram {vram_gib:g}" if vram_gib != AUTO else ""
    if vram_gib == AUTO:
        vram_gib = free_gib(device)
        label = f"--vram auto ({vram_gib:.1f} GiB free)"
    result = best_config(job, vram_gib, ram, fixed)
    if result.best is None:
        raise UraeError(result.impossible())
    pick = result.best
    print(
        f"{label}: planner picks {options(pick.config)} (estimated "
        f"peak {pick.peak / C.GiB:.1f} GiB in {pick.estimate.peak_phase}, host {pick.estimate.host / C.GiB:.1f} of "
        f"{ram:.0f} GiB)"
    )
    return pick.config.memory


def replanner(job: PlanConfig, fixed: Iterable[str], ram_gib: float | None = None) -> Replanner:
    """The commands' out-of-memory re-plan (urae_lite.recovery): the fastest plan the planner finds for a card
    smaller by what the failed allocation was short of (the settings the user set, the base and the T5 format kept),
    or the library's `step_down` when the device cannot tell or the planner has nothing smaller."""
    keep = set(fixed) | set(KEPT)

    def replan(memory: MemorySettings, oom: OutOfMemory) -> MemorySettings | None:
        if oom.short_bytes and oom.card_bytes:
            budget = (oom.card_bytes - oom.short_bytes) / C.GiB
            ram = this_machine_ram_gib() if ram_gib is None else ram_gib
            result = best_config(job.replace(memory=memory), budget, ram, keep)
            smaller = [c.config.memory for c in result.fitting if c.config.memory != memory]
            if smaller:
                return smaller[0]
        return step_down(memory, oom)

    return replan
