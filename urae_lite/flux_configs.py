"""The real FLUX.1 configurations (transformer and scheduler) as diffusers kwargs, without downloading anything.

One owner for the full-size numbers: the memory planner sizes FLUX.1 from them, benchmarks build random
full-size checkpoints from them, and the tiny test model (urae_lite/tiny/) copies the scheduler settings.
"""

from __future__ import annotations

__all__ = ["VARIANTS", "check_variant", "flux_dev_config", "flux_scheduler_config"]

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
