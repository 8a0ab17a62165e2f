"""Synthetic adapter files in the authors' exact key layouts, sized to a given transformer config."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

DOUBLE_PROJ = ("to_q", "to_k", "to_v", "to_out.0")
SINGLE_PROJ = ("to_q", "to_k", "to_v")


def author_targets(config: dict) -> list[str]:
    names = [f"transformer_blocks.{i}.attn.{p}" for i in range(config["num_layers"]) for p in DOUBLE_PROJ]
    names += [
        f"single_transformer_blocks.{j}.attn.{p}" for j in range(config["num_single_layers"]) for p in SINGLE_PROJ
    ]
    return names


def _hidden(config: dict) -> int:
    return config["num_attention_heads"] * config["attention_head_dim"]


def write_authors_2k(path: Path, config: dict, rank: int = 4, seed: int = 0, std: float = 0.05) -> Path:
    """peft LoRA keys with the `transformer.` prefix, bf16, no alpha (scale 1)."""
    g = torch.Generator().manual_seed(seed)
    h = _hidden(config)
    tensors = {}
    for name in author_targets(config):
        tensors[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, h, generator=g) * std).bfloat16()
        tensors[f"transformer.{name}.lora_B.weight"] = (torch.randn(h, rank, generator=g) * std).bfloat16()
    save_file(tensors, str(path))
    return path


def write_authors_4k(path: Path, config: dict, rank: int = 4, seed: int = 1, std: float = 0.05) -> Path:
    """Minor-component factors under `<block>.attn.processor.to_{q,k,v,out}_{a,b}.weight`, no `transformer.`."""
    g = torch.Generator().manual_seed(seed)
    h = _hidden(config)
    tensors = {}
    for name in author_targets(config):
        block, proj = name.split(".attn.")
        short = "out" if proj == "to_out.0" else proj[3:]
        tensors[f"{block}.attn.processor.to_{short}_a.weight"] = (torch.randn(rank, h, generator=g) * std).bfloat16()
        tensors[f"{block}.attn.processor.to_{short}_b.weight"] = (torch.randn(h, rank, generator=g) * std).bfloat16()
    save_file(tensors, str(path))
    return path
