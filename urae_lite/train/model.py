"""The transformer as training sees it: quantized frozen base, frozen base adapters, one trainable adapter.

Trainable factors are kept in fp32 (master weights: 190 × 2 × 16 × 3072 × 4 B = 75 MiB) and cast to bf16 in the
forward, so small optimizer updates are not rounded away; everything else stays as the loader made it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import memory
from ..adapter_io import save_adapter
from ..export import export_adapter
from ..hires import set_ntk, set_proportional_attention
from ..loader import LoadSpec, adapted_layers, add_lora, read_transformer
from ..minor import MINOR_RESIDUAL_SLICE, MINOR_SLICE, MinorSpec
from ..safetensors_io import atomic_save_file
from .config import TrainConfig

if TYPE_CHECKING:
    from ..model_files import ModelFiles

LORA_SLICE = "lora"


def build_model(
    cfg: TrainConfig, device: torch.device, progress: bool = True, files: ModelFiles | None = None
) -> nn.Module:
    """Load base + `adapter.base_adapters` (frozen), with minor components initialised from them if asked; with
    `memory.blocks_to_swap` the last blocks' frozen weights stay in host memory (urae_lite.block_swap).
    `files`: the run's resolved model files (default: resolved from the recipe here)."""
    a = cfg.adapter
    minor = None
    if a.kind == "minor":
        minor = MinorSpec(a.rank, a.targets, trainable=True, svd_device=str(device) if device.type == "cuda" else None)
    dtype = torch.float32 if cfg.training.precision == "fp32" else torch.bfloat16
    spec = LoadSpec(
        cfg.memory.format, device, dtype, a.base_adapters, minor, progress, park_blocks=cfg.memory.blocks_to_swap
    )  # swapped blocks never sit on the device
    model = read_transformer(files if files is not None else cfg.model_files(), spec)
    return prepare_for_training(model, cfg, device)


def prepare_for_training(model: nn.Module, cfg: TrainConfig, device: torch.device | str) -> nn.Module:
    """Add the LoRA (kind lora), make trainable factors fp32 masters, set NTK / proportional attention, then the
    memory mechanisms (`memory.apply`: token chunks, block checkpointing keeping every `checkpoint_every`-th block
    input, on the device or in host memory for checkpointing=cpu, and block swap, which needs the fp32 masters)."""
    a = cfg.adapter
    if a.kind == "lora":
        add_lora(model, LORA_SLICE, a.rank, a.alpha, a.targets, seed=cfg.seed)
    for _, layer in adapted_layers(model):
        for piece in layer.slices.values():
            if piece.trainable:
                piece.A = nn.Parameter(piece.A.detach().float())
                piece.B = nn.Parameter(piece.B.detach().float())
    set_ntk(model, cfg.hires.ntk)
    set_proportional_attention(model, cfg.hires.proportional_attention)
    memory.apply(model, cfg.memory, device, training=True)
    model.train()
    return model


def trainable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of the trainable factors, in a fixed order (optimizer state and checkpoints rely on it)."""
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def save_trainable(model: nn.Module, path: str | Path) -> None:
    """The fp32 master factors by parameter name: what a resumed run needs to continue bit-exactly."""
    atomic_save_file({n: p.detach().cpu() for n, p in trainable_parameters(model)}, path)


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite the trainable factors in place (the optimizer keeps pointing at the same parameters)."""
    params = dict(trainable_parameters(model))
    if set(params) != set(tensors):
        missing = sorted(set(params) ^ set(tensors))
        raise ValueError(f"checkpoint does not match the model's trainable parameters (first difference: {missing[0]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def export_adapters(model: nn.Module, cfg: TrainConfig, folder: str | Path, metadata: dict[str, str]) -> list[Path]:
    """The trained adapter in our diffusers-compatible LoRA format (+ the authors' 4K layout for minor).

    LoRA: `adapter.safetensors` holds the trained slice only, like the authors' 2K file.
    Minor: `adapter.safetensors` is the exact plain LoRA W0 + B2·A2 − B0·A0 + B'·A' (rank 48 over the base,
    loads anywhere, base-specific), and `adapter_urae4k.safetensors` holds only (A', B') with the
    authors' keys (authors' targets only), for their loader or `load_transformer(adapters=[2k, this])`.
    """
    folder = Path(folder)
    meta = {"urae_lite.recipe_kind": cfg.adapter.kind, **metadata}
    if cfg.adapter.kind == "lora":
        files = [save_adapter(model, folder / "adapter.safetensors", [LORA_SLICE], meta)]
        return files + _kohya_copy(files[0], cfg)
    frozen = sorted(
        {n for _, layer in adapted_layers(model) for n in layer.slices if n not in (MINOR_SLICE, MINOR_RESIDUAL_SLICE)}
    )
    files = [save_adapter(model, folder / "adapter.safetensors", frozen + [MINOR_RESIDUAL_SLICE, MINOR_SLICE], meta)]
    if cfg.adapter.targets == "authors":  # their key layout only names attention projections
        files.append(save_urae_minor(model, folder / "adapter_urae4k.safetensors", meta))
    return files + _kohya_copy(files[0], cfg)


def _kohya_copy(adapter: Path, cfg: TrainConfig) -> list[Path]:
    """`output_format: kohya`: the same LoRA on the original FLUX module names, for ComfyUI / Forge."""
    if cfg.output_format != "kohya":
        return []
    return [export_adapter(adapter, "kohya", adapter.with_name("adapter_kohya.safetensors"))]


def save_urae_minor(model: nn.Module, path: str | Path, metadata: dict[str, str]) -> Path:
    """(A', B') under the authors' 4K keys: `<block>.attn.processor.to_{q,k,v,out}_{a,b}.weight`."""
    tensors = {}
    for name, layer in adapted_layers(model):
        if MINOR_SLICE not in layer.slices:
            continue
        block, _, proj = name.partition(".attn.")
        short = "out" if proj == "to_out.0" else proj.removeprefix("to_")
        piece = layer.slices[MINOR_SLICE]
        tensors[f"{block}.attn.processor.to_{short}_a.weight"] = piece.A.detach().to("cpu", torch.bfloat16)
        tensors[f"{block}.attn.processor.to_{short}_b.weight"] = piece.B.detach().to("cpu", torch.bfloat16)
    return atomic_save_file(tensors, path, {"format": "urae.minor", **metadata})
