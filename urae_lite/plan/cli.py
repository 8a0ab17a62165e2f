"""`urae-lite plan`: will it fit my card? The per-phase memory table of a job, or with `--vram N` the fastest
configuration that fits N GiB and the next best ones, before any weights are read."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from ..quant import QUANT_FORMATS
from . import constants as C
from .estimate import (ADAPTERS, CHECKPOINTING, OFFLOAD_MODES, OPTIMIZERS, TASKS, VAE_TILING_MODES, VARIANTS,
                       PlanConfig)

if TYPE_CHECKING:
    from .search import PlanResult

# CLI option -> PlanConfig field, for the options a user can fix (None = not given: searched with --vram)
FIXABLE = ("quant", "variant", "rank", "offload", "vae_tiling", "t5_quant", "adapter", "checkpointing", "optimizer",
           "steps")
SHOWN = 5  # candidates listed with --vram


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="peak GPU memory of generate/train per phase; with --vram N, what fits N GiB",
                       description=__doc__)
    p.add_argument("--task", choices=TASKS, default="generate")
    p.add_argument("--resolution", type=int, default=2048, help="image side in pixels (default: %(default)s)")
    p.add_argument("--width", type=int, help="overrides --resolution")
    p.add_argument("--height", type=int, help="overrides --resolution")
    p.add_argument("--variant", choices=VARIANTS, help="FLUX.1 model (default dev)")
    p.add_argument("--quant", choices=QUANT_FORMATS, help="frozen base format (default nf4)")
    p.add_argument("--rank", type=int, help="generate: total adapter rank (default 16, 48 above 2048²); "
                   "train: trainable rank (default 16)")
    p.add_argument("--offload", choices=OFFLOAD_MODES, help="generate (default model)")
    p.add_argument("--vae-tiling", choices=VAE_TILING_MODES, help="generate (default auto)")
    p.add_argument("--t5-quant", choices=("bf16", "nf4"), help="generate: T5-XXL's linears (default bf16)")
    p.add_argument("--steps", type=int, help="generate: denoising steps, for the speed ranking (default 28)")
    p.add_argument("--adapter", choices=ADAPTERS, help="train (default lora; minor from 4096²)")
    p.add_argument("--checkpointing", choices=CHECKPOINTING,
                   help="train: gradient checkpointing, cpu = checkpoints in pinned host memory (default on)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="train (default prodigy)")
    p.add_argument("--no-validation", dest="validation", action="store_false",
                   help="train: leave out the recipes' validation images")
    p.add_argument("--vram", type=float, metavar="GIB",
                   help="the card's memory in GiB (a '24 GB' card has 24 GiB): list what fits, fastest first")
    p.add_argument("--ram", type=float, metavar="GIB",
                   help="with --vram: host memory available for offloaded weights or checkpoints, in GiB")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from .estimate import estimate
    from .search import best_config

    width, height = args.width or args.resolution, args.height or args.resolution
    fixed = {k: getattr(args, k) for k in FIXABLE if getattr(args, k) is not None}
    fixed["validation"] = args.validation
    if args.vram is None:
        est = estimate(PlanConfig(task=args.task, width=width, height=height, **fixed))
        print(json.dumps(est.as_dict(), indent=1) if args.json else est.table())
        return
    from ..errors import UraeError

    result = best_config(args.task, width, height, args.vram, args.ram, **fixed)
    if result.best is None:
        raise UraeError(result.impossible())
    if args.json:
        print(json.dumps({"vram_gib": args.vram, "fitting": [
            {**c.estimate.as_dict(), "expected_seconds": c.seconds} for c in result.fitting]}, indent=1))
        return
    print(format_result(result))


def format_result(result: PlanResult) -> str:
    """Fitting configurations, fastest first, the best one's table and the command that runs it."""
    from .search import options, train_overrides

    best = result.best
    cfg = best.config
    lines = [f"fits in {result.vram_gib:g} GiB: {cfg.task} {cfg.width}x{cfg.height}, fastest first "
             f"({len(result.fitting)} of the configurations tried fit; time relative to the fastest)"]
    width = max(len(options(c.config)) for c in result.fitting[:SHOWN])
    for i, c in enumerate(result.fitting[:SHOWN], 1):
        host = f"host {c.estimate.host / C.GiB:4.1f} GiB" if c.estimate.host else ""
        lines.append(f"  {i}. {options(c.config):<{width}}  peak {c.peak / C.GiB:5.1f} GiB "
                     f"in {c.estimate.peak_phase:<14} time {c.seconds / best.seconds:4.2f}x  {host}".rstrip())
    lines += ["", best.estimate.table(), ""]
    if cfg.task == "generate":
        size = f"--width {cfg.width} --height {cfg.height}"
        lines.append(f'run: urae-lite generate "PROMPT" {size} {options(cfg)}')
    else:
        lines.append(f"run: urae-lite train RECIPE {' '.join(train_overrides(cfg))}")
    return "\n".join(lines)
