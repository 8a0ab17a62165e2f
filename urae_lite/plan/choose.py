"""`--vram N` for `generate` and `train`: ask the planner for the fastest settings that fit, keep what the user set."""

from __future__ import annotations

from ..errors import UraeError
from .search import PlanResult, best_config, options


def choose(task: str, width: int, height: int, vram_gib: float, **fixed) -> PlanResult:
    """The planner's pick for this job (user-set options in `fixed` stay); one clear error when nothing fits."""
    result = best_config(task, width, height, vram_gib, **{k: v for k, v in fixed.items() if v is not None})
    if result.best is None:
        raise UraeError(result.impossible())
    print(f"--vram {vram_gib:g}: planner picks {options(result.best.config)} "
          f"(estimated peak {result.best.peak / 2**30:.1f} GiB in {result.best.estimate.peak_phase})")
    return result
