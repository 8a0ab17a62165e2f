"""`--vram` and `--ram` of `generate` and `train`: the option vocabulary only.

Outside the `plan` package on purpose: `urae_lite.plan` imports the estimate and the search, and the command modules
import this one at start-up. The planner is imported when the options are added (to name the settings it fills)
and when `--vram` is used (`plan.choose.apply_vram`), not when a command module is imported.
"""

from __future__ import annotations

import argparse


def add_vram_options(parser: argparse.ArgumentParser, task: str) -> None:
    """`--vram` and `--ram` of `generate` / `train`, naming the settings the planner fills as the command spells
    them (generate's options, train's recipe keys)."""
    from .plan.recipe import RECIPE_KEYS
    from .plan.search import SEARCHED

    keys = {field: key for key, field in RECIPE_KEYS.items()}
    names = [f"--{f.replace('_', '-')}" if task == "generate" else keys[f] for f in SEARCHED[task]]
    parser.add_argument(
        "--vram",
        type=float,
        metavar="GIB",
        help=f"pick the fastest {', '.join(names)} that fit "
        f"this many GiB (the `urae-lite plan` estimate); the ones you set stay",
    )
    parser.add_argument(
        "--ram",
        type=float,
        metavar="GIB",
        help="with --vram: host memory the plan may use for "
        "offloaded weights, swapped blocks and checkpoints (default: 3/4 of this machine's)",
    )
