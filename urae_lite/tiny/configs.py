"""The tiny model's shapes: FLUX.1's interfaces at minimal widths, so code exercised on it is the real code path."""

from __future__ import annotations

from ..flux_configs import check_variant

# Tiny widths. The text widths feed the transformer's joint_attention_dim / pooled_projection_dim.
T5_D_MODEL = 64  # a multiple of the NF4 block, so `--t5-quant nf4` quantizes the tiny T5 too
CLIP_HIDDEN = 32
CLIP_MAX_POSITIONS = 77
T5_MAX_LENGTH = 512
T5_EXTRA_IDS = 100


def tiny_transformer_config(variant: str = "dev") -> dict:
    """A FLUX-shaped transformer config (diffusers kwargs) with hidden size 32.

    Keeps every interface of the real model (64 packed latent channels, double + single blocks, 3-axis
    RoPE summing to the head dim, text widths of the tiny encoders, guidance input for dev) so code paths
    exercised on it are the ones used on FLUX.1; only the widths and depths shrink.
    """
    check_variant(variant)
    return {
        "patch_size": 1,
        "in_channels": 64,
        "out_channels": None,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": T5_D_MODEL,
        "pooled_projection_dim": CLIP_HIDDEN,
        "guidance_embeds": variant == "dev",
        "axes_dims_rope": (4, 6, 6),
    }


def tiny_vae_config() -> dict:
    """FLUX's AutoencoderKL interface (16 latents, 8x down, same scaling/shift) at 8/16 channels.

    VAE decoding at full resolution dominates a tiny generation's time, so the widths are minimal.
    """
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 8, 16, 16],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 16,
        "norm_num_groups": 4,
        "sample_size": 1024,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "force_upcast": True,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }
