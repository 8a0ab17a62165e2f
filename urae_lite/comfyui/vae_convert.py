"""ComfyUI's VAE (LDM key layout) -> a diffusers AutoencoderKL, through diffusers' own single-file converter.

The exact tiled decode (urae_lite/vae_tiling.py) walks a diffusers Decoder. ComfyUI holds the same weights under
the original LDM names (`decoder.up.3.block.0.conv1.weight`), so the node converts them once with
`convert_ldm_vae_checkpoint` (the code diffusers' `from_single_file` runs) into an AutoencoderKL whose config is
read from the tensor shapes. The GroupNorm group count is not in the weights; the caller passes the loaded
module's own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import UraeError
from ..flux_configs import FLUX_VAE_CONFIG

_DOWN_BLOCK = re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.")


def diffusers_vae_config(ldm: Mapping[str, torch.Tensor], norm_num_groups: int) -> dict:
    """AutoencoderKL kwargs for an LDM-layout VAE state dict (FLUX's VAE family: KL, mid attention, no
    quant convs unless present); the FLUX scaling/shift factors are kept (the decode does not read them)."""
    if "decoder.conv_in.weight" not in ldm or "encoder.conv_in.weight" not in ldm:
        raise UraeError("this VAE is not an LDM/FLUX-style autoencoder (no encoder/decoder conv_in): use VAEDecode")
    blocks: dict[int, set[int]] = {}
    for key in ldm:
        if (m := _DOWN_BLOCK.match(key)) is not None:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks:
        raise UraeError("this VAE has no encoder.down blocks: not an LDM/FLUX-style autoencoder; use VAEDecode")
    levels = sorted(blocks)
    channels = [int(ldm[f"encoder.down.{i}.block.{max(blocks[i])}.conv2.weight"].shape[0]) for i in levels]
    return {
        **FLUX_VAE_CONFIG,
        "in_channels": int(ldm["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(ldm["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels,
        "layers_per_block": len(blocks[levels[0]]),
        "latent_channels": int(ldm["decoder.conv_in.weight"].shape[1]),
        "norm_num_groups": norm_num_groups,
        "use_quant_conv": "quant_conv.weight" in ldm,
        "use_post_quant_conv": "post_quant_conv.weight" in ldm,
        "mid_block_add_attention": any(k.startswith("decoder.mid.attn_1.") for k in ldm),
    }


def ldm_to_autoencoder(
    ldm: Mapping[str, torch.Tensor], norm_num_groups: int, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """A diffusers AutoencoderKL holding exactly the LDM state dict's weights (every key converted, none left)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = diffusers_vae_config(ldm, norm_num_groups)
    state = convert_ldm_vae_checkpoint(dict(ldm), config)
    if len(state) != len(ldm):  # the converter maps names one to one and skips what it does not know
        raise UraeError(
            f"{len(ldm) - len(state)} of the VAE's {len(ldm)} weights have no diffusers AutoencoderKL counterpart: "
            "use VAEDecode for this VAE"
        )
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    missing, unexpected = vae.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise UraeError(
            f"the VAE does not convert to diffusers' AutoencoderKL ({len(missing)} weights missing, "
            f"{len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]}): use VAEDecode for this VAE"
        )
    vae = vae.eval().requires_grad_(False)
    return vae.to(dtype) if dtype is not None else vae
