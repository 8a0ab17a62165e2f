"""Single-file FLUX transformers (ComfyUI / Forge `flux1-dev.safetensors`): read as if they were a diffusers folder.

`SingleFileReader` has CheckpointReader's interface (`keys`, `get`, `iter_tensors`) but yields diffusers-named
tensors: each BFL tensor is read once, fused q/k/v(/mlp) rows are split on the fly and final_layer's halves swapped
(`bfl_layout`), so the loader streams it into the quantized skeleton exactly like a folder. fp8 weights are
dequantized to bf16 per tensor. The variant comes from the weights (`guidance_in` = dev), never the file name.
The VAE, text encoders and scheduler come from a diffusers "base pipeline", which `urae_lite.model_files` finds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from .bfl_layout import PREFIX, needs_swap, strip_prefix, swap_halves, to_diffusers
from .errors import UraeError
from .safetensors_io import CheckpointReader, open_safetensors

FLUX_AXES = (16, 56, 56)  # FLUX.1's RoPE axes (head dim 128); not stored in the weights
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
IGNORED = ("scaled_fp8",)  # marker tensor of ComfyUI's scaled-fp8 files
GUIDANCE_KEY = "time_text_embed.guidance_embedder.linear_1.weight"
# config fields the weights determine; a --base-pipeline whose transformer disagrees is the wrong model
WIDTHS = (
    "in_channels",
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
)


class SingleFileReader:
    """One FLUX transformer file (BFL or diffusers keys, optional `model.diffusion_model.` prefix) -> diffusers
    (name, tensor) pairs, one source tensor in memory at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise UraeError(f"model file not found: {self.path}")
        with open_safetensors(self.path) as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        self.raw = CheckpointReader(self.path)
        own = [k for k in header if k.startswith(PREFIX)] or list(header)  # all-in-one files: transformer only
        self.layout = _layout(self.path, [strip_prefix(k) for k in own])
        self.scales = {strip_prefix(k)[: -len(".scale_weight")]: k for k in own if k.endswith(".scale_weight")}
        hidden = header[_raw_key(own, "img_in.weight")][0][0] if self.layout == "bfl" else 0
        self.plan: dict[str, list[tuple[str, int, int]]] = {}  # source key -> [(diffusers key, row a, row b)]
        self.shapes: dict[str, tuple[int, ...]] = {}
        for raw in own:
            key = strip_prefix(raw)
            if key in IGNORED or key.endswith((".scale_weight", ".scale_input")):
                continue
            shape = header[raw][0]
            pieces = (
                [(key, 0, shape[0] if shape else 0)]
                if self.layout == "diffusers"
                else to_diffusers(key, shape[0] if shape else 0, hidden)
            )
            if pieces is None:
                raise UraeError(
                    f"{self.path} has tensor {key}, which a FLUX.1 transformer does not: "
                    f"a different model? --model takes flux1-dev / flux1-schnell .safetensors files"
                )
            self.plan[raw] = pieces
            for name, a, b in pieces:
                self.shapes[name] = (b - a, *shape[1:]) if shape else shape
        self.index = {name: (raw, a, b) for raw, pieces in self.plan.items() for name, a, b in pieces}

    @property
    def variant(self) -> str:
        return "dev" if GUIDANCE_KEY in self.shapes else "schnell"

    def keys(self) -> list[str]:
        return list(self.index)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.index:
            raise UraeError(f"tensor {key} missing from {self.path}")
        raw, a, b = self.index[key]
        t = self._prepare(raw, self.raw.get(raw))
        return t if (a, b) == (0, t.shape[0]) else t[a:b].clone()  # clone: the fused tensor is freed

    def iter_tensors(self, keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Each source tensor read once (file order), its pieces yielded as views of it."""
        wanted = None if keys is None else set(keys)
        raws = [r for r, pieces in self.plan.items() if wanted is None or any(p[0] in wanted for p in pieces)]
        for raw, t in self.raw.iter_tensors(raws):
            t = self._prepare(raw, t)
            for name, a, b in self.plan[raw]:
                if wanted is None or name in wanted:
                    yield name, (t if (a, b) == (0, t.shape[0]) else t[a:b])
            del t

    def _prepare(self, raw: str, t: torch.Tensor) -> torch.Tensor:
        """fp8 -> bf16 (times the scale of a scaled-fp8 file); BFL final_layer halves swapped to diffusers order."""
        if t.dtype in FP8:
            scale_key = self.scales.get(strip_prefix(raw).rpartition(".")[0])
            t = (t.float() * self.raw.get(scale_key).float() if scale_key else t).to(torch.bfloat16)
        return swap_halves(t) if self.layout == "bfl" and needs_swap(strip_prefix(raw)) else t


def _raw_key(keys: list[str], name: str) -> str:
    for k in keys:
        if strip_prefix(k) == name:
            return k
    raise UraeError(f"FLUX transformer file lacks {name}: incomplete download? download it again")


def _layout(path: Path, names: list[str]) -> str:
    """`bfl` or `diffusers`, or one line saying what the file is instead."""
    if any(n.startswith("double_blocks.") for n in names):
        return "bfl"
    if "x_embedder.weight" in names and any(n.startswith("transformer_blocks.") for n in names):
        return "diffusers"
    raise UraeError(_not_flux(path, names))


def _not_flux(path: Path, names: list[str]) -> str:
    def has(*parts: str) -> bool:
        return any(n.startswith(parts) for n in names)

    if has(
        "input_blocks.",
        "first_stage_model.",
        "cond_stage_model.",
        "conditioner.",
        "joint_blocks.",
        "model.diffusion_model.input_blocks.",
    ):
        what = "a Stable Diffusion checkpoint"
    elif has("decoder.", "encoder.down", "encoder.conv_in"):
        what = "a VAE (like ae.safetensors), which comes from --base-pipeline"
    elif has("text_model.", "encoder.block.", "shared.", "text_encoders."):
        what = "a text encoder (like clip_l / t5xxl), which comes from --base-pipeline"
    elif any("lora" in n for n in names):
        what = "a LoRA: pass it with --adapter"
    else:
        what = "not a FLUX.1 transformer (no double_blocks.* or transformer_blocks.* tensors)"
    return f"{path} is {what}; --model takes a FLUX.1 transformer file such as flux1-dev.safetensors"


# ---- config ------------------------------------------------------------------------------------------------------
def derive_config(reader: SingleFileReader, base_config: dict | None, base_name: str | None) -> dict:
    """FluxTransformer2DModel config from the weights' shapes; RoPE axes from the base pipeline (or FLUX.1's)."""
    s = reader.shapes
    try:
        hidden, in_channels = s["x_embedder.weight"]
        head = s["transformer_blocks.0.attn.norm_q.weight"][0]
        config = {
            "_class_name": "FluxTransformer2DModel",
            "patch_size": 1,
            "in_channels": in_channels,
            "out_channels": None if s["proj_out.weight"][0] == in_channels else s["proj_out.weight"][0],
            "num_layers": len({k.split(".")[1] for k in s if k.startswith("transformer_blocks.")}),
            "num_single_layers": len({k.split(".")[1] for k in s if k.startswith("single_transformer_blocks.")}),
            "attention_head_dim": head,
            "num_attention_heads": hidden // head,
            "joint_attention_dim": s["context_embedder.weight"][1],
            "pooled_projection_dim": s["time_text_embed.text_embedder.linear_1.weight"][1],
            "guidance_embeds": reader.variant == "dev",
        }
    except KeyError as e:
        raise UraeError(
            f"{reader.path} lacks {e.args[0]}: an incomplete FLUX transformer file? download it again"
        ) from None
    if base_config is not None:
        wrong = [k for k in WIDTHS if base_config.get(k) != config[k]]
        if wrong:
            k = wrong[0]
            raise UraeError(
                f"{reader.path} does not match --base-pipeline {base_name}: its {k} is {config[k]}, the "
                f"pipeline's transformer has {base_config.get(k)}; pass the pipeline of the same model"
            )
        config["axes_dims_rope"] = list(base_config.get("axes_dims_rope", FLUX_AXES))
    elif head == sum(FLUX_AXES):
        config["axes_dims_rope"] = list(FLUX_AXES)
    else:
        raise UraeError(
            f"{reader.path} has attention heads of {head}, not FLUX.1's 128: pass --base-pipeline "
            f"with the diffusers folder of this model (its transformer/config.json)"
        )
    return config
