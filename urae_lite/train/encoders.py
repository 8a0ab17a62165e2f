"""FLUX's text encoders and VAE (the classes the folder declares), loaded one at a time: T5-XXL alone is
9.4 GiB in bf16, so caching and validation load an encoder, run it over everything, and free it before the next
one (or the transformer) comes."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..component_files import ComponentFiles, load_model
from ..text_encoders import load_component

CLIP_MAX_LENGTH = 77


def free_device_memory() -> None:
    """Return a dropped model's memory to the device before the next model loads (no-op without CUDA)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


@torch.no_grad()
def clip_pooled(
    root: Path,
    texts: Sequence[str],
    device,
    dtype: torch.dtype,
    batch_size: int = 16,
    files: ComponentFiles | None = None,
) -> torch.Tensor:
    """(n, 768) pooled CLIP-L embeddings, as FluxPipeline computes them (77 tokens, padded, truncated)."""
    tokenizer = load_component(root, "tokenizer")
    model = load_model(root, "text_encoder", files, dtype).to(device)
    out = []
    for i in range(0, len(texts), batch_size):
        ids = tokenizer(
            list(texts[i : i + batch_size]),
            padding="max_length",
            max_length=CLIP_MAX_LENGTH,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out.append(model(ids.to(device), output_hidden_states=False).pooler_output.float().cpu())
    del model
    free_device_memory()
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def iter_t5(
    root: Path,
    texts: Sequence[str],
    device,
    dtype: torch.dtype,
    max_sequence_length: int,
    batch_size: int = 4,
    files: ComponentFiles | None = None,
) -> Iterator[torch.Tensor]:
    """(max_sequence_length, 4096) T5 embeddings per text, yielded as computed so callers can stream them to disk."""
    tokenizer = load_component(root, "tokenizer_2")
    model = load_model(root, "text_encoder_2", files, dtype).to(device)
    try:
        for i in range(0, len(texts), batch_size):
            ids = tokenizer(
                list(texts[i : i + batch_size]),
                padding="max_length",
                max_length=max_sequence_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            yield from model(ids.to(device), output_hidden_states=False)[0].cpu()
    finally:  # also when the consumer stops early: the next model needs the device
        del model
        free_device_memory()


def encode_prompts(
    root: Path,
    texts: Sequence[str],
    device,
    dtype: torch.dtype,
    max_sequence_length: int,
    files: ComponentFiles | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(t5 (L, 4096), pooled (768,))] for a few prompts (validation); CLIP and T5 never share the device."""
    pooled = clip_pooled(root, texts, device, dtype, files=files)
    t5 = iter_t5(root, texts, device, dtype, max_sequence_length, files=files)
    return [(e, p) for e, p in zip(t5, pooled)]


def load_vae(root: Path, dtype: torch.dtype, files: ComponentFiles | None = None):
    """The folder's VAE, or the single file given for it (ComfyUI's ae.safetensors)."""
    if files is not None and files.vae is not None:
        return load_model(root, "vae", files, dtype)
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(root / "vae", dtype=dtype).eval()
