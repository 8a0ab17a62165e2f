"""`urae-lite plan`: will it fit my card? The per-phase memory table of a job, or with `--vram N` the fastest
configuration that fits N GiB and the next best ones, before any weights are read."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from ..flux_configs import VARIANTS
from ..memory import TASKS, MemorySettings, overridden, searched
from . import constants as C
from .choose import model_fields
from .job import ADAPTERS, OPTIMIZERS, PlanConfig

if TYPE_CHECKING:
    from .search import PlanResult

JOB_OPTIONS = ("variant", "rank", "adapter", "optimizer", "steps")  # PlanConfig fields a user may set (None: default)
SHOWN = 5  # candidates listed with --vram


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="peak GPU memory of generate/train per phase; with --vram N, what fits N GiB", description=__doc__
    )
    p.add_argument("--task", choices=TASKS, default="generate")
    p.add_argument("--resolution", type=int, help="image side in pixels (default 2048, or the recipe's)")
    p.add_argument("--width", type=int, help="overrides --resolution")
    p.add_argument("--height", type=int, help="overrides --resolution")
    p.add_argument("--variant", choices=VARIANTS, help="FLUX.1 model (default dev)")
    p.add_argument(
        "--model",
        help="plan for this transformer: a diffusers folder, hub id, prepared folder or single "
        ".safetensors file (its widths and variant are read from it; no weights are loaded)",
    )
    p.add_argument("--base-pipeline", help="with a single-file --model: the diffusers folder or hub id it belongs to")
    p.add_argument(
        "--rank",
        type=int,
        help="generate: total adapter rank (default 16, 48 above 2048²); train: trainable rank (default 16)",
    )
    p.add_argument("--steps", type=int, help="generate: denoising steps, for the speed ranking (default 28)")
    p.add_argument("--adapter", choices=ADAPTERS, help="train (default lora; minor from 4096²)")
    p.add_argument(
        "--recipe",
        help="train: plan this recipe (default: the shipped 2K LoRA recipe, or the 4K "
        "minor-component one from 4096² or with --adapter minor)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="train: recipe overrides, as `urae-lite train` takes them (e.g. memory.checkpointing=on)",
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="train (default prodigy)")
    p.add_argument(
        "--no-validation",
        dest="validation",
        action="store_false",
        help="train: leave out the recipes' validation images",
    )
    p.add_argument(
        "--vram",
        type=float,
        metavar="GIB",
        help="the card's memory in GiB (a '24 GB' card has 24 GiB): list what fits, fastest first",
    )
    p.add_argument(
        "--ram",
        type=float,
        metavar="GIB",
        help="with --vram: host memory available for offloaded weights, swapped blocks and checkpoints, "
        "in GiB (plans that need more are left out)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    MemorySettings.add_arguments(p, TASKS)
    p.set_defaults(func=run)


def _job(args: argparse.Namespace) -> tuple[PlanConfig, set[str]]:
    """The job to plan, and the memory settings the user set (the `--vram` search keeps them)."""
    from ..errors import UraeError

    job = {k: getattr(args, k) for k in JOB_OPTIONS if getattr(args, k) is not None}
    if args.model is not None:
        from ..model_files import resolve_files

        job.update(model_fields(resolve_files(args.model, args.base_pipeline)))
    if not args.validation:
        job["validation"] = False
    given = MemorySettings.given(args)
    if args.task != "train":
        if args.recipe or args.overrides:
            raise UraeError("--recipe and key=value overrides plan training: add --task train")
        from ..presets import preset_memory

        size = args.resolution or 2048
        width, height = args.width or size, args.height or size
        preset = preset_memory("4k" if width * height >= 4096 * 4096 else "2k", job.get("variant", "dev"))
        return PlanConfig(task="generate", width=width, height=height, memory=preset.replace(**given), **job), set(
            given
        )
    from .recipe import recipe_file_job, shipped_recipe

    asked = args.resolution or max(args.width or 0, args.height or 0) or 2048
    recipe = recipe_file_job(args.recipe or shipped_recipe(asked, args.adapter), args.overrides)
    size = args.resolution or recipe.width  # a --recipe plans at its own data.resolution
    planned = recipe.replace(width=args.width or size, height=args.height or size, **job)
    return planned.with_memory(**given), set(given) | overridden(args.overrides)


def run(args: argparse.Namespace) -> None:
    from .estimate import estimate
    from .search import best_config

    job, fixed = _job(args)
    if args.vram is None:
        est = estimate(job)
        print(json.dumps(est.as_dict(), indent=1) if args.json else est.table())
        return
    from ..errors import UraeError

    result = best_config(job, args.vram, args.ram, fixed)
    if result.best is None:
        raise UraeError(result.impossible())
    if args.json:
        print(
            json.dumps(
                {
                    "vram_gib": args.vram,
                    "fitting": [{**c.estimate.as_dict(), "expected_seconds": c.seconds} for c in result.fitting],
                },
                indent=1,
            )
        )
        return
    print(format_result(result))


def format_result(result: PlanResult) -> str:
    """Fitting configurations, fastest first, the best one's table and the command that runs it."""
    from .search import options

    best = result.best
    cfg = best.config
    lines = [
        f"fits in {result.vram_gib:g} GiB: {cfg.task} {cfg.width}x{cfg.height}, fastest first "
        f"({len(result.fitting)} of the configurations tried fit; time relative to the fastest)"
    ]
    width = max(len(options(c.config)) for c in result.fitting[:SHOWN])
    for i, c in enumerate(result.fitting[:SHOWN], 1):
        host = f"host {c.estimate.host / C.GiB:4.1f} GiB" if c.estimate.host else ""
        lines.append(
            f"  {i}. {options(c.config):<{width}}  peak {c.peak / C.GiB:5.1f} GiB "
            f"in {c.estimate.peak_phase:<14} time {c.seconds / best.seconds:4.2f}x  {host}".rstrip()
        )
    lines += ["", best.estimate.table(), ""]
    if cfg.task == "generate":
        preset = "4k" if cfg.width * cfg.height >= 4096 * 4096 else "2k"  # the preset the plan's memory came from
        size = f"--preset {preset} --width {cfg.width} --height {cfg.height}"
        lines.append(f'run: urae-lite generate "PROMPT" {size} {options(cfg)}')
    else:
        lines.append(f"run: urae-lite train RECIPE {cfg.memory.describe('train', searched('train'))}")
    return "\n".join(lines)
