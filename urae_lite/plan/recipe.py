"""What a training recipe means to the planner: `urae-lite plan --task train` answers for the recipe users run.

Without `--recipe`, the shipped recipe for the job is planned (the 4K minor-component recipe from 4096² up or when
`--adapter minor`, the 2K LoRA recipe otherwise), so the plan's defaults are the recipe's (e.g. checkpointing `cpu`),
not the planner's own.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import override_keys
from ..presets import RECIPES
from ..train.config import TrainConfig, load_recipe

RECIPE_2K_LORA = "train_2k_lora.yaml"
RECIPE_4K_MINOR = "train_4k_minor.yaml"
#: recipe keys -> the PlanConfig fields they set (plan CLI options of the same meaning override them)
RECIPE_KEYS = {
    "quant": "quant",
    "adapter.kind": "adapter",
    "adapter.rank": "rank",
    "training.checkpointing": "checkpointing",
    "training.blocks_to_swap": "blocks_to_swap",
    "training.token_chunks": "token_chunks",
    "training.checkpoint_every": "checkpoint_every",
    "optimizer._component_": "optimizer",
}


def shipped_recipe(resolution: int, adapter: str | None = None) -> Path:
    """The recipe a user would run for this job."""
    minor = adapter == "minor" or (adapter is None and resolution >= 4096)
    return RECIPES / (RECIPE_4K_MINOR if minor else RECIPE_2K_LORA)


def planner_optimizer(component: str) -> str:
    """The planner's optimizer for a recipe's `_component_`: 8-bit AdamW, or Prodigy (whose states are the larger,
    an upper bound for the other full-precision optimizers)."""
    return "adamw8bit" if "8bit" in component.lower() else "prodigy"


def plan_fields(cfg: TrainConfig) -> dict:
    """PlanConfig fields of a loaded recipe."""
    return {
        "width": cfg.data.resolution,
        "height": cfg.data.resolution,
        "quant": cfg.quant,
        "adapter": cfg.adapter.kind,
        "rank": cfg.adapter.rank,
        "checkpointing": cfg.training.checkpointing,
        "blocks_to_swap": cfg.training.blocks_to_swap,
        "token_chunks": cfg.training.token_chunks,
        "checkpoint_every": cfg.training.checkpoint_every,
        "optimizer": planner_optimizer(str(cfg.optimizer["_component_"])),
        "validation": bool(cfg.validation.every and cfg.validation.prompts),
    }


def recipe_plan_fields(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """PlanConfig fields of a recipe file + `key=value` overrides; data and output paths may stay unset."""
    return plan_fields(load_recipe(path, overrides, require_paths=False))


def overridden_fields(overrides: list[str]) -> set[str]:
    """PlanConfig fields that `key=value` overrides set explicitly (the `--vram` search keeps them)."""
    keys = override_keys(overrides)
    return {field for key, field in RECIPE_KEYS.items() if key in keys}


def recipe_overrides(fields: dict) -> list[str]:
    """`key=value` recipe overrides that set PlanConfig `fields` (the inverse of RECIPE_KEYS)."""
    keys = {field: key for key, field in RECIPE_KEYS.items()}
    return [f"{keys[name]}={value}" for name, value in fields.items()]
