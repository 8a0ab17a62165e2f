"""What a training recipe means to the planner: `urae-lite plan --task train` answers for the recipe users run.

Without `--recipe`, the shipped recipe for the job is planned (the 4K minor-component recipe from 4096² up or when
`--adapter minor`, the 2K LoRA recipe otherwise), so the plan's defaults are the recipe's (e.g. checkpointing `cpu`),
not the planner's own.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..presets import RECIPES
from ..train.config import TrainConfig, load_recipe
from .job import PlanConfig

RECIPE_2K_LORA = "train_2k_lora.yaml"
RECIPE_4K_MINOR = "train_4k_minor.yaml"


def shipped_recipe(resolution: int, adapter: str | None = None) -> Path:
    """The recipe a user would run for this job."""
    minor = adapter == "minor" or (adapter is None and resolution >= 4096)
    return RECIPES / (RECIPE_4K_MINOR if minor else RECIPE_2K_LORA)


def planner_optimizer(component: str) -> str:
    """The planner's optimizer for a recipe's `_component_`: 8-bit AdamW, or Prodigy (whose states are the larger,
    an upper bound for the other full-precision optimizers)."""
    return "adamw8bit" if "8bit" in component.lower() else "prodigy"


def recipe_job(cfg: TrainConfig, **changes) -> PlanConfig:
    """The training job a loaded recipe runs, as the planner sees it (`changes`: other PlanConfig fields)."""
    job = PlanConfig(
        task="train",
        width=cfg.data.resolution,
        height=cfg.data.resolution,
        adapter=cfg.adapter.kind,
        rank=cfg.adapter.rank,
        optimizer=planner_optimizer(str(cfg.optimizer["_component_"])),
        validation=cfg.validation.enabled,
        memory=cfg.memory,
    )
    return job.replace(**changes)


def recipe_file_job(path: str | os.PathLike, overrides: list[str] = (), **changes) -> PlanConfig:
    """`recipe_job` of a recipe file + `key=value` overrides; data and output paths may stay unset."""
    return recipe_job(load_recipe(path, overrides, require_paths=False), **changes)
