"""Device memory of a FLUX-style VAE decode, plain or exact strip-tiled (urae_lite/vae_tiling.py), and the fit
checks `--vae-tiling auto` and the tiled decode's storage choice rest on.

The byte counts are the tensors alive at each moment, read from diffusers' Decoder and from vae_tiling.py and
checked against a live-tensor count of the real code at full FLUX size (urae_lite/measure/); they leave out what no
tensor count sees: convolution workspaces (cuDNN's, the CPU im2col buffer) and allocator fragmentation. The fit
checks therefore ask for HEADROOM times the counted bytes. A runtime module with no urae_lite imports: vae_tiling
and the memory settings read it, and so does the planner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

#: `auto` tiles only when a plain decode would not fit; the one vocabulary of --vae-tiling, presets and the cache
VAE_TILING_MODES: tuple[str, ...] = ("auto", "on", "off")
# Counted bytes x HEADROOM must fit before a plain decode is chosen, or the tiled decode's full-size maps are kept
# on the accelerator: room for convolution workspaces and fragmentation (a plain 4K decode is ~24 GiB of tensors).
HEADROOM = 1.25
# Attention at latent resolution, whole (diffusers Attention, AttnProcessor2_0, flash / memory-efficient SDPA: no
# T x T matrix): its input, the GroupNorm output (held as `encoder_hidden_states` to the end), q, k, v, SDPA's
# output and to_out's output (then the transposed copy, the residual sum and the rescale, one at a time).
ATTENTION_TENSORS = 7
# A tiled strip conv computes rows [a-1, b+1) of its input, whose upsampler computed rows [a-2, b+2).
STRIP_HALO_ROWS = 4


def _config(vae_config_or_vae: Any) -> Mapping[str, Any]:
    cfg = getattr(vae_config_or_vae, "config", vae_config_or_vae)
    if isinstance(cfg, Mapping):
        return cfg
    return vars(cfg)


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_untiled_decode_bytes(
    vae_config_or_vae: Any, height: int, width: int, dtype: torch.dtype = torch.bfloat16, batch: int = 1
) -> int:
    """Peak activation bytes of a plain ``vae.decode`` for a ``height`` x ``width`` image.

    It models diffusers' forward, where norms, activations, the residual add and the ``/ output_scale_factor``
    are out of place, and the caller (Decoder.forward) keeps each up block's input alive while the block runs.
    With N = batch x pixels at a level, per layer the largest set of tensors alive at once is:

    * resnet block C_in -> C_out: ``held + max(3 C_in, 2 C_in + C_out, C_in + (3 + s) C_out) * N``, where
      ``s`` = 1 with a 1x1 shortcut conv and ``held`` is the up block's input (C_blk N) for all but the block's
      first resnet (input, norm, act | input, act, conv1 | input, shortcut, conv2, sum, sum / scale);
    * upsampler (C channels, N at the low resolution): ``(C_blk + C + 4 C + 4 C) * N`` (held block input,
      input, nearest-upsampled, conv output);
    * mid attention, T = batch x latent pixels: ``(1 + ATTENTION_TENSORS) C T`` (the held conv_in output and
      the attention's own tensors);
    * conv_in and the output head are never the peak but are included (``(C_lat + C) T``, ``2 C0 N``).

    The estimate is the maximum over layers times the element size. Weights, convolution workspaces and
    allocator fragmentation are not included (`should_tile` asks for HEADROOM).
    """
    cfg = _config(vae_config_or_vae)
    boc = list(cfg["block_out_channels"])
    n_up = len(boc) - 1
    layers = int(cfg.get("layers_per_block", 1)) + 1  # the decoder builds layers_per_block + 1 resnets per up block
    latent_ch = int(cfg.get("latent_channels", 4))
    attention = bool(cfg.get("mid_block_add_attention", True))
    factor = 2**n_up
    lh, lw = math.ceil(height / factor), math.ceil(width / factor)

    def npix(level: int) -> int:
        return batch * (lh << level) * (lw << level)

    def resnet(c_in: int, c_out: int, held: int) -> int:
        sc = 1 if c_in != c_out else 0
        return held + max(3 * c_in, 2 * c_in + c_out, c_in + (3 + sc) * c_out)

    c = boc[-1]
    peak = (latent_ch + c) * npix(0)  # conv_in
    peak = max(peak, resnet(c, c, c) * npix(0))  # mid resnets (the conv_in output is held)
    if attention:
        peak = max(peak, (1 + ATTENTION_TENSORS) * c * npix(0))
    for i, c_out in enumerate(reversed(boc)):
        c_blk = c
        for j in range(layers):
            c_in = c_blk if j == 0 else c_out
            peak = max(peak, resnet(c_in, c_out, c_blk if j else 0) * npix(i))
        if i < n_up:
            peak = max(peak, (c_blk + 9 * c_out) * npix(i))
        c = c_out
    peak = max(peak, 2 * boc[0] * npix(n_up))
    return int(peak * _dtype_bytes(dtype))


def tiled_home_bytes(vae_config_or_vae: Any, lh: int, lw: int, dtype: torch.dtype, batch: int) -> int:
    """Peak bytes of the stored (home) feature maps of ``decode_exact_tiled`` for a latent of ``lh`` x ``lw``."""
    cfg = _config(vae_config_or_vae)
    boc = list(cfg["block_out_channels"])
    n_up = len(boc) - 1

    def npix(level: int) -> int:
        return batch * (lh << level) * (lw << level)

    c = boc[-1]
    peak = (int(cfg.get("latent_channels", 4)) + c) * npix(0)
    peak = max(peak, 2 * c * npix(0))  # attention input + output
    for i, c_out in enumerate(reversed(boc)):
        # first resnet: stored input of the level below (the upsampled map is recomputed) + its output
        peak = max(peak, c * npix(max(i - 1, 0)) + c_out * npix(i))
        c = c_out
    peak = max(peak, (boc[0] + int(cfg.get("out_channels", 3))) * npix(n_up))
    return int(peak * _dtype_bytes(dtype))


def tiled_working_bytes(
    vae_config_or_vae: Any, lh: int, lw: int, dtype: torch.dtype, batch: int, strip_rows: int
) -> int:
    """Peak bytes ``decode_exact_tiled`` keeps on its compute device besides the weights and the stored maps.

    The largest of: the mid-block attention, run whole at latent resolution (ATTENTION_TENSORS maps); a strip
    of the widest level (channels x width), with its halo rows, alive as the upsampler's cached output, the
    GroupNorm's fp32 copy and its normalised result; the output image, which is allocated on the compute device
    while the last strips run.
    """
    cfg = _config(vae_config_or_vae)
    boc = list(cfg["block_out_channels"])
    n_up = len(boc) - 1
    es = _dtype_bytes(dtype)
    rows = strip_rows + STRIP_HALO_ROWS
    strip_bytes = 2 * es + _dtype_bytes(torch.float32)  # per element: cached conv output, fp32 copy, normalised
    c, widest = boc[-1], 0
    for i, c_out in enumerate(reversed(boc)):  # level i: input of c channels (upsampled), output c_out, width lw << i
        widest = max(widest, max(c, c_out) * (lw << i))
        c = c_out
    attention = ATTENTION_TENSORS * boc[-1] * lh * lw * es
    strips = rows * widest * strip_bytes
    out_ch, full_h, full_w = int(cfg.get("out_channels", 3)), lh << n_up, lw << n_up
    image = out_ch * full_h * full_w * es + rows * boc[0] * full_w * strip_bytes
    return batch * max(attention, strips, image)


def should_tile(
    vae: Any, height: int, width: int, free_bytes: int, *, batch: int = 1, dtype: torch.dtype | None = None
) -> bool:
    """True when a plain decode of a ``height`` x ``width`` image would not fit in ``free_bytes`` with HEADROOM.

    ``--vae-tiling auto`` uses this. The exact tiled decode gives the same image, so when in doubt we tile.
    """
    if dtype is None:
        dtype = getattr(vae, "dtype", torch.bfloat16)
    return estimate_untiled_decode_bytes(vae, height, width, dtype, batch) * HEADROOM > free_bytes


def tiled_home_fits(
    vae: Any, lh: int, lw: int, dtype: torch.dtype, batch: int, strip_rows: int, free_bytes: int
) -> bool:
    """True when the tiled decode's stored maps and its working set fit in ``free_bytes`` with HEADROOM."""
    need = tiled_home_bytes(vae, lh, lw, dtype, batch) + tiled_working_bytes(vae, lh, lw, dtype, batch, strip_rows)
    return need * HEADROOM <= free_bytes
