"""Shared fixtures: tiny FLUX folders built once per session, deterministic transformer inputs."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in the numpy interpreter; Triton decides interpreter vs compiler when
# the kernels are first imported, so this must run before anything imports urae_lite.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """A complete tiny FLUX.1-dev folder in diffusers layout (pipeline root)."""
    from urae_lite.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux-dev", seed=0, variant="dev")


@pytest.fixture(scope="session")
def tiny_config():
    from urae_lite.tiny import tiny_transformer_config

    return tiny_transformer_config("dev")


def transformer_inputs(
    config: dict,
    height_tokens: int = 4,
    width_tokens: int = 6,
    text_tokens: int = 7,
    seed: int = 1,
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """Random but valid FluxTransformer2DModel inputs (packed latents, ids, embeddings)."""
    g = torch.Generator().manual_seed(seed)
    n_img = height_tokens * width_tokens
    img_ids = torch.zeros(height_tokens, width_tokens, 3)
    img_ids[..., 1] = torch.arange(height_tokens)[:, None]
    img_ids[..., 2] = torch.arange(width_tokens)[None, :]
    inputs = dict(
        hidden_states=torch.randn(1, n_img, config["in_channels"], generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, text_tokens, config["joint_attention_dim"], generator=g).to(dtype),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g).to(dtype),
        timestep=torch.tensor([0.7]),
        img_ids=img_ids.reshape(n_img, 3),
        txt_ids=torch.zeros(text_tokens, 3),
    )
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


@pytest.fixture(scope="session")
def make_inputs():
    return transformer_inputs
