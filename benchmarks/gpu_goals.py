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
    from urae_lite.errors import UraeError
    from urae_lite.plan import best_config
    from urae_lite.plan.search import SEARCHED

    fixed = {}
    if task == "train":
        from urae_lite.plan.recipe import recipe_plan_fields, shipped_recipe

        fields = recipe_plan_fields(shipped_recipe(size))
        fixed = {k: v for k, v in fields.items() if k not in (*SEARCHED[task], "width", "height")}
    result = best_config(task, size, size, vram_gib, GOAL_RAM_GIB, **fixed)
    if result.best is None:
        raise UraeError(result.impossible())
    return result.best


def memory_options(cfg: PlanConfig) -> dict:
    """The options the planner searched, with the values of `cfg`."""
    from urae_lite.plan.search import SEARCHED

    return {name: getattr(cfg, name) for name in SEARCHED[cfg.task]}


def goal_record(task: str, size: int, vram_gib: float) -> dict:
    """The row's `goal` before anything runs: the card, the pick and the planner's card total for it."""
    from urae_lite.plan.search import options

    pick = goal_pick(task, size, vram_gib)
    return {
        "vram_gib": vram_gib,
        "ram_gib": GOAL_RAM_GIB,
        "plan": options(pick.config),
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
    full = cfg.arch().n_blocks
    swap = max(1, round(cfg.blocks_to_swap * tiny_blocks / full)) if cfg.blocks_to_swap else 0
    if swap != cfg.blocks_to_swap:
        changes["blocks_to_swap"] = (
            f"{cfg.blocks_to_swap} of {full} blocks -> {swap} of the tiny model's {tiny_blocks} (CPU as both sides)"
        )
    offload = cfg.offload
    if cfg.task == "generate" and cfg.offload != "none":
        offload = "none"
        changes["offload"] = f"{cfg.offload} -> none: on the CPU there is no device memory to offload from"
    return cfg.replace(blocks_to_swap=swap, offload=offload), changes


def generate_args(cfg: PlanConfig) -> list[str]:
    """benchmarks/generate.py's options for `cfg`'s memory settings (its quant goes in --quants)."""
    return [
        "--offload",
        cfg.offload,
        "--t5-quant",
        cfg.t5_quant,
        "--blocks-to-swap",
        str(cfg.blocks_to_swap),
        "--token-chunks",
        str(cfg.token_chunks),
    ]


def train_args(cfg: PlanConfig) -> list[str]:
    """benchmarks/train.py's options for `cfg`'s memory settings: its checkpointing mode and the recipe overrides
    `urae-lite plan` prints."""
    from urae_lite.plan import train_overrides

    return ["--modes", cfg.checkpointing, *(x for o in train_overrides(cfg) for x in ("--set", o))]
