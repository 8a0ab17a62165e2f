"""Flow-matching math, latent packing and schedules (no models)."""

from __future__ import annotations

import pytest
import torch

from urae_lite.train.flow import (
    latent_image_ids,
    noisy_and_target,
    pack_latents,
    posterior_sample,
    sample_generator,
    sample_sigma,
    unpack_latents,
)


def test_pack_and_ids_match_diffusers_flux_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(1, 16, 6, 10)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 1, 16, 6, 10))
    assert torch.equal(unpack_latents(pack_latents(x), 6, 10), x)
    expected = FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    assert torch.equal(latent_image_ids(6, 10), expected)


def test_uniform_sigma_is_the_authors_grid():
    gen = torch.Generator().manual_seed(0)
    sigmas = [sample_sigma(gen) for _ in range(4000)]
    assert all(0.001 <= s <= 1.0 and abs(s * 1000 - round(s * 1000)) < 1e-9 for s in sigmas)
    assert abs(sum(sigmas) / len(sigmas) - 0.5) < 0.02
    assert sum(s < 0.25 for s in sigmas) / len(sigmas) == pytest.approx(0.25, abs=0.03)
    logit = [sample_sigma(gen, "logit_normal") for _ in range(4000)]
    assert all(0.001 <= s <= 1.0 for s in logit)
    assert sum(0.25 < s < 0.75 for s in logit) / 4000 > 0.6  # mass concentrated in the middle


def test_posterior_sample_and_noisy_target_follow_the_formulas():
    mean, std = torch.randn(16, 4, 4), torch.rand(16, 4, 4)
    gen = torch.Generator().manual_seed(3)
    x0 = posterior_sample(mean, std, gen, 0.1159, 0.3611)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x0, (mean + std * eps - 0.1159) * 0.3611)
    x, target = noisy_and_target(x0, 0.3, gen)
    n = target + x0
    torch.testing.assert_close(x, 0.7 * x0 + 0.3 * n)
    # a fresh posterior draw per sample: another index gives another ε
    other = posterior_sample(mean, std, sample_generator(0, 1), 0.1159, 0.3611)
    again = posterior_sample(mean, std, sample_generator(0, 1), 0.1159, 0.3611)
    assert torch.equal(other, again) and not torch.equal(
        other, posterior_sample(mean, std, sample_generator(0, 2), 0.1159, 0.3611)
    )
