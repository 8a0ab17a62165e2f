"""The consumer-card goals that benchmarks/gpu_check.py measures: each runs the plan `urae-lite plan --vram N --ram 24`
picks for it, asked at run time, so the measurement follows the planner when its model changes.

* `goal-generate-4096-8g`: generate 4096² on an 8 GiB card (the 4K preset, adapters rank 48);
* `goal-train-2048-8g`: train the 2K LoRA recipe at 2048² on an 8 GiB card;
* `goal-train-4096-12g`: train the 4K minor-component recipe at 4096² on a 12 GiB card.

A goal row holds the pick (its memory options, as the job's command line spells them), the planner's card total for
it, and whether the measured reserved peak plus the memory outside torch's allocator (CUDA context, library
handles, read from the driver) fits the card. The dry run's tiny model on the CPU takes the pick with what the CPU
cannot do changed, each change recorded with its reason (`tiny_plan`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from urae_lite.plan import Candidate, PlanConfig

GOALS = (("generate", 4096, 8.0), ("train", 2048, 8.0), ("train", 4096, 12.0))  # (task, side, card GiB)
GOAL_RAM_GIB = 24.0  # host memory the goals plan with (a 32 GB desktop), as `urae-lite plan --ram 24`
GiB = 2**30


def goal_name(task: str, size: int, vram_gib: float) -> str:
    return f"goal-{task}-{size}-{vram_gib:g}g"


@functools.cache
def goal_pick(task: str, size: int, vram_gib: float) -> Candidate:
    """What `urae-lite plan [--task train] --resolution SIZE --vram VRAM --ram 24` picks. Training keeps what the
    shipped recipe for the size fixes and the search leaves alone (adapter, rank, optimizer, validation), as the
    command does; generation plans the product's defaults. UraeError when nothing fits."""
    from urae_lite import UraeError
    from urae_lite.plan import PlanConfig, best_config

    job = PlanConfig(task=task, width=size, height=size)
    if task == "train":  # the recipe as `urae-lite plan --task train` reads it (no public entry)
        from urae_lite.plan.recipe import recipe_file_job, shipped_recipe

        job = recipe_file_job(shipped_recipe(size))
    result = best_config(job, vram_gib, GOAL_RAM_GIB)
    if result.best is None:
        raise UraeError(result.impossible())
    return result.best


def memory_options(cfg: PlanConfig) -> dict:
    """The settings the planner searched, with the values of `cfg`."""
    from urae_lite.memory import searched

    return {name: getattr(cfg.memory, name) for name in searched(cfg.task)}


def goal_record(task: str, size: int, vram_gib: float) -> dict:
    """The row's `goal` before anything runs: the card, the pick (as `urae-lite plan` prints it) and the planner's
    card total for it."""
    from urae_lite.memory import searched

    pick = goal_pick(task, size, vram_gib)
    return {
        "vram_gib": vram_gib,
        "ram_gib": GOAL_RAM_GIB,
        "plan": pick.config.memory.describe(task, searched(task)),
        "config": memory_options(pick.config),
        "planned_card_gib": round(pick.peak / GiB, 3),
        "planned_host_gib": round(pick.estimate.host / GiB, 3),
        "measured_card_gib": None,
        "fits": None,
    }


def measured_fit(goal: dict, measured: dict) -> dict:
    """`goal` with the measured card total (reserved peak + memory outside the allocator) and whether it fits."""
    reserved, outside = measured.get("peak_reserved_gib"), measured.get("outside_allocator_gib")
    if reserved is None or outside is None:
        return {**goal, "measured_card_gib": None, "fits": None}
    card = round(reserved + outside, 3)
    return {**goal, "measured_card_gib": card, "fits": card <= goal["vram_gib"]}


def tiny_plan(cfg: PlanConfig, tiny_blocks: int) -> tuple[PlanConfig, dict[str, str]]:
    """The pick as the tiny model on the CPU runs it, and the reason for each option changed: the same share of its
    `tiny_blocks` blocks swapped (at least one when any), and no offload (the CPU is both sides)."""
    changes: dict[str, str] = {}
    m = cfg.memory
    full = cfg.arch().n_blocks
    swap = max(1, round(m.blocks_to_swap * tiny_blocks / full)) if m.blocks_to_swap else 0
    if swap != m.blocks_to_swap:
        changes["blocks_to_swap"] = (
            f"{m.blocks_to_swap} of {full} blocks -> {swap} of the tiny model's {tiny_blocks} (CPU as both sides)"
        )
    offload = m.offload
    if cfg.task == "generate" and m.offload != "none":
        offload = "none"
        changes["offload"] = f"{m.offload} -> none: on the CPU there is no device memory to offload from"
    return cfg.with_memory(blocks_to_swap=swap, offload=offload), changes


def generate_args(cfg: PlanConfig) -> list[str]:
    """benchmarks/generate.py's options for `cfg`'s memory settings (its quant goes in --quants)."""
    from urae_lite.memory import searched

    return cfg.memory.describe("generate", [n for n in searched("generate") if n != "quant"]).split()


def train_args(cfg: PlanConfig) -> list[str]:
    """benchmarks/train.py's options for `cfg`'s memory settings: its checkpointing mode and the recipe overrides
    `urae-lite plan` prints."""
    from urae_lite.memory import searched

    overrides = cfg.memory.describe("train", searched("train")).split()
    return ["--modes", cfg.memory.checkpointing, *(x for o in overrides for x in ("--set", o))]
