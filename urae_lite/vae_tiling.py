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
``vae.decode``; the accelerator holds the weights, a few strips and the latent-resolution attention.

The result equals ``vae.decode(latents).sample`` up to floating-point summation order (convolution algorithms
picked for strip shapes, GroupNorm statistics summed per strip): ~1e-6 in fp32, bf16 rounding in bf16.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import AutoencoderKL

__all__ = [
    "VAE_TILING_MODES",
    "decode",
    "decode_exact_tiled",
    "estimate_untiled_decode_bytes",
    "should_tile",
]

#: `auto` tiles only when a plain decode would not fit; the one vocabulary of --vae-tiling, presets and the cache
VAE_TILING_MODES: tuple[str, ...] = ("auto", "on", "off")

# The untiled estimate leaves out convolution workspaces and allocator fragmentation; `should_tile` asks for
# this much headroom on top of it before it trusts a plain decode to fit.
_UNTILED_HEADROOM = 1.25

_ELEMENTWISE_ACTS = (nn.SiLU, nn.Mish, nn.GELU, nn.ReLU)


# --------------------------------------------------------------------------------------------------------------
# Sizing
# --------------------------------------------------------------------------------------------------------------


def _config(vae_config_or_vae: Any) -> Mapping[str, Any]:
    cfg = getattr(vae_config_or_vae, "config", vae_config_or_vae)
    if isinstance(cfg, Mapping):
        return cfg
    return vars(cfg)


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_untiled_decode_bytes(
    vae_config_or_vae: Any,
    height: int,
    width: int,
    dtype: torch.dtype = torch.bfloat16,
    batch: int = 1,
) -> int:
    """Rough peak activation bytes of a plain ``vae.decode`` for a ``height`` x ``width`` image.

    Used by ``--vae-tiling auto`` to decide whether the untiled decode fits. It models diffusers' forward, where
    norms, activations, the residual add and the ``/ output_scale_factor`` are out of place, and the caller
    (Decoder.forward) keeps each up block's input alive while the block runs. With N = batch x pixels at a
    level, per layer the largest set of tensors alive at once is:

    * resnet block C_in -> C_out: ``held + max(3 C_in, 2 C_in + C_out, C_in + (3 + s) C_out) * N``, where
      ``s`` = 1 with a 1x1 shortcut conv and ``held`` is the up block's input (C_blk N) for all but the block's
      first resnet (input, norm, act | input, act, conv1 | input, shortcut, conv2, sum, sum / scale);
    * upsampler (C channels, N at the low resolution): ``(C_blk + C + 4 C + 4 C) * N`` (held block input,
      input, nearest-upsampled, conv output);
    * mid attention, T = batch x latent pixels: ``8 C T`` (held conv_in output, input, normed, q, k, v, two
      reshaped outputs; SDPA runs with a flash/memory-efficient kernel, so no T x T score matrix);
    * conv_in and the output head are never the peak but are included (``(C_lat + C) T``, ``2 C0 N``).

    The estimate is the maximum over layers times the element size. Weights, convolution workspaces (e.g. the
    CPU im2col buffer) and allocator fragmentation are not included; ``should_tile`` adds headroom for them.
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
        peak = max(peak, 8 * c * npix(0))
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


def _tiled_home_bytes(vae_config_or_vae: Any, lh: int, lw: int, dtype: torch.dtype, batch: int) -> int:
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


def should_tile(vae: Any, height: int, width: int, free_bytes: int, *, batch: int = 1,
                dtype: torch.dtype | None = None) -> bool:
    """True when a plain decode of a ``height`` x ``width`` image would not fit in ``free_bytes``.

    ``--vae-tiling auto`` uses this. The exact tiled decode gives the same image, so when in doubt we tile.
    """
    if dtype is None:
        dtype = getattr(vae, "dtype", torch.bfloat16)
    need = estimate_untiled_decode_bytes(vae, height, width, dtype, batch)
    return need * _UNTILED_HEADROOM > free_bytes


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
        raise _unsupported(f"{name} with kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}, "
                           f"dilation {conv.dilation}, groups {conv.groups}, padding_mode {conv.padding_mode!r}")


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
            if (type(up) is not Upsample2D or not up.use_conv or up.use_conv_transpose or not up.interpolate
                    or up.norm is not None or conv is None):
                raise _unsupported(f"the upsampler of up_blocks[{i}] (only nearest 2x + 3x3 conv)")
            _check_conv(conv, 3, f"up_blocks[{i}].upsampler.conv")


# --------------------------------------------------------------------------------------------------------------
# Row sources: each produces rows [a, b) of a feature map on the compute device
# --------------------------------------------------------------------------------------------------------------


class _Ctx:
    """Per-call settings and a cache of weights moved to the compute device and dtype."""

    def __init__(self, compute: torch.device, home: torch.device, dtype: torch.dtype, strip_rows: int) -> None:
        self.compute, self.home, self.dtype, self.strip_rows = compute, home, dtype, strip_rows
        self._w: dict[int, torch.Tensor] = {}

    def w(self, p: torch.Tensor | None) -> torch.Tensor | None:
        if p is None:
            return None
        t = self._w.get(id(p))
        if t is None:
            t = self._w[id(p)] = p.detach().to(device=self.compute, dtype=self.dtype)
        return t

    def alloc(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Every output buffer of the tiled decode (uninitialised: each row is written exactly once)."""
        return torch.empty(shape, dtype=self.dtype, device=device)


class _GroupStats:
    """Per-(batch, group) mean and sum of squared deviations, merged over strips in float64 (Chan et al.)."""

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self._final: dict[tuple[float, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, x: torch.Tensor) -> None:
        xs = x.float().reshape(x.shape[0], self.groups, -1)
        var, mean = torch.var_mean(xs, dim=-1, correction=0)
        nb = xs.shape[-1]
        mean, m2 = mean.double(), var.double() * nb
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = nb, mean, m2
            return
        tot = self.n + nb
        delta = mean - self.mean
        self.mean = self.mean + delta * (nb / tot)
        self.m2 = self.m2 + m2 + delta * delta * (self.n * nb / tot)
        self.n = tot

    def mean_rstd(self, eps: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 (batch, groups) mean and 1/sqrt(biased var + eps), as torch's GroupNorm uses them."""
        key = (eps, device)
        if key not in self._final:
            assert self.mean is not None and self.m2 is not None, "statistics of an empty map"
            rstd = torch.rsqrt(self.m2 / self.n + eps)
            self._final[key] = (self.mean.to(device, torch.float32), rstd.to(device, torch.float32))
        return self._final[key]


def _norm_act(x: torch.Tensor, gn: nn.GroupNorm, stats: _GroupStats, act: nn.Module | None, ctx: _Ctx) -> torch.Tensor:
    """GroupNorm with global statistics (+ affine) in fp32, rounded to the compute dtype, then the activation.

    Rounding before the activation mirrors diffusers, where norm and activation are separate modules.
    """
    per_group = x.shape[1] // gn.num_groups
    mean, rstd = stats.mean_rstd(gn.eps, x.device)
    scale = rstd.repeat_interleave(per_group, dim=1)
    mean = mean.repeat_interleave(per_group, dim=1)
    w, b = ctx.w(gn.weight), ctx.w(gn.bias)
    if w is not None:
        scale = scale * w.float()
    shift = -mean * scale
    if b is not None:
        shift = shift + b.float()
    # one float32 copy of the strip (never in place on ``x``: it may be a view of a stored map)
    y = x.to(torch.float32, copy=True).mul_(scale[:, :, None, None]).add_(shift[:, :, None, None]).to(ctx.dtype)
    return act(y) if act is not None else y


class _Source:
    height: int
    width: int
    channels: int

    def rows(self, a: int, b: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def span(self, a: int, b: int, target: _Home) -> tuple[int, int] | None:
        """Rows of ``target`` that producing rows [a, b) reads (None if it does not read ``target``)."""
        raise NotImplementedError  # pragma: no cover - interface

    def clear(self) -> None:
        """Drop per-pass caches."""


class _Home(_Source):
    """A stored feature map. ``saved`` holds original rows that an in-place writer already overwrote."""

    def __init__(self, t: torch.Tensor, ctx: _Ctx, owned: bool, stats: _GroupStats | None = None) -> None:
        self.t, self.ctx, self.owned, self.stats = t, ctx, owned, stats
        self.channels, self.height, self.width = t.shape[1], t.shape[2], t.shape[3]
        self.saved: tuple[int, torch.Tensor] | None = None

    def rows(self, a: int, b: int) -> torch.Tensor:
        if self.saved is not None:
            lo, s = self.saved
            hi = lo + s.shape[2]
            assert a >= lo, "in-place strip order violated"
            if a < hi:
                head = s[:, :, a - lo:min(b, hi) - lo]
                if b <= hi:
                    return head
                return torch.cat([head, self.t[:, :, hi:b].to(self.ctx.compute)], dim=2)
        return self.t[:, :, a:b].to(self.ctx.compute)

    def span(self, a: int, b: int, target: _Home) -> tuple[int, int] | None:
        return (a, b) if self is target else None


class _Conv3x3(_Source):
    """A 3x3 'same' conv of ``src`` rows, with optional GroupNorm+activation before it and nearest 2x upsampling."""

    def __init__(self, src: _Source, conv: nn.Conv2d, ctx: _Ctx,
                 pre: tuple[nn.GroupNorm, _GroupStats, nn.Module | None] | None = None, upsample: bool = False) -> None:
        self.src, self.conv, self.ctx, self.pre, self.upsample = src, conv, ctx, pre, upsample
        f = 2 if upsample else 1
        self.height, self.width, self.channels = src.height * f, src.width * f, conv.out_channels

    def _in_range(self, a: int, b: int) -> tuple[int, int, int, int]:
        lo, hi = max(a - 1, 0), min(b + 1, self.height)
        if self.upsample:
            return lo, hi, lo // 2, (hi - 1) // 2 + 1
        return lo, hi, lo, hi

    def rows(self, a: int, b: int) -> torch.Tensor:
        lo, hi, slo, shi = self._in_range(a, b)
        x = self.src.rows(slo, shi)
        if self.pre is not None:
            gn, stats, act = self.pre
            x = _norm_act(x, gn, stats, act, self.ctx)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")[:, :, lo - 2 * slo:hi - 2 * slo]
        top, bottom = lo - (a - 1), (b + 1) - hi  # image borders: the conv's own zero padding
        pad = (1, 1) if top and bottom else (0, 1)
        if top != bottom:
            x = F.pad(x, (0, 0, top, bottom))
        return F.conv2d(x, self.ctx.w(self.conv.weight), self.ctx.w(self.conv.bias), padding=pad)

    def span(self, a: int, b: int, target: _Home) -> tuple[int, int] | None:
        _, _, slo, shi = self._in_range(a, b)
        return self.src.span(slo, shi, target)

    def clear(self) -> None:
        self.src.clear()


class _Cached(_Source):
    """Remembers the last strip of a recomputed map, so a residual's shortcut reuses the rows its conv path made."""

    def __init__(self, inner: _Source) -> None:
        self.inner = inner
        self.height, self.width, self.channels = inner.height, inner.width, inner.channels
        self._last: tuple[int, int, torch.Tensor] | None = None

    def rows(self, a: int, b: int) -> torch.Tensor:
        if self._last is not None:
            la, lb, t = self._last
            if la <= a and b <= lb:
                return t[:, :, a - la:b - la]
        t = self.inner.rows(a, b)
        self._last = (a, b, t)
        return t

    def span(self, a: int, b: int, target: _Home) -> tuple[int, int] | None:
        return self.inner.span(a, b, target)

    def clear(self) -> None:
        self._last = None
        self.inner.clear()


class _Residual(_Source):
    """``(shortcut(x) + h) / output_scale_factor``, in that order, as ResnetBlock2D computes it."""

    def __init__(self, x: _Source, h: _Source, shortcut: nn.Conv2d | None, scale: float, ctx: _Ctx) -> None:
        self.x, self.h, self.shortcut, self.scale, self.ctx = x, h, shortcut, scale, ctx
        self.height, self.width, self.channels = h.height, h.width, h.channels

    def rows(self, a: int, b: int) -> torch.Tensor:
        h = self.h.rows(a, b)
        x = self.x.rows(a, b)
        if self.shortcut is not None:
            x = F.conv2d(x, self.ctx.w(self.shortcut.weight), self.ctx.w(self.shortcut.bias))
        return (x + h) / self.scale

    def span(self, a: int, b: int, target: _Home) -> tuple[int, int] | None:
        spans = [s for s in (self.x.span(a, b, target), self.h.span(a, b, target)) if s is not None]
        if not spans:
            return None
        return min(s[0] for s in spans), max(s[1] for s in spans)

    def clear(self) -> None:
        self.x.clear()
        self.h.clear()


def _strips(height: int, rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + rows, height)) for a in range(0, height, rows)]


def _stats_of(src: _Source, groups: int, ctx: _Ctx) -> _GroupStats:
    """GroupNorm statistics of a whole map: reused if recorded when it was stored, else one pass over strips."""
    if isinstance(src, _Home) and src.stats is not None and src.stats.groups == groups:
        return src.stats
    st = _GroupStats(groups)
    for a, b in _strips(src.height, ctx.strip_rows):
        st.update(src.rows(a, b))
    src.clear()
    return st


def _materialize(node: _Source, ctx: _Ctx, groups: int | None, into: _Home | None = None,
                 device: torch.device | None = None) -> _Home:
    """Compute ``node`` strip by strip into a stored tensor (``into``'s buffer when given), with GroupNorm stats."""
    strips = _strips(node.height, ctx.strip_rows)
    buf = into.t if into is not None else None
    stats = _GroupStats(groups) if groups and node.channels % groups == 0 else None
    for i, (a, b) in enumerate(strips):
        y = node.rows(a, b)
        if buf is None:
            buf = ctx.alloc((y.shape[0], node.channels, node.height, node.width), device or ctx.home)
        if stats is not None:
            stats.update(y)
        if into is not None and i + 1 < len(strips):
            span = node.span(*strips[i + 1], into)
            if span is not None and span[0] < b:  # rows the next strips still read: keep their originals
                into.saved = (span[0], into.rows(span[0], b).clone())
        buf[:, :, a:b].copy_(y)
        del y
    node.clear()
    if into is not None:
        into.saved = None
    assert buf is not None
    return _Home(buf, ctx, owned=True, stats=stats)


def _resnet(src: _Source, res: Any, ctx: _Ctx, groups: int) -> _Home:
    st1 = _stats_of(src, res.norm1.num_groups, ctx)
    c1 = _Conv3x3(src, res.conv1, ctx, pre=(res.norm1, st1, res.nonlinearity))
    st2 = _stats_of(c1, res.norm2.num_groups, ctx)
    c2 = _Conv3x3(c1, res.conv2, ctx, pre=(res.norm2, st2, res.nonlinearity))
    node = _Residual(src, c2, res.conv_shortcut, float(res.output_scale_factor), ctx)
    inplace = (isinstance(src, _Home) and src.owned and res.conv_shortcut is None
               and node.channels == src.channels and node.height == src.height)
    return _materialize(node, ctx, groups, into=src if inplace else None)


def _attention(src: _Home, attn: nn.Module, ctx: _Ctx, groups: int) -> _Home:
    """Run the attention module itself on the whole (latent-resolution) map: exact by construction."""
    mod = attn
    p = next(attn.parameters(), None)
    if p is not None and (p.device != ctx.compute or p.dtype != ctx.dtype):
        mod = copy.deepcopy(attn).to(device=ctx.compute, dtype=ctx.dtype)
    y = mod(src.t.to(ctx.compute))
    stats = None
    if y.shape[1] % groups == 0:
        stats = _GroupStats(groups)
        for a, b in _strips(y.shape[2], ctx.strip_rows):
            stats.update(y[:, :, a:b])
    return _Home(y.to(ctx.home), ctx, owned=True, stats=stats)


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


def _default_home_device(vae: Any, compute: torch.device, latents: torch.Tensor, dtype: torch.dtype,
                         strip_rows: int) -> torch.device:
    """Keep the stored maps on the accelerator when they and the working set fit with room to spare, else CPU."""
    if compute.type == "cpu":
        return compute
    free = _free_device_bytes(compute)
    if free is None:
        return torch.device("cpu")
    cfg = _config(vae)
    boc = list(cfg["block_out_channels"])
    b, _, lh, lw = latents.shape
    es = _dtype_bytes(dtype)
    home = _tiled_home_bytes(vae, lh, lw, dtype, b)
    attn = 8 * boc[-1] * b * lh * lw * es
    full_w = lw * 2 ** (len(boc) - 1)
    strips = 16 * max(boc[:2]) * b * (strip_rows + 6) * full_w * 4  # a few fp32 strip temporaries
    return compute if home + max(attn, strips) < 0.8 * free else torch.device("cpu")


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
    home = (torch.device(home_device) if home_device is not None
            else _default_home_device(vae, compute, latents, dtype, strip_rows))
    ctx = _Ctx(compute, home, dtype, strip_rows)
    groups = dec.conv_norm_out.num_groups

    z = latents.to(device=compute, dtype=dtype)
    pqc = getattr(vae, "post_quant_conv", None)
    if pqc is not None:
        z = F.conv2d(z, ctx.w(pqc.weight), ctx.w(pqc.bias))
    x: _Source = _Home(z.to(home), ctx, owned=False)
    del z

    x = _materialize(_Conv3x3(x, dec.conv_in, ctx), ctx, groups)
    mid = dec.mid_block
    x = _resnet(x, mid.resnets[0], ctx, groups)
    for attn, res in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            assert isinstance(x, _Home)
            x = _attention(x, attn, ctx, groups)
        x = _resnet(x, res, ctx, groups)
    for ub in dec.up_blocks:
        for res in ub.resnets:
            x = _resnet(x, res, ctx, groups)
        for up in ub.upsamplers or []:
            conv = up.conv if up.name == "conv" else up.Conv2d_0
            x = _Cached(_Conv3x3(x, conv, ctx, upsample=True))  # recomputed by its consumer, never stored

    st = _stats_of(x, dec.conv_norm_out.num_groups, ctx)
    head = _Conv3x3(x, dec.conv_out, ctx, pre=(dec.conv_norm_out, st, dec.conv_act))
    return _materialize(head, ctx, None, device=compute).t


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
