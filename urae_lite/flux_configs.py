"""The published FLUX.1 architecture: transformer, scheduler, VAE and the two text encoders, without downloading.

One owner for the full-size numbers: the memory planner sizes FLUX.1 from them, the fake-tensor measurement and the
benchmarks build full-size models from them, and the tiny test model (urae_lite/tiny/) copies the scheduler settings.
"""

from __future__ import annotations

__all__ = [
    "CLIP_LAYERS",
    "CLIP_MLP",
    "CLIP_POSITIONS",
    "CLIP_VOCAB",
    "CLIP_WIDTH",
    "FLUX_VAE_CONFIG",
    "FLUX_VAE_FACTORS",
    "PATCH",
    "T5_D_FF",
    "T5_D_MODEL",
    "T5_HEADS",
    "T5_LAYERS",
    "T5_VOCAB",
    "TEXT_TOKENS",
    "VAE_DOWNSAMPLE",
    "VARIANTS",
    "check_variant",
    "clip_config",
    "flux_dev_config",
    "flux_scheduler_config",
    "t5_config",
]

VARIANTS = ("dev", "schnell")


def check_variant(variant: str) -> None:
    """Fail early with the accepted names: a typo here would silently build the wrong model family."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown FLUX variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def flux_dev_config(variant: str = "dev") -> dict:
    """The full-size FLUX.1 transformer config: 11.90 B parameters, 504 Linear layers.

    Schnell has the same shapes but no guidance embedder (it is timestep-distilled, not guidance-distilled).
    """
    check_variant(variant)
    return {
        "patch_size": 1,
        "in_channels": 64,
        "out_channels": None,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": variant == "dev",
        "axes_dims_rope": (16, 56, 56),
    }


def flux_scheduler_config(variant: str = "dev") -> dict:
    """FlowMatchEuler settings copied from the official FLUX.1 repositories' scheduler_config.json."""
    check_variant(variant)
    dev = variant == "dev"
    return {
        "num_train_timesteps": 1000,
        "shift": 3.0 if dev else 1.0,
        "use_dynamic_shifting": dev,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    }


# ---- the VAE (black-forest-labs/FLUX.1-dev vae/config.json; 83.8 M parameters when built from it) ----------------
FLUX_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
FLUX_VAE_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}  # the latent scaling of the same config
VAE_DOWNSAMPLE = 8  # pixels per latent pixel
PATCH = 2  # 2x2 latent pixels per transformer token (16 px per token side)

# ---- the text encoders -------------------------------------------------------------------------------------------
# T5-v1.1-XXL encoder (google/t5-v1_1-xxl, FLUX's text_encoder_2): d_model 4096, d_ff 10240 (gated: wi_0, wi_1, wo),
# 24 layers, 64 heads x 64, vocab 32128 -> 4.76 B parameters (usually quoted as "4.7 B").
T5_D_MODEL, T5_D_FF, T5_LAYERS, T5_HEADS, T5_VOCAB = 4096, 10240, 24, 64, 32128
# CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14): width 768, mlp 3072, 12 layers, vocab 49408, 77 positions
# -> 123 M parameters.
CLIP_WIDTH, CLIP_MLP, CLIP_LAYERS, CLIP_VOCAB, CLIP_POSITIONS = 768, 3072, 12, 49408, 77
TEXT_TOKENS = {"dev": 512, "schnell": 256}  # T5 max_sequence_length defaults


def clip_config():
    """transformers' CLIPTextConfig of FLUX.1's CLIP-L text tower."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB,
        hidden_size=CLIP_WIDTH,
        intermediate_size=CLIP_MLP,
        projection_dim=CLIP_WIDTH,
        num_hidden_layers=CLIP_LAYERS,
        num_attention_heads=12,
        max_position_embeddings=CLIP_POSITIONS,
        hidden_act="quick_gelu",
    )


def t5_config():
    """transformers' T5Config of FLUX.1's T5-XXL encoder."""
    from transformers import T5Config

    return T5Config(
        vocab_size=T5_VOCAB,
        d_model=T5_D_MODEL,
        d_kv=64,
        d_ff=T5_D_FF,
        num_layers=T5_LAYERS,
        num_heads=T5_HEADS,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new",
        is_gated_act=True,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
    )
