"""Coarse-to-fine (`--refine-from`): the SDEdit pipeline the paper pairs URAE with (Fig. 5, Table 1).

As the paper describes those pipelines, the *base* model makes a low-resolution guide image (adapters off, its
native settings: no NTK, no proportional attention, its own scheduler), the image is upscaled in pixel space
(bicubic) and goes through an image-to-image pass at the target size *with* the adapters and URAE's settings:
VAE-encode, re-noise to `strength` (the fraction of the step schedule that is run; 0.6 = diffusers' img2img
default), denoise. The encode uses diffusers' tiled VAE encoder above its tile size: the latents are re-noised
anyway, so its blending is harmless, and an untiled 4096² encode would need ~20 GiB.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image
from torch import nn

from .adapted_linear import AdaptedLinear
from .presets import SIZE_MULTIPLE


def coarse_size(width: int, height: int, side: int) -> tuple[int, int]:
    """The target's aspect ratio at about side² pixels, both sides multiples of 16 (1024 -> 1024² for squares)."""
    scale = side / math.sqrt(width * height)
    return tuple(max(SIZE_MULTIPLE, round(v * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE) for v in (width, height))


def upscale(image: Image.Image, width: int, height: int) -> Image.Image:
    return image.resize((width, height), Image.BICUBIC)


@contextmanager
def adapters_disabled(transformer: nn.Module) -> Iterator[None]:
    """Run the plain base: every AdaptedLinear's slices are set aside (not copied, not moved) and put back."""
    saved = [(layer, layer.slices) for layer in transformer.modules() if isinstance(layer, AdaptedLinear)]
    try:
        for layer, _ in saved:
            layer.slices = nn.ModuleDict()
        yield
    finally:
        for layer, slices in saved:
            layer.slices = slices


@contextmanager
def tiled_encode(vae: nn.Module) -> Iterator[None]:
    """diffusers' tiled VAE *encode* for the img2img pass only (decoding stays with our exact tiled decode)."""
    before = vae.use_tiling
    vae.use_tiling = True
    try:
        yield
    finally:
        vae.use_tiling = before
