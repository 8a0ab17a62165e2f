"""Test-side writer of ComfyUI / Forge single files: a diffusers FLUX transformer -> Black Forest Labs key layout.

Written independently of urae_lite.bfl_layout (explicit names, the inverse direction), so the tests check the
layout rather than restate it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DOUBLE_RENAMES = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
}
DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
GLOBAL_RENAMES = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}


def diffusers_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    doubles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    singles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")})
    for i in doubles:
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}img_attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{b}txt_attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.add_{x}_proj.{p}"] for x in "qkv"])
            for src, dst in DOUBLE_RENAMES.items():
                out[f"{b}{dst}.{p}"] = sd[f"{d}{src}.{p}"]
        for src, dst in DOUBLE_NORMS.items():
            out[f"{b}{dst}.scale"] = sd[f"{d}{src}.weight"]
    for i in singles:
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}linear1.{p}"] = torch.cat([sd[f"{d}attn.to_{x}.{p}"] for x in "qkv"] + [sd[f"{d}proj_mlp.{p}"]])
            out[f"{b}linear2.{p}"] = sd[f"{d}proj_out.{p}"]
            out[f"{b}modulation.lin.{p}"] = sd[f"{d}norm.linear.{p}"]
        out[f"{b}norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
    for src, dst in GLOBAL_RENAMES.items():
        for p in ("weight", "bias"):
            if f"{src}.{p}" in sd:
                out[f"{dst}.{p}"] = sd[f"{src}.{p}"]
    for p in ("weight", "bias"):  # diffusers (scale, shift) -> BFL (shift, scale)
        scale, shift = sd[f"norm_out.linear.{p}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    assert sum(t.numel() for t in out.values()) == sum(t.numel() for t in sd.values())
    return out


def transformer_state(pipeline_root: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted((Path(pipeline_root) / "transformer").glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def write_bfl_file(pipeline_root: Path, out: Path, dtype: torch.dtype | None = None, prefix: str = "") -> Path:
    """The tiny transformer as a ComfyUI-style single file (optionally cast, e.g. to float8_e4m3fn, and prefixed)."""
    bfl = diffusers_to_bfl(transformer_state(pipeline_root))
    save_file({prefix + k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in bfl.items()}, str(out))
    return out
