"""Helpers for the planner tests: the PlanConfig a loaded recipe describes, written out field by field.

This is the tests' own reading of a recipe, independent of `urae_lite.plan.recipe.plan_fields` (the code under
test), so the two are checked against each other.
"""

from __future__ import annotations

from urae_lite.plan import PlanConfig


def recipe_plan_config(cfg) -> PlanConfig:
    """The training PlanConfig of a loaded recipe (`urae_lite.train.config.TrainConfig`)."""
    optimizer = "adamw8bit" if "8bit" in str(cfg.optimizer["_component_"]).lower() else "prodigy"
    return PlanConfig(
        task="train",
        width=cfg.data.resolution,
        height=cfg.data.resolution,
        quant=cfg.quant,
        adapter=cfg.adapter.kind,
        rank=cfg.adapter.rank,
        checkpointing=cfg.training.checkpointing,
        blocks_to_swap=cfg.training.blocks_to_swap,
        token_chunks=cfg.training.token_chunks,
        checkpoint_every=cfg.training.checkpoint_every,
        optimizer=optimizer,
        validation=bool(cfg.validation.every and cfg.validation.prompts),
    )
