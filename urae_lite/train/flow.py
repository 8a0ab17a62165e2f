"""Rectified-flow training math (docs/training.md), independent of models and files.

Every random draw of a training sample (caption column, σ, posterior ε, noise) comes from a generator seeded by
(seed, global sample index). A sample therefore gets the same draws whichever process, step, gradient-accumulation
layout or resumed run computes it: that is what makes `--resume` exact and N processes equal to N-fold
gradient accumulation.
"""

from __future__ import annotations

import hashlib

import torch

NUM_TRAIN_TIMESTEPS = 1000


def sample_generator(seed: int, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"urae_lite:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def sample_sigma(
    gen: torch.Generator,
    mode: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> float:
    """σ ∈ {1/T, ..., 1}: uniform as the authors trained (no shift, weight 1), or logit-normal (SD3's choice)."""
    if mode == "uniform":
        u = torch.rand((), generator=gen).item()
    elif mode == "logit_normal":
        u = torch.sigmoid(torch.randn((), generator=gen) * logit_std + logit_mean).item()
    else:
        raise ValueError(f"unknown timestep sampling {mode!r}")
    return (min(int(u * num_train_timesteps), num_train_timesteps - 1) + 1) / num_train_timesteps


def posterior_sample(
    mean: torch.Tensor, std: torch.Tensor, gen: torch.Generator, shift_factor: float, scaling_factor: float
) -> torch.Tensor:
    """A fresh VAE posterior draw in the transformer's latent space: (mean + std·ε − shift)·scale, fp32."""
    eps = torch.randn(mean.shape, generator=gen)
    return (mean.float() + std.float() * eps - shift_factor) * scaling_factor


def noisy_and_target(x0: torch.Tensor, sigma: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x_σ = (1−σ)·x0 + σ·n and the velocity target n − x0."""
    noise = torch.randn(x0.shape, generator=gen)
    return (1.0 - sigma) * x0 + sigma * noise, noise - x0


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, 4C): FLUX's 2x2 patch tokens, same order as FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for latent (height, width)."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def latent_image_ids(height: int, width: int) -> torch.Tensor:
    """(H/2·W/2, 3) RoPE positions of the packed tokens: (0, row, col), not interpolated at any resolution."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def flow_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain MSE in fp32, weight 1 for every σ."""
    return torch.mean((prediction.float() - target.float()) ** 2)
