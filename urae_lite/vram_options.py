"""`--vram` and `--ram` of `generate` and `train`: the option vocabulary only (the planner runs when they are used:
`urae_lite.plan.choose.apply_vram`). `--vram auto`, the default on CUDA when no memory setting is given, plans for
the device's free memory."""

from __future__ import annotations

import argparse

from .memory import searched, spell

AUTO = "auto"


def vram_value(text: str) -> float | str:
    """`--vram`'s value: GiB, or `auto`."""
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GiB (a number) or '{AUTO}', got {text!r}") from None


def auto_vram(vram: float | str | None, user_set: set[str], device_type: str) -> float | str | None:
    """`--vram` as the command runs it: what the user gave, else `auto` on CUDA when they set no memory setting
    (explicit settings win: they are planned around only with --vram)."""
    if vram is None and not user_set and device_type == "cuda":
        return AUTO
    return vram


def add_vram_options(parser: argparse.ArgumentParser, task: str) -> None:
    """`--vram` and `--ram` of `generate` / `train`, naming the settings the planner fills as the command spells
    them (generate's options, train's recipe keys)."""
    names = [spell(name, task) for name in searched(task)]
    parser.add_argument(
        "--vram",
        type=vram_value,
        metavar="GIB|auto",
        help=f"pick the fastest {', '.join(names)} that fit this many GiB (the `urae-lite plan` estimate); the ones "
        f"you set stay. auto: the CUDA device's free memory (the default on CUDA when you set none of them)",
    )
    parser.add_argument(
        "--ram",
        type=float,
        metavar="GIB",
        help="with --vram: host memory the plan may use for "
        "offloaded weights, swapped blocks and checkpoints (default: 3/4 of this machine's)",
    )
