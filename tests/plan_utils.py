"""Helpers for the planner tests: plans written out field by field, and the search called with job fields and
memory settings side by side.

`recipe_plan_config` is the tests' own reading of a recipe, independent of `urae_lite.plan.recipe.recipe_job` (the
code under test), so the two are checked against each other.
"""

from __future__ import annotations

import contextlib
import io
import json

from urae_lite.cli import main
from urae_lite.memory import MemorySettings, options
from urae_lite.plan import PlanConfig, PlanResult, best_config
from urae_lite.plan.constants import HOST_RAM_GIB


def plan_config(**fields) -> PlanConfig:
    """A PlanConfig from job fields and memory settings given side by side (quant=..., task=..., ...)."""
    return PlanConfig.from_dict(fields)


def best(task: str, width: int, height: int, vram_gib: float, ram_gib: float | None = None, **fields) -> PlanResult:
    """`best_config` for a job of `fields`; the memory settings among them are the ones the user fixed."""
    job = plan_config(task=task, width=width, height=height, **fields)
    return best_config(job, vram_gib, ram_gib, fixed=set(fields) & set(options()))


def goal_config(task: str, resolution: int, vram: int) -> PlanConfig:
    """The pick of `urae-lite plan --task T --resolution R --vram V --ram 24 --json`, as the command prints it."""
    out = io.StringIO()
    argv = ["plan", "--task", task, "--resolution", str(resolution), "--vram", str(vram)]
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--ram", str(HOST_RAM_GIB), "--json"]) == 0
    return plan_config(**json.loads(out.getvalue())["fitting"][0]["config"])


def recipe_plan_config(cfg) -> PlanConfig:
    """The training PlanConfig of a loaded recipe (`urae_lite.train.config.TrainConfig`)."""
    optimizer = "adamw8bit" if "8bit" in str(cfg.optimizer["_component_"]).lower() else "prodigy"
    m = cfg.memory
    return PlanConfig(
        task="train",
        width=cfg.data.resolution,
        height=cfg.data.resolution,
        adapter=cfg.adapter.kind,
        rank=cfg.adapter.rank,
        optimizer=optimizer,
        validation=bool((cfg.validation.every or cfg.validation.every_minutes) and cfg.validation.prompts),
        memory=MemorySettings(
            quant=m.quant,
            checkpointing=m.checkpointing,
            blocks_to_swap=m.blocks_to_swap,
            token_chunks=m.token_chunks,
            checkpoint_every=m.checkpoint_every,
        ),
    )
