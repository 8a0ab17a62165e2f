"""Validation images on fixed prompts during training, with the settings being trained (ntk, attention).

Prompts are embedded once, before the transformer is on the device (T5 never shares it), and kept in the
output folder so a resumed run does not need T5 again. The sampler is FLUX's Euler flow sampler with the static
time shift of urae_lite/timeshift.py: σ_i → σ_{i+1}, x += (σ_{i+1} − σ_i)·v, guidance input 3.5 by default.
It is its own loop, not generation's FluxPipeline + scheduler: it steps the bare training transformer (no pipeline,
no text encoders on the device), and keeps σ in float64 and the latents in fp32 between steps, where the scheduler
rounds σ to float32 (up to 1e-7 apart) and casts the latents to the model's dtype after each step.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from torch import nn

from ..safetensors_io import atomic_save_file, atomic_write_bytes, load_file_checked
from ..timeshift import shifted_sigmas
from .config import TrainConfig
from .encoders import encode_prompts, free_device_memory, load_vae
from .flow import latent_image_ids, pack_latents, unpack_latents
from .samples import vae_factors

LATENT_CHANNELS = 16


def _prompts_key(prompts: list[str], max_sequence_length: int) -> str:
    return hashlib.sha256(repr((prompts, max_sequence_length)).encode()).hexdigest()[:16]


def validation_embeddings(
    cfg: TrainConfig, root: Path, device: torch.device, max_sequence_length: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(t5, pooled)] per validation prompt, from `output_dir/validation/prompts.safetensors` when it matches."""
    prompts = cfg.validation.prompts
    path = Path(cfg.output_dir) / "validation" / "prompts.safetensors"
    key = _prompts_key(prompts, max_sequence_length)
    if path.is_file():
        tensors, meta = load_file_checked(path)
        if meta.get("prompts") == key:
            return [(tensors[f"t5.{i}"], tensors[f"pooled.{i}"]) for i in range(len(prompts))]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    embeds = encode_prompts(root, prompts, device, dtype, max_sequence_length, cfg.component_files())
    tensors = {f"t5.{i}": t5.to(torch.bfloat16) for i, (t5, _) in enumerate(embeds)}
    tensors |= {f"pooled.{i}": p.to(torch.bfloat16) for i, (_, p) in enumerate(embeds)}
    atomic_save_file(tensors, path, {"prompts": key})
    return [(t.to(torch.bfloat16), p.to(torch.bfloat16)) for t, p in embeds]


@torch.no_grad()
def sample_latents(
    model: nn.Module,
    t5: torch.Tensor,
    pooled: torch.Tensor,
    height: int,
    width: int,
    steps: int,
    guidance: float,
    shift: float,
    seed: int,
    device: torch.device,
    autocast: bool,
) -> torch.Tensor:
    """Denoised packed-latent image (1, 16, H/8, W/8) in the transformer's latent space."""
    h, w = height // 8, width // 8
    noise = torch.randn(1, LATENT_CHANNELS, h, w, generator=torch.Generator().manual_seed(seed))
    x = pack_latents(noise).to(device)
    dtype = model.x_embedder.weight.dtype
    img_ids, txt_ids = latent_image_ids(h, w).to(device), torch.zeros(t5.shape[0], 3, device=device)
    g = torch.full((1,), guidance, device=device) if model.config.guidance_embeds else None
    sigmas = shifted_sigmas(steps, shift)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            v = model(
                hidden_states=x.to(dtype),
                encoder_hidden_states=t5[None].to(device, dtype),
                pooled_projections=pooled[None].to(device, dtype),
                timestep=torch.full((1,), s, device=device),
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=g,
                return_dict=False,
            )[0]
        x = x + (s_next - s) * v.float()
    return unpack_latents(x, h, w)


def run_validation(
    model: nn.Module,
    cfg: TrainConfig,
    root: Path,
    embeds: list[tuple[torch.Tensor, torch.Tensor]],
    step: int,
    device: torch.device,
) -> list[Path]:
    """Generate one image per prompt; decode with the exact tiled VAE decode when a plain one would not fit."""
    from PIL import Image

    from ..vae_tiling import decode

    v = cfg.validation
    size = v.size or cfg.data.resolution  # checked by the recipe (train.config.check_config)
    shift_factor, scaling_factor = vae_factors(root)
    latents = [
        sample_latents(
            model,
            t5,
            pooled,
            size,
            size,
            v.steps,
            v.guidance,
            v.shift,
            v.seed + i,
            device,
            cfg.training.precision == "bf16",
        )
        for i, (t5, pooled) in enumerate(embeds)
    ]
    vae = load_vae(root, torch.bfloat16 if device.type == "cuda" else torch.float32, cfg.component_files()).to(device)
    folder = Path(cfg.output_dir) / "validation" / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, z in enumerate(latents):
        image = decode(vae, (z / scaling_factor + shift_factor).to(device, vae.dtype), mode="auto")
        pixels = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu()
        png = io.BytesIO()
        Image.fromarray(pixels.numpy()).save(png, format="PNG")
        paths.append(atomic_write_bytes(folder / f"{i:02d}.png", png.getvalue()))  # the sheet never reads half a file
    del vae
    free_device_memory()
    return paths
