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
from . import constants as C
from .search import best_config, options

if TYPE_CHECKING:
    from ..model_files import ModelFiles
    from .estimate import PlanConfig

HOST_SHARE = 0.75  # of this machine's RAM, for offloaded weights, swapped blocks and checkpoints: the rest runs the OS


def this_machine_ram_gib() -> float:
    """The host memory `--vram` may plan with when `--ram` is not given."""
    return psutil.virtual_memory().total * HOST_SHARE / C.GiB


def model_fields(files: ModelFiles) -> dict:
    """PlanConfig fields of a model's transformer: its config (widths, depth) and variant, as `resolve_files` read
    them from the config or the single file's tensor shapes (no weights are read)."""
    return {"transformer_config": files.config, "variant": files.variant}


def apply_vram(job: PlanConfig, fixed: Iterable[str], vram_gib: float, ram_gib: float | None = None) -> MemorySettings:
    """The planner's pick for `job` on a `vram_gib` card: `job.memory` with the searched settings not in `fixed`
    (the ones the user set) replaced. `ram_gib` defaults to this machine's. Nothing fitting is one UraeError saying
    the smallest peak and what would get closest, or how much host memory the best plan needs."""
    ram = this_machine_ram_gib() if ram_gib is None else ram_gib
    result = best_config(job, vram_gib, ram, fixed)
    if result.best is None:
        raise UraeError(result.impossible())
    pick = result.best
    print(
        f"--vram {vram_gib:g}: planner picks {options(pick.config)} (estimated "
        f"peak {pick.peak / C.GiB:.1f} GiB in {pick.estimate.peak_phase}, host {pick.estimate.host / C.GiB:.1f} of "
        f"{ram:.0f} GiB)"
    )
    return pick.config.memory
