"""`urae-lite export ADAPTER --format kohya|diffusers --out FILE`: LoRAs for ComfyUI / Forge (kohya) or diffusers.

kohya layout: `lora_unet_<BFL module with _>.{lora_down.weight, lora_up.weight, alpha}`, scale = alpha / rank,
on Black Forest Labs' module names (`bfl_layout`). Our adapters are per projection (to_q, to_k, to_v, proj_mlp),
but BFL fuses those into one linear (`img_attn.qkv`, `linear1`); they are written as ONE exact LoRA on the fused
module: down = the parts' A stacked (each zero-padded to a common rank r), up = block-diagonal of the parts' B.
Then up·down restricted to each part's rows is exactly that part's B·A, which ComfyUI and Forge apply to the fused
weight as is, and diffusers' kohya reader recognises (equal rank per part, zero off-diagonal blocks) and splits
back into the original per-projection LoRAs instead of copying `down` to every part.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from pathlib import Path

import torch

from .adapter_io import LoraFactors, lora_state_dict, read_adapter
from .bfl_layout import SWAPPED, swap_halves, to_bfl
from .destinations import check_output_file, write_with_fallback
from .errors import UraeError
from .safetensors_io import atomic_save_file

FORMATS = ("kohya", "diffusers")
MLP_RATIO = 4  # FLUX's proj_mlp rows per hidden unit, for a linear1 whose proj_mlp carries no LoRA


def kohya_name(bfl_module: str) -> str:
    return "lora_unet_" + bfl_module.replace(".", "_")


def _group_by_bfl(modules: dict[str, LoraFactors]) -> dict[str, tuple[tuple[str, ...], dict[int, LoraFactors]]]:
    """BFL module -> (its part names, {part index: factors}) for every module of the adapter."""
    groups: dict[str, tuple[tuple[str, ...], dict[int, LoraFactors]]] = {}
    for name, f in modules.items():
        hit = to_bfl(name)
        if hit is None:
            raise UraeError(f"module {name} has no counterpart in the FLUX (BFL) layout: is it a FLUX.1 LoRA?")
        bfl, index, parts = hit
        groups.setdefault(bfl, (parts, {}))[1][index] = f
    return groups


def _power_of_two(x: float) -> bool:
    """x = ±2^k: multiplying a float by it only moves the exponent, so no rounding."""
    return abs(math.frexp(x)[0]) == 0.5


def fuse_parts(parts: tuple[str, ...], present: dict[int, LoraFactors]) -> LoraFactors:
    """One exact LoRA for a fused module: stacked down, block-diagonal up (zero blocks for parts without a LoRA).

    The fused module has one alpha, so parts of different scales fold their scale into their up block. Powers of two
    fold exactly in any dtype; any other mix is stored in fp32 (B·scale rounds once, ≤ 2^-24 relative) instead of
    rounding bf16 a second time. Mixed groups get alpha = rank (scale 1), which every reader applies without
    arithmetic: ComfyUI and Forge compute alpha/rank · up·down in fp32 from any stored dtype, while diffusers' kohya
    reader multiplies alpha/rank into the stored factors.
    """
    if len(parts) == 1:
        return present[0]
    rank = max(f.rank for f in present.values())
    first = next(iter(present.values()))
    hidden, dtype = first.A.shape[1], first.A.dtype
    scales = {f.scale for f in present.values()}
    keep = scales.pop() if len(scales) == 1 else 1.0  # a shared scale stays in alpha; mixed ones go into up
    if not all(_power_of_two(f.scale / keep) for f in present.values()):
        dtype = functools.reduce(
            torch.promote_types, [t.dtype for f in present.values() for t in (f.A, f.B)], torch.float32
        )
    rows = [
        present[i].B.shape[0] if i in present else MLP_RATIO * hidden if p.endswith("proj_mlp") else hidden
        for i, p in enumerate(parts)
    ]
    down = torch.zeros(len(parts) * rank, hidden, dtype=dtype)
    up = torch.zeros(sum(rows), len(parts) * rank, dtype=dtype)
    start = 0
    for i, n in enumerate(rows):
        if i in present:
            f = present[i]
            down[i * rank : i * rank + f.rank] = f.A.to(dtype)
            B = f.B if f.scale == keep else f.B.double() * (f.scale / keep)  # one rounding, into `dtype`
            up[start : start + n, i * rank : i * rank + f.rank] = B.to(dtype)
        start += n
    return LoraFactors(down, up, keep)


def kohya_state_dict(modules: dict[str, LoraFactors]) -> dict[str, torch.Tensor]:
    """kohya / ComfyUI keys on BFL modules; alpha = scale · rank so every loader applies the same update."""
    state: dict[str, torch.Tensor] = {}
    for bfl, (parts, present) in _group_by_bfl(modules).items():
        f = fuse_parts(parts, present)
        key = kohya_name(bfl)
        state[f"{key}.lora_down.weight"] = f.A.contiguous()
        state[f"{key}.lora_up.weight"] = (swap_halves(f.B) if bfl in SWAPPED else f.B).contiguous()
        state[f"{key}.alpha"] = torch.tensor(f.scale * f.rank, dtype=torch.float32)
    return state


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UraeError(f"unknown export format '{fmt}': use one of {', '.join(FORMATS)}")
    return fmt


def write_lora(modules: dict[str, LoraFactors], out: str | os.PathLike, fmt: str, metadata: dict[str, str]) -> Path:
    """Write LoRA factors as a `fmt` file (atomically; a failed write goes to the fallback file)."""
    check_format(fmt)
    if fmt == "kohya":
        state = kohya_state_dict(modules)
    else:
        state = lora_state_dict(modules, dtype=next(iter(modules.values())).A.dtype)
    meta = {"format": f"urae_lite.{fmt}", **metadata}
    return write_with_fallback(out, lambda path: atomic_save_file(state, path, meta), f"{fmt} LoRA")


def export_adapter(adapter: str | os.PathLike, fmt: str, out: str | os.PathLike) -> Path:
    """Write `adapter` (ours, diffusers/peft, the authors' 2K, a converted 4K) as a `fmt` LoRA file."""
    check_format(fmt)
    check_output_file(out)
    f = read_adapter(adapter)
    if f.kind != "lora":
        raise UraeError(
            f"{adapter} is a URAE 4K minor-component file, which only means something against its base: "
            f"run `urae-lite convert 2K_FILE {adapter} --model BASE --out FILE` and export that FILE"
        )
    return write_lora(f.modules, out, fmt, {"exported_from": Path(adapter).name})


def _cmd_export(args: argparse.Namespace) -> None:
    print(f"wrote {export_adapter(args.adapter, args.format, args.out)}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="adapter -> kohya LoRA (ComfyUI / Forge) or diffusers LoRA", description=__doc__)
    p.add_argument("adapter", help="our adapter, the authors' 2K file, or a converted 4K file (`urae-lite convert`)")
    p.add_argument("--format", choices=FORMATS, default="kohya", help="(default: %(default)s)")
    p.add_argument("--out", required=True, help=".safetensors file to write")
    p.set_defaults(func=_cmd_export)
