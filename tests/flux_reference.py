"""A float64 FLUX text-to-image sampler written from the model's definition: the generation tests' reference.

What a pipeline can get wrong is written here independently of urae_lite and of FluxPipeline: the latent layout
(2x2 patches via `pixel_unshuffle`, not a reshape), the token positions, the noise schedule (FLUX.1's exponential
dynamic shift or URAE's static shift, from their formulas), the Euler loop, the proportional attention scale (as
the query norms' weights times the multiplier: RoPE is linear, so the scaled queries are q·m), the NTK RoPE base,
the VAE un-scaling and one untiled decode. The network math itself comes from diffusers' modules (transformer,
VAE, text encoders), loaded in float64 with the weights the test hands over (adapters merged in float64).

Error analysis, used by the tests' bounds. The code under test runs the same function in fp32 (unit roundoff
u = 2^-24 ≈ 6e-8) with the same weight values (bf16 / dequantized NF4, exact in fp32), so the two differ only by
rounding. A dot product of length K has error ≲ √K·u·Σ|aᵢbᵢ| with overwhelming probability (Higham & Mary 2019,
probabilistic rounding error analysis; the worst case K·u needs adversarial signs); the longest in the transformer
are attention over all N tokens and the single blocks' output projection (32 + 128 inputs), so K ≤ max(N, 160).
The tiny model's layers keep PyTorch's default init (std 1/√(3·fan_in): gain below 1) between normalizations, so
relative errors add over the ≈ 30 dependent products of one denoising step (4 blocks of about 6, embedders,
output) rather than multiply: `latent_tolerance` = steps · 30 · √max(N, 160) · u, relative to the latents' size
(4.9e-4 at 1024² with 512 text tokens and 4 steps, the largest case here). The VAE decoder (GroupNorm between
default-init convolutions, K ≤ 9·16) passes that relative error on and adds ≈ 40 · √144 · u ≈ 3e-5; the image is
decoder output / 2 + 0.5, so `PIXEL_TOL` = 1e-3 in [0, 1] units covers every case (0.26 of an 8-bit level). The
float64 side is not pure float64 either: diffusers' RMSNorm takes the variance in fp32 (another u per norm).
The faults the tests guard against (patch layout, shift, a dropped adapter, NTK, attention scale) move latents or
pixels by more than 10x these bounds; each test asserts that its injected faults exceed them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

PIXEL_TOL = 1e-3  # |image - reference| in [0, 1] units: see the error analysis above
U32 = 2.0**-24
PRODUCTS_PER_STEP = 30  # dependent matmuls per transformer pass of the tiny model (analysis above)
BASE_TOKENS = 4608  # URAE's proportional attention: 512 text + 64·64 image tokens (FLUX.1 at 1024²)
LATENT_CHANNELS = 16


def latent_tolerance(steps: int, tokens: int) -> float:
    """Bound on max|latents − reference| / max|reference| for `steps` passes over `tokens` (text + image) tokens."""
    return steps * PRODUCTS_PER_STEP * math.sqrt(max(tokens, 160)) * U32


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(1, C, h, w) latents -> (1, h/2·w/2, 4C) tokens: each 2x2 patch, channel-major (c, dy, dx), row-major."""
    return F.pixel_unshuffle(latents, 2).flatten(2).transpose(1, 2)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack` for latent size (h, w)."""
    b, n, d = tokens.shape
    return F.pixel_shuffle(tokens.transpose(1, 2).reshape(b, d, h // 2, w // 2), 2)


def unpack_with_transposed_patches(latents, height, width, vae_scale_factor):
    """A deliberately wrong `FluxPipeline._unpack_latents` (each token's 2x2 patch read as (c, dx, dy) instead of
    (c, dy, dx)), for the tests that show their reference catches a wrong latent layout."""
    b, _, d = latents.shape
    h, w = 2 * (int(height) // (vae_scale_factor * 2)), 2 * (int(width) // (vae_scale_factor * 2))
    x = latents.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 5, 2, 4)
    return x.reshape(b, d // 4, h, w)


def image_ids(rows: int, cols: int) -> torch.Tensor:
    """(rows·cols, 3) RoPE positions (0, row, col) of the packed image tokens."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.zeros_like(r), r, c], -1).reshape(-1, 3).double()


def base_sigmas(steps: int) -> np.ndarray:
    return np.linspace(1.0, 1.0 / steps, steps)


def static_sigmas(steps: int, shift: float) -> list[float]:
    """URAE's static shift σ' = s·σ / (1 + (s−1)·σ), then 0."""
    s = base_sigmas(steps)
    return [*(shift * s / (1 + (shift - 1) * s)), 0.0]


def dynamic_sigmas(steps: int, image_tokens: int) -> list[float]:
    """FLUX.1-dev's resolution-dependent shift: μ linear in the token count (0.5 at 256, 1.15 at 4096),
    σ' = e^μ / (e^μ + 1/σ − 1), then 0."""
    mu = 0.5 + (1.15 - 0.5) * (image_tokens - 256) / (4096 - 256)
    s = base_sigmas(steps)
    return [*(math.exp(mu) / (math.exp(mu) + 1 / s - 1)), 0.0]


def initial_noise(seed: int, height: int, width: int) -> torch.Tensor:
    """The fp32 normal draw every FLUX pipeline starts from on the CPU: (1, 16, 2·⌊H/16⌋, 2·⌊W/16⌋)."""
    shape = (1, LATENT_CHANNELS, 2 * (height // 16), 2 * (width // 16))
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def folder_transformer_state(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted((Path(folder) / "transformer").glob("*.safetensors")) for k, v in load_file(f).items()}


def merge_lora_file(state: dict[str, torch.Tensor], lora: Path) -> dict[str, torch.Tensor]:
    """`state` + scale·B·A in float64 for every module of a diffusers-keyed LoRA file (scale = alpha / rank, 1 when
    the file has no alpha), read with safetensors alone."""
    out = {k: v.double() for k, v in state.items()}
    tensors = load_file(str(lora))
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        A = tensors[key].double()
        B = tensors[key.replace(".lora_A.", ".lora_B.")].double()
        alpha = tensors.get(key.replace(".lora_A.weight", ".alpha"))
        scale = 1.0 if alpha is None else alpha.item() / A.shape[0]
        out[f"{module}.weight"] += scale * B @ A
    return out


def reference_image(
    folder: Path,
    prompt: str,
    *,
    width: int,
    height: int,
    steps: int,
    seed: int,
    guidance: float,
    max_sequence_length: int,
    sigmas: list[float] | None = None,
    ntk: float = 1.0,
    proportional_attention: bool = False,
    transformer_state: dict[str, torch.Tensor] | None = None,
    vae_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, np.ndarray]:
    """The packed latents (1, H/16·W/16, 64) and the (H, W, 3) image in [0, 1], float64. `sigmas` default:
    FLUX.1-dev's dynamic schedule. `transformer_state`: the transformer's weights (default: the folder's), e.g.
    with adapters merged. `vae_dtype` float32 decodes 3.6x faster (large images) and adds the decoder's ≈ 3e-5 of
    rounding on this side too, still far inside `PIXEL_TOL`."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float64)
    model, vae = pipe.transformer, pipe.vae
    if transformer_state is not None:
        model.load_state_dict({k: v.double() for k, v in transformer_state.items()}, strict=True)
    rows, cols = height // 16, width // 16
    sigmas = dynamic_sigmas(steps, rows * cols) if sigmas is None else sigmas
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=max_sequence_length)
        model.pos_embed.theta = 10000.0 * ntk
        if proportional_attention:
            m = math.sqrt(math.log(embeds.shape[1] + rows * cols) / math.log(BASE_TOKENS))
            norms = [p for n, p in model.named_parameters() if n.endswith(("norm_q.weight", "norm_added_q.weight"))]
            assert len(norms) == 2 * model.config.num_layers + model.config.num_single_layers  # every query norm
            for p in norms:
                p.mul_(m)
        x = pack(initial_noise(seed, height, width).double())
        ids, txt_ids = image_ids(rows, cols), torch.zeros(embeds.shape[1], 3, dtype=torch.float64)
        g = torch.tensor([guidance], dtype=torch.float64) if model.config.guidance_embeds else None
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = model(
                hidden_states=x,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                timestep=torch.tensor([s], dtype=torch.float64),
                img_ids=ids,
                txt_ids=txt_ids,
                guidance=g,
                return_dict=False,
            )[0]
            x = x + (s_next - s) * v
        latents = unpack(x, 2 * rows, 2 * cols) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.to(vae_dtype).decode(latents.to(vae_dtype)).sample.double()
    return x, (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
