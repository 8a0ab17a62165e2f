"""The building blocks of the exact strip-tiled VAE decode (urae_lite/vae_tiling.py explains the algorithm).

A `Source` produces rows [a, b) of a feature map on the compute device: a stored map (`Home`), a 3x3 conv of
another source with optional GroupNorm + activation before it and nearest 2x upsampling (`Conv3x3`), a residual
sum (`Residual`), or a cache of the last strip (`Cached`). `materialize` streams a source into a stored map strip
by strip and records its GroupNorm statistics (`GroupStats`, merged over strips in float64); `resnet` and
`run_attention` build the decoder's layers from them.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class StripContext:
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


class GroupStats:
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


def norm_act(
    x: torch.Tensor, gn: nn.GroupNorm, stats: GroupStats, act: nn.Module | None, ctx: StripContext
) -> torch.Tensor:
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


class Source:
    height: int
    width: int
    channels: int

    def rows(self, a: int, b: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def span(self, a: int, b: int, target: Home) -> tuple[int, int] | None:
        """Rows of ``target`` that producing rows [a, b) reads (None if it does not read ``target``)."""
        raise NotImplementedError  # pragma: no cover - interface

    def clear(self) -> None:
        """Drop per-pass caches."""


class Home(Source):
    """A stored feature map. ``saved`` holds original rows that an in-place writer already overwrote."""

    def __init__(self, t: torch.Tensor, ctx: StripContext, owned: bool, stats: GroupStats | None = None) -> None:
        self.t, self.ctx, self.owned, self.stats = t, ctx, owned, stats
        self.channels, self.height, self.width = t.shape[1], t.shape[2], t.shape[3]
        self.saved: tuple[int, torch.Tensor] | None = None

    def rows(self, a: int, b: int) -> torch.Tensor:
        if self.saved is not None:
            lo, s = self.saved
            hi = lo + s.shape[2]
            assert a >= lo, "in-place strip order violated"
            if a < hi:
                head = s[:, :, a - lo : min(b, hi) - lo]
                if b <= hi:
                    return head
                return torch.cat([head, self.t[:, :, hi:b].to(self.ctx.compute)], dim=2)
        return self.t[:, :, a:b].to(self.ctx.compute)

    def span(self, a: int, b: int, target: Home) -> tuple[int, int] | None:
        return (a, b) if self is target else None


class Conv3x3(Source):
    """A 3x3 'same' conv of ``src`` rows, with optional GroupNorm+activation before it and nearest 2x upsampling."""

    def __init__(
        self,
        src: Source,
        conv: nn.Conv2d,
        ctx: StripContext,
        pre: tuple[nn.GroupNorm, GroupStats, nn.Module | None] | None = None,
        upsample: bool = False,
    ) -> None:
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
            x = norm_act(x, gn, stats, act, self.ctx)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")[:, :, lo - 2 * slo : hi - 2 * slo]
        top, bottom = lo - (a - 1), (b + 1) - hi  # image borders: the conv's own zero padding
        pad = (1, 1) if top and bottom else (0, 1)
        if top != bottom:
            x = F.pad(x, (0, 0, top, bottom))
        return F.conv2d(x, self.ctx.w(self.conv.weight), self.ctx.w(self.conv.bias), padding=pad)

    def span(self, a: int, b: int, target: Home) -> tuple[int, int] | None:
        _, _, slo, shi = self._in_range(a, b)
        return self.src.span(slo, shi, target)

    def clear(self) -> None:
        self.src.clear()


class Cached(Source):
    """Remembers the last strip of a recomputed map, so a residual's shortcut reuses the rows its conv path made."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.height, self.width, self.channels = inner.height, inner.width, inner.channels
        self._last: tuple[int, int, torch.Tensor] | None = None

    def rows(self, a: int, b: int) -> torch.Tensor:
        if self._last is not None:
            la, lb, t = self._last
            if la <= a and b <= lb:
                return t[:, :, a - la : b - la]
        t = self.inner.rows(a, b)
        self._last = (a, b, t)
        return t

    def span(self, a: int, b: int, target: Home) -> tuple[int, int] | None:
        return self.inner.span(a, b, target)

    def clear(self) -> None:
        self._last = None
        self.inner.clear()


class Residual(Source):
    """``(shortcut(x) + h) / output_scale_factor``, in that order, as ResnetBlock2D computes it."""

    def __init__(self, x: Source, h: Source, shortcut: nn.Conv2d | None, scale: float, ctx: StripContext) -> None:
        self.x, self.h, self.shortcut, self.scale, self.ctx = x, h, shortcut, scale, ctx
        self.height, self.width, self.channels = h.height, h.width, h.channels

    def rows(self, a: int, b: int) -> torch.Tensor:
        h = self.h.rows(a, b)
        x = self.x.rows(a, b)
        if self.shortcut is not None:
            x = F.conv2d(x, self.ctx.w(self.shortcut.weight), self.ctx.w(self.shortcut.bias))
        return (x + h) / self.scale

    def span(self, a: int, b: int, target: Home) -> tuple[int, int] | None:
        spans = [s for s in (self.x.span(a, b, target), self.h.span(a, b, target)) if s is not None]
        if not spans:
            return None
        return min(s[0] for s in spans), max(s[1] for s in spans)

    def clear(self) -> None:
        self.x.clear()
        self.h.clear()


def strip_ranges(height: int, rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + rows, height)) for a in range(0, height, rows)]


def stats_of(src: Source, groups: int, ctx: StripContext) -> GroupStats:
    """GroupNorm statistics of a whole map: reused if recorded when it was stored, else one pass over strips."""
    if isinstance(src, Home) and src.stats is not None and src.stats.groups == groups:
        return src.stats
    st = GroupStats(groups)
    for a, b in strip_ranges(src.height, ctx.strip_rows):
        st.update(src.rows(a, b))
    src.clear()
    return st


def materialize(
    node: Source, ctx: StripContext, groups: int | None, into: Home | None = None, device: torch.device | None = None
) -> Home:
    """Compute ``node`` strip by strip into a stored tensor (``into``'s buffer when given), with GroupNorm stats."""
    strips = strip_ranges(node.height, ctx.strip_rows)
    buf = into.t if into is not None else None
    stats = GroupStats(groups) if groups and node.channels % groups == 0 else None
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
    return Home(buf, ctx, owned=True, stats=stats)


def resnet(src: Source, res: Any, ctx: StripContext, groups: int) -> Home:
    st1 = stats_of(src, res.norm1.num_groups, ctx)
    c1 = Conv3x3(src, res.conv1, ctx, pre=(res.norm1, st1, res.nonlinearity))
    st2 = stats_of(c1, res.norm2.num_groups, ctx)
    c2 = Conv3x3(c1, res.conv2, ctx, pre=(res.norm2, st2, res.nonlinearity))
    node = Residual(src, c2, res.conv_shortcut, float(res.output_scale_factor), ctx)
    inplace = (
        isinstance(src, Home)
        and src.owned
        and res.conv_shortcut is None
        and node.channels == src.channels
        and node.height == src.height
    )
    return materialize(node, ctx, groups, into=src if inplace else None)


def run_attention(src: Home, attn: nn.Module, ctx: StripContext, groups: int) -> Home:
    """Run the attention module itself on the whole (latent-resolution) map: exact by construction."""
    mod = attn
    p = next(attn.parameters(), None)
    if p is not None and (p.device != ctx.compute or p.dtype != ctx.dtype):
        mod = copy.deepcopy(attn).to(device=ctx.compute, dtype=ctx.dtype)
    y = mod(src.t.to(ctx.compute))
    stats = None
    if y.shape[1] % groups == 0:
        stats = GroupStats(groups)
        for a, b in strip_ranges(y.shape[2], ctx.strip_rows):
            stats.update(y[:, :, a:b])
    return Home(y.to(ctx.home), ctx, owned=True, stats=stats)
