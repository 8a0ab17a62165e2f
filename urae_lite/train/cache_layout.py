"""What one cache item is on disk: its files, tensor names, shapes and dtype.

Shared by the cache writer (which checks every tensor it writes against these shapes) and by the size estimate of
`urae-lite cache --check`, so the estimate cannot drift from what is written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import Bucket

CACHE_DTYPE = torch.bfloat16
LATENT_TENSORS = ("mean", "std")  # the VAE posterior's moments, each (C, H/8, W/8)
# Upper bound of a cache file's bytes beyond its tensor data: the 8-byte header length, the JSON header and its
# padding to 8 bytes. The JSON holds two tensor entries (name, dtype, a shape of at most 3 ints, two byte offsets:
# under 110 characters each) and the metadata (image size:mtime stamp and bucket sides, or a 16-hex caption hash:
# under 120 characters), so it stays below 8 + 2·110 + 120 + braces + 7 < 512 bytes.
FILE_OVERHEAD_BOUND = 512
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # T5 tokens: FLUX.1-dev's (schnell uses 256, passed explicitly)


@dataclass(frozen=True)
class CacheDims:
    """The model sizes the cache's shapes depend on; the defaults are FLUX.1's (dev and schnell share them)."""

    latent_channels: int = 16
    vae_scale: int = 8  # pixels per latent side
    t5_dim: int = 4096
    pooled_dim: int = 768  # CLIP-L's pooled output
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH

    @classmethod
    def of_model(cls, root: Path, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> CacheDims:
        """From a pipeline folder's configs (no weights are read)."""

        def config(sub: str) -> dict:
            return json.loads((Path(root) / sub / "config.json").read_text())

        vae = config("vae")
        return cls(
            latent_channels=int(vae["latent_channels"]),
            vae_scale=2 ** (len(vae["block_out_channels"]) - 1),
            t5_dim=int(config("text_encoder_2")["d_model"]),
            pooled_dim=int(config("text_encoder")["hidden_size"]),
            max_sequence_length=max_sequence_length,
        )

    def latent_shape(self, bucket: Bucket) -> tuple[int, int, int]:
        return (self.latent_channels, bucket.height // self.vae_scale, bucket.width // self.vae_scale)

    def text_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"t5": (self.max_sequence_length, self.t5_dim), "pooled": (self.pooled_dim,)}

    def latent_bytes(self, bucket: Bucket) -> int:
        """Tensor bytes of one image's latent file."""
        return len(LATENT_TENSORS) * math.prod(self.latent_shape(bucket)) * CACHE_DTYPE.itemsize

    def text_bytes(self) -> int:
        """Tensor bytes of one caption's (or shuffled variant's) text file."""
        return sum(math.prod(s) for s in self.text_shapes().values()) * CACHE_DTYPE.itemsize


def check_shapes(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """The writer's guard: a tensor of another shape than the layout says means the model's configs lie."""
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        raise ValueError(f"{what}: the encoder gave {got}, the cache layout expects {expected}")


def latent_path(cache: Path, name: str) -> Path:
    return cache / "latents" / f"{name}.safetensors"


def text_path(cache: Path, name: str, key: str) -> Path:
    """`key`: a caption column, or a shuffled variant's `column~v` (urae_lite/train/captions.py)."""
    return cache / "text" / f"{name}.{key}.safetensors"
