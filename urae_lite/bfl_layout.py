"""Black Forest Labs' original FLUX key layout (ComfyUI / Forge single files) <-> diffusers' module names.

BFL fuses some projections into one linear: `double_blocks.N.img_attn.qkv` holds diffusers' to_q, to_k, to_v as
row blocks (`txt_attn.qkv` the add_*_proj twins), `single_blocks.N.linear1` holds to_q, to_k, to_v and proj_mlp.
Everything else is a rename, except `final_layer.adaLN_modulation.1`, whose (shift, scale) row halves diffusers
stores as (scale, shift). This module is the one place that knows the layout: the single-file reader uses the
forward direction per tensor, the LoRA export the inverse per module.
"""

from __future__ import annotations

import re

import torch

PREFIX = "model.diffusion_model."  # ComfyUI "checkpoint" files put the transformer under this prefix

# BFL module in double_blocks.N -> diffusers modules in transformer_blocks.N, in row order
DOUBLE: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.norm.query_norm": ("attn.norm_q",),
    "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",),
    "txt_attn.norm.key_norm": ("attn.norm_added_k",),
}
# BFL module in single_blocks.N -> diffusers modules in single_transformer_blocks.N
SINGLE: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
    "norm.query_norm": ("attn.norm_q",),
    "norm.key_norm": ("attn.norm_k",),
}
# modules outside the blocks
GLOBAL: dict[str, tuple[str, ...]] = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
SWAPPED = frozenset({"final_layer.adaLN_modulation.1"})  # (shift, scale) in BFL, (scale, shift) in diffusers
PARAMS = {"weight": "weight", "bias": "bias", "scale": "weight"}  # BFL parameter -> diffusers parameter
MLP_PART = "proj_mlp"  # the one part of a fused module that is not `hidden` rows: it takes the rest
BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
DIFFUSERS_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_BLOCK_NAMES = {"double_blocks": ("transformer_blocks", DOUBLE), "single_blocks": ("single_transformer_blocks", SINGLE)}


def strip_prefix(key: str) -> str:
    return key.removeprefix(PREFIX)


def diffusers_modules(bfl_module: str) -> tuple[str, ...] | None:
    """Full diffusers module names held by one BFL module, in row order; None for a name not in the layout."""
    if (m := BLOCK.match(bfl_module)) is not None:
        kind, index, rest = m.groups()
        prefix, table = _BLOCK_NAMES[kind]
        parts = table.get(rest)
        return None if parts is None else tuple(f"{prefix}.{index}.{p}" for p in parts)
    return GLOBAL.get(bfl_module)


def part_rows(parts: tuple[str, ...], rows: int, hidden: int) -> list[tuple[int, int]]:
    """Row range of each part in a fused tensor of `rows` rows: `hidden` each, proj_mlp the remainder."""
    if len(parts) == 1:
        return [(0, rows)]
    spans, start = [], 0
    for p in parts:
        stop = rows if p.endswith(MLP_PART) else start + hidden
        spans.append((start, stop))
        start = stop
    if start != rows:
        raise ValueError(f"{len(parts)} parts of {hidden} rows do not fill {rows} rows")
    return spans


def to_diffusers(bfl_key: str, rows: int, hidden: int) -> list[tuple[str, int, int]] | None:
    """BFL tensor name (no prefix) -> [(diffusers tensor name, first row, end row)]; None when not in the layout."""
    module, _, param = bfl_key.rpartition(".")
    parts = diffusers_modules(module)
    if parts is None or param not in PARAMS:
        return None
    leaf = PARAMS[param]
    return [(f"{p}.{leaf}", a, b) for p, (a, b) in zip(parts, part_rows(parts, rows, hidden))]


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """final_layer's adaLN rows: (shift, scale) <-> (scale, shift); its own inverse."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def needs_swap(bfl_key: str) -> bool:
    return bfl_key.rpartition(".")[0] in SWAPPED


# ---- inverse: diffusers module -> where it sits in a BFL module (LoRA export) -------------------------------------
def _inverse() -> dict[str, tuple[str, int, tuple[str, ...]]]:
    """Suffix-keyed inverse of the tables: diffusers module (block-relative) -> (BFL module, part index, parts)."""
    out = {}
    for kind, (prefix, table) in _BLOCK_NAMES.items():
        for bfl, parts in table.items():
            for i, p in enumerate(parts):
                out[f"{prefix}.{p}"] = (f"{kind}.{bfl}", i, parts)
    for bfl, parts in GLOBAL.items():
        out[parts[0]] = (bfl, 0, parts)
    return out


_INVERSE = _inverse()


def to_bfl(diffusers_module: str) -> tuple[str, int, tuple[str, ...]] | None:
    """diffusers module -> (BFL module, index of this part, all part names of that BFL module); None if unknown.

    `transformer_blocks.3.attn.to_k` -> (`double_blocks.3.img_attn.qkv`, 1, (attn.to_q, attn.to_k, attn.to_v)).
    """
    if (m := DIFFUSERS_BLOCK.match(diffusers_module)) is not None:
        prefix, index, rest = m.groups()
        hit = _INVERSE.get(f"{prefix}.{rest}")
        if hit is None:
            return None
        bfl, i, parts = hit
        kind, _, bfl_rest = bfl.partition(".")
        return f"{kind}.{index}.{bfl_rest}", i, parts
    hit = _INVERSE.get(diffusers_module)
    return hit if hit is not None and not hit[0].startswith(("double_blocks", "single_blocks")) else None
