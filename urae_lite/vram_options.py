"""`--vram` and `--ram` of `generate` and `train`: the option vocabulary only (the planner runs when they are used:
`urae_lite.plan.choose.apply_vram`)."""

from __future__ import annotations

import argparse

from .memory import searched, spell


def add_vram_options(parser: argparse.ArgumentParser, task: str) -> None:
    """`--vram` and `--ram` of `generate` / `train`, naming the settings the planner fills as the command spells
    them (generate's options, train's recipe keys)."""
    names = [spell(name, task) for name in searched(task)]
    parser.add_argument(
        "--vram",
        type=float,
        metavar="GIB",
        help=f"pick the fastest {', '.join(names)} that fit this many GiB (the `urae-lite plan` estimate); the ones "
        f"you set stay",
    )
    parser.add_argument(
        "--ram",
        type=float,
        metavar="GIB",
        help="with --vram: host memory the plan may use for "
        "offloaded weights, swapped blocks and checkpoints (default: 3/4 of this machine's)",
    )
