"""The patches the nodes hand to ComfyUI, as plain functions of tensors (no ComfyUI import).

* Proportional attention goes through ComfyUI's `transformer_options["optimized_attention_override"]`: every
  attention call of the model arrives as ``override(func, q, k, v, heads, ..., skip_reshape=..., ...)``, where
  `func` is the backend ComfyUI picked (SDPA, sage, flash, ...). Scaling q by sqrt(log N / log 4608) before `func`
  applies its plain 1/√d gives URAE's softmax scale on any backend. An override already present (another node's)
  is kept and receives the scaled q.
* The unet file lookup: ComfyUI's MODEL does not remember its file, so the 4K adapter node finds it among the model
  folders by comparing a few of the model's tensors with each file's (dtype-cast, exactly).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from ..bfl_layout import PREFIX
from ..errors import UraeError
from ..safetensors_io import open_safetensors
from .settings import attention_multiplier

OVERRIDE_KEY = "optimized_attention_override"  # ComfyUI's transformer_options key (comfy/ldm/modules/attention.py)


class ProportionalAttention:
    """An attention override: q scaled by URAE's multiplier for the call's token count N (text + image).

    A class rather than a closure so ComfyUI's deep copies of model options keep one small object with the
    previous override, if any, inside.
    """

    def __init__(self, previous: Callable | None = None):
        self.previous = previous

    def __call__(self, func: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *args, **kw):
        # skip_reshape: (batch, heads, N, head_dim), else (batch, N, heads·head_dim)
        n_tokens = q.shape[2] if kw.get("skip_reshape", False) else q.shape[1]
        q = q * attention_multiplier(n_tokens)
        if self.previous is not None:
            return self.previous(func, q, k, v, heads, *args, **kw)
        return func(q, k, v, heads, *args, **kw)


def with_proportional_attention(transformer_options: dict) -> dict:
    """transformer_options with our override installed (once: an existing ProportionalAttention is not stacked)."""
    previous = transformer_options.get(OVERRIDE_KEY)
    if isinstance(previous, ProportionalAttention):
        return transformer_options
    return {**transformer_options, OVERRIDE_KEY: ProportionalAttention(previous)}


# ---- which file a loaded model came from ---------------------------------------------------------------------------
PROBES = ("img_in.weight", "final_layer.linear.weight", "double_blocks.0.img_attn.norm.key_norm.scale")


def model_probes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The few BFL-named tensors of a loaded FLUX (ComfyUI's diffusion_model state) that identify its file."""
    return {k: state[k] for k in PROBES if k in state}


def file_matches(path: str | os.PathLike, probes: Mapping[str, torch.Tensor]) -> bool:
    """True when the safetensors file holds every probe tensor (bare or under `model.diffusion_model.`) and each,
    cast to the loaded dtype, equals the loaded one."""
    if not probes or not str(path).endswith(".safetensors"):
        return False
    try:
        with open_safetensors(Path(path)) as f:
            keys = set(f.keys())
            for name, loaded in probes.items():
                key = name if name in keys else PREFIX + name
                if key not in keys:
                    return False
                t = f.get_slice(key)
                if tuple(t.get_shape()) != tuple(loaded.shape):
                    return False
                if not torch.equal(f.get_tensor(key).to(loaded.dtype), loaded.detach().cpu()):
                    return False
    except (UraeError, OSError, RuntimeError, ValueError):  # an unreadable candidate is not the model's file
        return False
    return True


def find_model_file(candidates: Iterable[str | os.PathLike], probes: Mapping[str, torch.Tensor]) -> Path | None:
    """The first candidate file whose tensors are the loaded model's, or None."""
    for path in candidates:
        if file_matches(path, probes):
            return Path(path)
    return None
