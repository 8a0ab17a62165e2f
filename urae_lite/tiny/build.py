"""The tiny FLUX.1 pipeline folder: every component in diffusers layout, deterministic from a seed, reused when
complete, built atomically, and cached for ``--model tiny``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..cache_dir import cache_root
from ..console import library_bars_off
from ..flux_configs import check_variant, flux_scheduler_config
from .configs import CLIP_HIDDEN, CLIP_MAX_POSITIONS, T5_D_MODEL, tiny_transformer_config, tiny_vae_config
from .folders import atomic_folder, write_json
from .tokenizers import write_clip_tokenizer, write_t5_tokenizer
from .weights import WEIGHTS_NAME

#: Bump when the tiny model's contents change, so cached folders are rebuilt instead of reused.
FORMAT_VERSION = 2
#: Written last into a tiny folder; its presence (with matching fields) means the folder is complete.
MARKER_NAME = "urae_tiny.json"

_SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _round_up(value: int, multiple: int) -> int:
    """Embedding tables are padded like the real models' (T5: 32100 tokens, 32128 rows)."""
    return -(-value // multiple) * multiple


def _write_text_encoders(root: Path, clip_vocab: int, t5_vocab: int) -> None:
    """Tiny CLIP-L-like and T5-v1.1-like encoders, default-initialised, saved in fp32."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_config = CLIPTextConfig(
        vocab_size=clip_vocab,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=64,
        projection_dim=CLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_POSITIONS,
        hidden_act="quick_gelu",
        bos_token_id=clip_vocab - 2,
        eos_token_id=clip_vocab - 1,
        pad_token_id=clip_vocab - 1,
    )
    with library_bars_off():
        CLIPTextModel(clip_config).save_pretrained(root / "text_encoder")

    t5_config = T5Config(
        vocab_size=_round_up(t5_vocab, 64),
        d_model=T5_D_MODEL,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    with library_bars_off():
        T5EncoderModel(t5_config).save_pretrained(root / "text_encoder_2")


def _write_transformer(root: Path, variant: str) -> None:
    """The tiny transformer in bf16 (FLUX's checkpoint dtype), default init: output layers are not zero.

    Written by hand (config + one safetensors file, as diffusers would) because ``model.to(bfloat16)``
    before ``save_pretrained`` makes diffusers warn about casting.
    """
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    model = FluxTransformer2DModel(**tiny_transformer_config(variant))
    folder = root / "transformer"
    model.save_config(folder)
    weights = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def _write_vae(root: Path) -> None:
    """The tiny VAE in fp32."""
    from diffusers import AutoencoderKL

    AutoencoderKL(**tiny_vae_config()).save_pretrained(root / "vae", safe_serialization=True)


def _write_scheduler(root: Path, variant: str) -> None:
    """The FLUX.1 scheduler config for the variant (through diffusers, so the file format is its own)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(**flux_scheduler_config(variant)).save_pretrained(root / "scheduler")


def _model_index() -> dict:
    """model_index.json exactly as in the official FLUX.1 repositories (same classes per component)."""
    import diffusers

    return {
        "_class_name": "FluxPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _marker(seed: int, variant: str) -> dict:
    """What identifies a tiny folder's contents; a folder is reused only if its marker equals this."""
    return {"kind": "urae_lite tiny FLUX.1", "format": FORMAT_VERSION, "seed": seed, "variant": variant}


def _is_complete(folder: Path, seed: int, variant: str) -> bool:
    """True if ``folder`` is a finished tiny build of this seed/variant (the marker is written last)."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker == _marker(seed, variant)
        and (folder / "model_index.json").is_file()
        and all((folder / sub).is_dir() for sub in _SUBFOLDERS)
    )


def _write_tiny_flux(root: Path, seed: int, variant: str) -> None:
    """Write every component into ``root``. Weights come from a private RNG state seeded with ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _write_transformer(root, variant)
        _write_vae(root)
        clip_vocab = write_clip_tokenizer(root / "tokenizer")
        t5_vocab = write_t5_tokenizer(root / "tokenizer_2")
        _write_text_encoders(root, clip_vocab, t5_vocab)
    _write_scheduler(root, variant)
    write_json(root / "model_index.json", _model_index())
    write_json(root / MARKER_NAME, _marker(seed, variant))


def build_tiny_flux(path: str | os.PathLike, seed: int = 0, variant: str = "dev", overwrite: bool = False) -> Path:
    """Write (or reuse) a complete tiny FLUX.1 folder in diffusers layout, deterministic from ``seed``.

    ``FluxPipeline.from_pretrained(path)`` loads it like the real model. An existing complete folder with
    the same seed/variant/format is reused unless ``overwrite``; anything else at ``path`` is replaced.
    The build happens beside the target and is renamed into place, so concurrent or interrupted builds are safe.
    """
    check_variant(variant)
    target = Path(path)
    if not overwrite and _is_complete(target, seed, variant):
        return target
    try:
        with atomic_folder(target) as staging:
            _write_tiny_flux(staging, seed, variant)
    except OSError:
        # Another process may have renamed its identical build into place first; that one is as good.
        if not _is_complete(target, seed, variant):
            raise
    return target


def tiny_flux_path(variant: str = "dev", seed: int = 0) -> Path:
    """The cached tiny FLUX.1 folder that ``--model tiny`` resolves to, built on first use."""
    check_variant(variant)
    folder = cache_root() / f"tiny-flux1-{variant}-seed{seed}-v{FORMAT_VERSION}"
    return build_tiny_flux(folder, seed=seed, variant=variant)
