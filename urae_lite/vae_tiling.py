"""Exact strip-tiled VAE decode, so a 4096² FLUX image decodes in a few GiB of accelerator memory without seams.

Why not diffusers' ``vae.enable_tiling()``: it decodes overlapping tiles *independently* and blends them. Every
tile then normalises with its own GroupNorm statistics and sees zero padding at its borders, so the result is
not the image the VAE would produce; the blend hides most of the seam but not all of it.

What this module does instead: it walks the decoder layer by layer over the *whole* feature map and streams it
through the compute device in horizontal strips of rows:

* a 3x3 stride-1 convolution of output rows ``[a, b)`` only needs input rows ``[a-1, b+1)`` (a one-row halo
  each side; rows outside the image are the convolution's zero padding), so strips give the same numbers;
* GroupNorm needs statistics over the whole map: they are accumulated over all strips first (mean and M2 per
  (batch, group), combined in float64 with Chan's formula), then every strip is normalised with the global
  statistics, the affine and the activation;
* nearest 2x upsampling commutes with row slicing, so the upsampler's conv is a strip conv of an upsampled strip;
* the mid-block self-attention runs at latent resolution (1/8 of the image side) and is executed whole, by the
  module itself, on the compute device.

Memory: only block outputs are stored ("home" tensors, on the CPU or on the accelerator when they fit). A resnet
block's inner conv and the upsampler's conv are recomputed from the stored input when needed instead of being
stored (one statistics pass, one output pass), and a resnet whose input and output have the same shape writes
its output over its input (the few halo rows still needed are saved first). At 4096² in bf16 the largest home
set is 6 GiB (a 256-channel 2048² map feeding a 128-channel 4096² output) against roughly 24 GiB for a plain
``vae.decode``; the accelerator holds the weights, a few strips and the latent-resolution attention. The byte
counts of both decodes, and the fit checks `auto` uses, are urae_lite/vae_memory.py.

The result equals ``vae.decode(latents).sample`` up to floating-point summation order (convolution algorithms
picked for strip shapes, GroupNorm statistics summed per strip): ~1e-6 in fp32, bf16 rounding in bf16.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .vae_memory import VAE_TILING_MODES, should_tile, tiled_home_fits
from .vae_strips import Cached, Conv3x3, Home, Source, StripContext, materialize, resnet, run_attention, stats_of

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import AutoencoderKL

__all__ = ["VAE_TILING_MODES", "decode", "decode_exact_tiled", "default_home_device"]


_ELEMENTWISE_ACTS = (nn.SiLU, nn.Mish, nn.GELU, nn.ReLU)


# --------------------------------------------------------------------------------------------------------------
# Config access (the memory model of both decodes is urae_lite/vae_memory.py)
# --------------------------------------------------------------------------------------------------------------


def _config(vae_config_or_vae: Any) -> Mapping[str, Any]:
    cfg = getattr(vae_config_or_vae, "config", vae_config_or_vae)
    if isinstance(cfg, Mapping):
        return cfg
    return vars(cfg)


# --------------------------------------------------------------------------------------------------------------
# Checks: refuse what we do not reproduce exactly
# --------------------------------------------------------------------------------------------------------------


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"exact tiled VAE decode does not support {what}; use --vae-tiling off (plain decode) or diffusers' "
        "vae.enable_tiling() for this VAE"
    )


def _check_conv(conv: Any, k: int, name: str) -> None:
    if type(conv) is not nn.Conv2d:
        raise _unsupported(f"{name} of type {type(conv).__name__} (only plain nn.Conv2d)")
    ok = (
        conv.kernel_size == (k, k)
        and conv.stride == (1, 1)
        and conv.padding == (k // 2, k // 2)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )
    if not ok:
        raise _unsupported(
            f"{name} with kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}, "
            f"dilation {conv.dilation}, groups {conv.groups}, padding_mode {conv.padding_mode!r}"
        )


def _check_act(act: Any, name: str) -> None:
    if type(act) not in _ELEMENTWISE_ACTS:
        raise _unsupported(f"{name} activation {type(act).__name__}")


def _check_resnet(res: Any, name: str) -> None:
    from diffusers.models.resnet import ResnetBlock2D

    if type(res) is not ResnetBlock2D:
        raise _unsupported(f"{name} of type {type(res).__name__} (only ResnetBlock2D, i.e. norm_type='group')")
    if res.upsample is not None or res.downsample is not None:
        raise _unsupported(f"{name} with up/down sampling inside the resnet")
    if res.time_emb_proj is not None or res.time_embedding_norm == "scale_shift":
        raise _unsupported(f"{name} with a time embedding ({res.time_embedding_norm})")
    for norm_name in ("norm1", "norm2"):
        if type(getattr(res, norm_name)) is not nn.GroupNorm:
            raise _unsupported(f"{name}.{norm_name} of type {type(getattr(res, norm_name)).__name__}")
    _check_act(res.nonlinearity, name)
    _check_conv(res.conv1, 3, f"{name}.conv1")
    _check_conv(res.conv2, 3, f"{name}.conv2")
    if res.conv_shortcut is not None:
        _check_conv(res.conv_shortcut, 1, f"{name}.conv_shortcut")
    if res.training and res.dropout.p > 0:
        raise _unsupported(f"{name} in training mode with dropout {res.dropout.p}")


def _check_supported(vae: Any) -> None:
    from diffusers.models.autoencoders.vae import Decoder
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, UpDecoderBlock2D
    from diffusers.models.upsampling import Upsample2D

    dec = getattr(vae, "decoder", None)
    if type(dec) is not Decoder:
        raise _unsupported(f"a decoder of type {type(dec).__name__} (only diffusers' AutoencoderKL Decoder)")
    if any(p.is_meta for p in vae.parameters()):
        raise _unsupported("weights on the meta device (sequential CPU offload); use model offload instead")
    pqc = getattr(vae, "post_quant_conv", None)
    if pqc is not None:
        _check_conv(pqc, 1, "post_quant_conv")
    _check_conv(dec.conv_in, 3, "decoder.conv_in")
    _check_conv(dec.conv_out, 3, "decoder.conv_out")
    if type(dec.conv_norm_out) is not nn.GroupNorm:
        raise _unsupported(f"decoder.conv_norm_out of type {type(dec.conv_norm_out).__name__} (spatial norm)")
    _check_act(dec.conv_act, "decoder.conv_act")
    if type(dec.mid_block) is not UNetMidBlock2D:
        raise _unsupported(f"a mid block of type {type(dec.mid_block).__name__}")
    for i, res in enumerate(dec.mid_block.resnets):
        _check_resnet(res, f"mid_block.resnets[{i}]")
    for i, ub in enumerate(dec.up_blocks):
        if type(ub) is not UpDecoderBlock2D:
            raise _unsupported(f"up_blocks[{i}] of type {type(ub).__name__} (only UpDecoderBlock2D)")
        for j, res in enumerate(ub.resnets):
            _check_resnet(res, f"up_blocks[{i}].resnets[{j}]")
        for up in ub.upsamplers or []:
            conv = getattr(up, "conv", None) if up.name == "conv" else getattr(up, "Conv2d_0", None)
            if (
                type(up) is not Upsample2D
                or not up.use_conv
                or up.use_conv_transpose
                or not up.interpolate
                or up.norm is not None
                or conv is None
            ):
                raise _unsupported(f"the upsampler of up_blocks[{i}] (only nearest 2x + 3x3 conv)")
            _check_conv(conv, 3, f"up_blocks[{i}].upsampler.conv")


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------


def _default_compute_device(vae: Any) -> torch.device:
    hook = getattr(vae, "_hf_hook", None)  # accelerate model offload: weights on CPU, runs on the GPU
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    return next(vae.decoder.parameters()).device


def _free_device_bytes(device: torch.device) -> int | None:
    """Bytes the decode may use on ``device`` (free + cached by torch), or None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            import psutil
        except ImportError:  # pragma: no cover - psutil is a dependency
            return None
        return int(psutil.virtual_memory().available)
    return None


def default_home_device(
    vae: Any, compute: torch.device, latents: torch.Tensor, dtype: torch.dtype, strip_rows: int
) -> torch.device:
    """Keep the stored maps on the accelerator when they and the working set fit with room to spare, else CPU."""
    if compute.type == "cpu":
        return compute
    free = _free_device_bytes(compute)
    if free is None:
        return torch.device("cpu")
    b, _, lh, lw = latents.shape
    return compute if tiled_home_fits(vae, lh, lw, dtype, b, strip_rows, free) else torch.device("cpu")


@torch.no_grad()
def decode_exact_tiled(
    vae: AutoencoderKL,
    latents: torch.Tensor,
    strip_rows: int = 64,
    compute_device: torch.device | str | None = None,
    home_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Decode ``latents`` exactly like ``vae.decode(latents).sample``, in horizontal strips, to bound memory.

    ``latents`` are what the pipeline passes to ``vae.decode`` (already divided by scaling_factor and shifted).
    ``strip_rows`` is the number of rows computed per step *at the resolution of the map being produced* (the
    same count at every level, so at 4096² a strip of 64 rows is 64 x 4096 pixels, and at the latent level it is
    64 x 512); it trades speed for memory and never changes the result. ``compute_device`` defaults to where
    the VAE runs (its accelerate execution device, else its weights' device); ``home_device``, where the
    full-size maps are stored, defaults to the compute device when they fit there and to the CPU otherwise.
    The computation runs in the VAE's dtype; the result is on the compute device.
    """
    if strip_rows < 1:
        raise ValueError(f"strip_rows must be >= 1, got {strip_rows}")
    if latents.ndim != 4:
        raise ValueError(f"latents must be (batch, channels, height, width), got shape {tuple(latents.shape)}")
    _check_supported(vae)
    dec = vae.decoder
    dtype = next(dec.parameters()).dtype
    compute = torch.device(compute_device) if compute_device is not None else _default_compute_device(vae)
    home = (
        torch.device(home_device)
        if home_device is not None
        else default_home_device(vae, compute, latents, dtype, strip_rows)
    )
    ctx = StripContext(compute, home, dtype, strip_rows)
    groups = dec.conv_norm_out.num_groups

    z = latents.to(device=compute, dtype=dtype)
    pqc = getattr(vae, "post_quant_conv", None)
    if pqc is not None:
        z = F.conv2d(z, ctx.w(pqc.weight), ctx.w(pqc.bias))
    x: Source = Home(z.to(home), ctx, owned=False)
    del z

    x = materialize(Conv3x3(x, dec.conv_in, ctx), ctx, groups)
    mid = dec.mid_block
    x = resnet(x, mid.resnets[0], ctx, groups)
    for attn, res in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            assert isinstance(x, Home)
            x = run_attention(x, attn, ctx, groups)
        x = resnet(x, res, ctx, groups)
    for ub in dec.up_blocks:
        for res in ub.resnets:
            x = resnet(x, res, ctx, groups)
        for up in ub.upsamplers or []:
            conv = up.conv if up.name == "conv" else up.Conv2d_0
            x = Cached(Conv3x3(x, conv, ctx, upsample=True))  # recomputed by its consumer, never stored

    st = stats_of(x, dec.conv_norm_out.num_groups, ctx)
    head = Conv3x3(x, dec.conv_out, ctx, pre=(dec.conv_norm_out, st, dec.conv_act))
    return materialize(head, ctx, None, device=compute).t


@torch.no_grad()
def decode(
    vae: AutoencoderKL,
    latents: torch.Tensor,
    mode: str = "auto",
    free_bytes: int | None = None,
    strip_rows: int = 64,
    *,
    home_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Decode latents to images according to ``--vae-tiling``: "on" (exact tiled), "off" (plain) or "auto".

    "auto" tiles when the plain decode would not fit in ``free_bytes`` (default: what the compute device has
    free now; unknown counts as not fitting, since the tiled result is the same image). "off" is exactly
    ``vae.decode`` (including diffusers' blended tiling if the caller enabled it). Inference only (no grad).
    ``strip_rows`` and ``home_device`` are passed to ``decode_exact_tiled``.
    """
    if mode not in VAE_TILING_MODES:
        raise ValueError(f"unknown VAE tiling mode {mode!r}; valid modes: {', '.join(VAE_TILING_MODES)}")
    if mode == "auto":
        if free_bytes is None:
            free_bytes = _free_device_bytes(_default_compute_device(vae))
        n_up = len(_config(vae)["block_out_channels"]) - 1
        b, _, lh, lw = latents.shape
        tile = free_bytes is None or should_tile(vae, lh << n_up, lw << n_up, free_bytes, batch=b)
        mode = "on" if tile else "off"
    if mode == "on":
        return decode_exact_tiled(vae, latents, strip_rows=strip_rows, home_device=home_device)
    return vae.decode(latents, return_dict=False)[0]
