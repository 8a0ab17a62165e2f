"""Float64 references written from the formats' definitions, shared by the tests.

Nothing here calls bitsandbytes, optimum-quanto or urae_lite's decode: the NF4 levels are the published ones, the
e4m3 values come from their bit fields, and every stored tensor is read as plain data. The checks below say what a
correct decode / quantization must satisfy, with error bounds from rounding analysis (unit roundoff u = 2^-p for
a p-bit significand: u = 2^-8 for bf16, 2^-24 for fp32; one round-to-nearest changes a value by at most u of it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256

# The 16 NF4 levels as published with QLoRA (Dettmers et al., 2023, appendix E): the normal-distribution quantiles
# normalized to [-1, 1], with an exact zero. Written out here so the reference owes nothing to bitsandbytes.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# Half the widest gap between neighbouring levels (-1 .. -0.6962): the most a nearest-level rounding can move a value
# normalized by its block's absmax.
NF4_HALF_GAP = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2  # 0.1519...

E4M3_MAX = 448.0
# bitsandbytes' CPU 8-bit blockwise quantizer (the nested absmax) first rounds the normalized value v to a grid of
# 65536 points over [-1, 1] (a lookup table, csrc/cpu_ops.cpp), then takes the map entry nearest that grid point g:
# |g - v| <= h = 1/65535 (half a step), so |m_c - v| <= |m_c - g| + h <= |m_nearest - g| + h <= |m_nearest - v| + 2h.
NESTED_LUT_SLACK = 2.0 / 65535


def unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]


# ---- NF4 --------------------------------------------------------------------------------------------------------
@dataclass
class NF4Tensors:
    """The stored tensors of one NF4 weight (bitsandbytes' layout), whoever made them."""

    packed: torch.Tensor  # uint8, two 4-bit codes per byte, first code in the high nibble, row-major over shape
    absmax: torch.Tensor  # per 64-value block: uint8 codes into nested_map (double quantized) or the float absmax
    quant_map: torch.Tensor  # the 16 levels as stored
    shape: tuple[int, int]
    nested_absmax: torch.Tensor | None = None  # per 256 blocks
    nested_map: torch.Tensor | None = None  # 256 values
    offset: torch.Tensor | None = None  # scalar added back to every decoded absmax

    @classmethod
    def of(cls, qw) -> NF4Tensors:
        """From a urae_lite.quant.QuantizedWeight (its buffers only)."""
        return cls(
            qw.weight, qw.absmax, qw.quant_map, tuple(qw.shape), qw.nested_absmax, qw.nested_quant_map, qw.offset
        )

    @classmethod
    def of_bnb(cls, packed: torch.Tensor, state) -> NF4Tensors:
        """From a bitsandbytes packed weight and its QuantState (its attributes only)."""
        nested = state.state2 if state.nested else None
        return cls(
            packed,
            state.absmax,
            state.code,
            tuple(state.shape),
            None if nested is None else nested.absmax,
            None if nested is None else nested.code,
            None if nested is None else torch.as_tensor(state.offset),
        )

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def codes(self) -> torch.Tensor:
        """The 4-bit code of every weight element, row-major: byte j holds codes 2j (high nibble) and 2j+1."""
        byte = self.packed.reshape(-1).view(torch.uint8).long()
        return torch.stack([byte >> 4, byte & 15], dim=1).reshape(-1)[: self.numel]

    def block_absmax(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each block's absmax in float64 and the magnitude its fp32 computation rounds at: double quantized,
        absmax_b = nested_map[absmax_u8[b]] * nested_absmax[b // 256] + offset."""
        if self.nested_absmax is None:
            a = self.absmax.double()
            return a, a.abs()
        group = torch.arange(self.absmax.numel(), device=self.absmax.device) // NF4_NESTED_BLOCK
        term = self.nested_map.double()[self.absmax.long()] * self.nested_absmax.double()[group]
        offset = self.offset.double()
        return term + offset, term.abs() + offset.abs()

    def decode_float64(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, mag): w_i = NF4_LEVELS[code_i] * absmax_(i // 64) in float64, and |level| * (|nested term| + |offset|),
        the size of what an fp32 decode rounds."""
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float64, device=self.packed.device)[self.codes()]
        absmax, mag = self.block_absmax()
        block = torch.arange(self.numel, device=self.packed.device) // NF4_BLOCK
        return (levels * absmax[block]).reshape(self.shape), (levels.abs() * mag[block]).reshape(self.shape)


def nf4_decode_bound(mag: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far a correct decode (fp32 arithmetic, then one rounding to `dtype`) may be from the float64 value w.

    fp32: t = fl(m * n), a = fl(t + offset), v = fl(level * a): v = level (t(1+d1) + offset)(1+d2)(1+d3), |d| <= u,
    so |v - w| <= u |level| (|m n| + 2 |m n + offset|) + O(u^2) <= 3u mag (the add may cancel: measured against
    mag, not |w|); taken as 4u = 2^-22 for the O(u^2) terms. Rounding to `dtype` adds u_dtype |v|.
    """
    fp32 = 2.0**-22 * mag
    return fp32 + unit_roundoff(dtype) * (w.abs() + fp32)


def nf4_block_absmax_of(w: torch.Tensor) -> torch.Tensor:
    """The exact absmax of each 64-value block of w's row-major flattening (the last block may be partial)."""
    flat = w.double().reshape(-1)
    return torch.nn.functional.pad(flat, (0, -flat.numel() % NF4_BLOCK)).reshape(-1, NF4_BLOCK).abs().amax(1)


def _nearest_excess(value: torch.Tensor, levels: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """|levels[chosen] - value| minus the distance from value to its nearest level (0 for a nearest choice)."""
    distance = (levels[None, :] - value[:, None]).abs()
    return distance.gather(1, chosen[:, None])[:, 0] - distance.min(1).values


def assert_nf4_quantizes(t: NF4Tensors, w: torch.Tensor) -> None:
    """The stored tensors are the NF4 quantization of w (the dense weight as handed to the quantizer), element by
    element: the published levels, every code the level nearest to w_i / absmax_b with absmax_b = max |w| over the
    block, and, double quantized, the offset the mean absmax, the nested absmax the largest |absmax - offset| of its
    256 blocks and every absmax code the nearest nested-map entry to (absmax_b - offset) / nested_absmax, up to
    NESTED_LUT_SLACK (the decoded absmax's actual error enters the weight bound below).

    Slack for the quantizer's fp32 arithmetic: a quotient rounded once moves by <= 2^-24 of itself (<= 1), and
    bitsandbytes compares with decimal midpoints good to ~1e-8: a choice may exceed the nearest distance by 2^-20.
    An off-by-one block, a swapped nibble or another layer's weight puts codes several levels off.
    """
    assert t.quant_map.tolist() == list(NF4_LEVELS), "stored NF4 levels are not the published ones"
    assert t.shape == tuple(w.shape)
    n = t.numel
    true_absmax = nf4_block_absmax_of(w)
    assert t.absmax.numel() == true_absmax.numel() and t.packed.numel() == (n + 1) // 2
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    block = torch.arange(n) // NF4_BLOCK
    scale = true_absmax[block]
    nonzero = scale > 0  # an all-zero block has no direction to round; its decode is checked below
    excess = _nearest_excess((w.double().reshape(-1) / scale.clamp_min(1e-300))[nonzero], levels, t.codes()[nonzero])
    assert excess.max() <= 2.0**-20, f"a code is not its value's nearest NF4 level (off by {excess.max():.3g})"

    if t.nested_absmax is not None:
        nb = true_absmax.numel()
        mean = true_absmax.mean()
        # fp32 sum of nb positive terms: relative error <= nb u (recursive summation), then one division
        assert (t.offset.double() - mean).abs() <= (nb + 1) * 2.0**-24 * mean, "offset is not the mean absmax"
        centred = true_absmax.float() - t.offset.float()  # what the quantizer double-quantizes: one fp32 subtraction
        groups = torch.nn.functional.pad(centred.abs(), (0, -nb % NF4_NESTED_BLOCK)).reshape(-1, NF4_NESTED_BLOCK)
        torch.testing.assert_close(t.nested_absmax.float(), groups.amax(1), rtol=2.0**-23, atol=0)
        group = torch.arange(nb) // NF4_NESTED_BLOCK
        excess = _nearest_excess(
            centred.double() / t.nested_absmax.double()[group], t.nested_map.double(), t.absmax.long()
        )
        slack = NESTED_LUT_SLACK + 2.0**-20
        assert excess.max() <= slack, f"an absmax code is not its value's nearest nested level (off by {excess.max()})"

    # What that means for the weight: |level a_dec - w| <= |level a - w| + |level| |a_dec - a| with |level| <= 1
    decoded, _ = t.decode_float64()
    decoded_absmax, _ = t.block_absmax()
    bound = (NF4_HALF_GAP + 2.0**-20) * scale + (decoded_absmax - true_absmax).abs()[block]
    err = (decoded.reshape(-1) - w.double().reshape(-1)).abs()
    assert (err <= bound).all(), f"decoded weight off by {(err / bound.clamp_min(1e-30)).max():.3g}x its bound"


# ---- FP8 (e4m3fn) ---------------------------------------------------------------------------------------------
def e4m3_float64(data: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn bytes decoded from their bit fields: sign, 4 exponent bits (bias 7), 3 mantissa bits;
    exponent 0 is subnormal (m/8 * 2^-6), S.1111.111 is NaN, there are no infinities."""
    bits = data.reshape(-1).view(torch.uint8).long().reshape(data.shape)
    sign = 1.0 - 2.0 * (bits >> 7).double()
    exponent, mantissa = (bits >> 3) & 15, (bits & 7).double()
    normal = (1.0 + mantissa / 8) * torch.pow(2.0, (exponent - 7).double())
    value = sign * torch.where(exponent == 0, mantissa / 8 * 2.0**-6, normal)
    return torch.where((exponent == 15) & ((bits & 7) == 7), torch.nan, value)


E4M3_VALUES = e4m3_float64(torch.arange(256, dtype=torch.uint8))
E4M3_FINITE = E4M3_VALUES[~E4M3_VALUES.isnan()]


def fp8_decode_float64(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w = e4m3(data) * scale (per output row), exact in float64."""
    return e4m3_float64(data) * scale.double()


def fp8_decode_bound(w: torch.Tensor, scale_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """A correct decode multiplies e4m3 (4 significant bits, exact in any float) by the scale in the scale's dtype
    or fp32 and rounds to `dtype`: at most one rounding of each, u_scale + u_dtype (+ their product) of |w|."""
    us, ud = unit_roundoff(scale_dtype), unit_roundoff(dtype)
    return (us + ud + us * ud) * w.abs()


def assert_fp8_quantizes(data: torch.Tensor, scale: torch.Tensor, w: torch.Tensor) -> None:
    """The stored tensors are the per-row absmax e4m3 quantization of w (as optimum-quanto defines it): scale_r =
    max |w_r| / 448 rounded once to the scale's dtype, and every code the e4m3 value nearest to q = w / scale.

    The quantizer divides in the weight's dtype (one rounding: q' = q (1 + d), |d| <= u), then rounds q' to e4m3, so
    |e - q| <= |e - q'| + |q' - q| <= min_j |e_j - q| + 2u |q|. Per element that is <= 2^-4 |w| (3 mantissa
    bits) + 2u |w| for normal values (|q| >= 2^-6), and half the subnormal spacing (2^-10 scale) below.
    """
    u = unit_roundoff(scale.dtype)
    assert data.dtype == torch.float8_e4m3fn and data.shape == w.shape and scale.shape == (w.shape[0], 1)
    w64 = w.double()
    ideal = w64.abs().amax(1, keepdim=True) / E4M3_MAX
    assert ((scale.double() - ideal).abs() <= u * ideal).all(), "scale is not the row absmax / 448"
    q = (w64 / scale.double()).reshape(-1)
    e = e4m3_float64(data).reshape(-1)
    distance = (E4M3_FINITE[None, :] - q[:, None]).abs()
    excess = (e - q).abs() - distance.min(1).values
    assert (excess <= 2 * u * q.abs() + 1e-300).all(), "a code is not its value's nearest e4m3 value"
    err = (e - q).abs()
    normal = q.abs() >= 2.0**-6
    assert (err[normal] <= (2.0**-4 + 2 * u) * q.abs()[normal]).all()
    assert (err[~normal] <= 2.0**-10 + 2 * u * q.abs()[~normal]).all()


# ---- any stored format ------------------------------------------------------------------------------------------
def decode_float64(qw) -> tuple[torch.Tensor, torch.Tensor]:
    """A QuantizedWeight's dense weight from its buffers in float64, and how far a correct decode to qw.dtype may be
    from it (the bounds above)."""
    if qw.quant.name == "nf4":
        w, mag = NF4Tensors.of(qw).decode_float64()
        return w, nf4_decode_bound(mag, w, qw.dtype)
    if qw.quant.name == "fp8":
        w = fp8_decode_float64(qw.weight, qw.scale)
        return w, fp8_decode_bound(w, qw.scale.dtype, qw.dtype)
    w = qw.weight.double()
    return w, (0.0 if qw.weight.dtype == qw.dtype else unit_roundoff(qw.dtype)) * w.abs()


def assert_quantizes(qw, w: torch.Tensor) -> None:
    """qw holds the quantization of w in its format (bf16: w itself, bit for bit, in the stored dtype)."""
    if qw.quant.name == "nf4":
        assert_nf4_quantizes(NF4Tensors.of(qw), w)
    elif qw.quant.name == "fp8":
        assert_fp8_quantizes(qw.weight, qw.scale, w)
    else:
        assert torch.equal(qw.weight, w.to(qw.weight.dtype))


def assert_decodes(got: torch.Tensor, qw) -> None:
    """`got` (a dequantized weight) is qw's float64 decode within the rounding of a correct decode."""
    expected, bound = decode_float64(qw)
    assert got.shape == expected.shape and torch.isfinite(got).all()
    err = (got.double() - expected).abs()
    assert (err <= bound).all(), f"dequantized weight off by {err.max():.3g} (bound {bound.max():.3g})"


# ---- the adapted linear -----------------------------------------------------------------------------------------
# y = x Wᵀ + bias + (x Aᵀ) Bᵀ evaluated in a compute dtype (u = its unit roundoff) with fp32 accumulation, as the
# library path does it: y1 = x Wᵀ, yb = y1 + bias, xa = x Aᵀ, xab = xa Bᵀ and y = yb + xab are each rounded once to
# the compute dtype, and each GEMM accumulates in fp32. One rounding moves a value by <= u of itself, so the error is
# bounded by u times the magnitudes at those sites (an intermediate's error reaching the output through a later
# product is carried by that product's absolute values), plus k 2^-24 Σ|terms| for an fp32 sum of k terms in any
# order, plus the dequantized weight's own error (references' decode bounds) through |x|. The fused kernel rounds at
# a subset of these sites (xa and the output) and accumulates in fp32, so the same bound covers it. Terms of second
# order (an error rounded again) are < 5u of the first-order ones: a margin of 1.25 covers them. Evaluated at the
# float64 values, these bounds are a few u of each output itself rather than of Σ|terms|, so a dropped bias or
# branch, a wrong weight or a gradient sent to the wrong factor exceed them.
MARGIN = 1.25
ACC = 2.0**-24  # fp32 accumulation, per term


def adapted_linear_float64(x, w64, w_err, bias=None, A=None, B=None, B_err=None, dtype=torch.float32):
    """(y, bound): y = x Wᵀ + bias + (x Aᵀ) Bᵀ in float64 from x (already in the compute dtype), the float64 weight
    and w_err its decode bound, bias, A, B (scales folded in; B_err: the error of B as the layer forms it, e.g.
    s B rounded in the slice dtype); bound: the most a correct evaluation in `dtype` may differ from y."""
    u = unit_roundoff(dtype)
    x64, w64 = x.double(), w64.double()
    ax = x64.abs()
    y1 = x64 @ w64.t()
    sites = y1.abs()
    acc = x.shape[-1] * ax @ w64.abs().t()
    extra = ax @ torch.as_tensor(w_err, dtype=torch.float64).expand_as(w64).t()
    y = y1
    if bias is not None:
        y = y1 + bias.double()
        sites = sites + y.abs()
    if A is not None:
        A64, B64 = A.double(), B.double()
        xa = x64 @ A64.t()
        xab = xa @ B64.t()
        xa_err = u * xa.abs() + ACC * x.shape[-1] * (ax @ A64.abs().t())  # rounding + accumulation of x Aᵀ
        extra = extra + xa_err @ B64.abs().t()
        if B_err is not None:
            extra = extra + xa.abs() @ B_err.double().t()
        acc = acc + A.shape[0] * xa.abs() @ B64.abs().t()
        y = y + xab
        sites = sites + xab.abs() + y.abs()
    return y, MARGIN * (u * sites + ACC * acc + extra)


def adapted_linear_grads_float64(x, dy, w64, w_err, A, B, r, dtype=torch.float32) -> dict:
    """{"dx", "dA", "dB"}: (expected, bound) of the input gradient and of the first r rows of A / columns of B (the
    trainable prefix) for y = x Wᵀ + (x Aᵀ) Bᵀ, from x and dy in the compute dtype (see above for the bounds).

    The library path rounds dy W, dy B, (dy B) A, their sum, (dy B)ᵀ x and dyᵀ (x Aᵀ) (with x Aᵀ rounded in the
    forward); the kernels round a subset of these."""
    u = unit_roundoff(dtype)
    x64, dy64, w64, A64, B64 = x.double(), dy.double(), w64.double(), A.double(), B.double()
    ax, ady = x64.abs(), dy64.abs()
    M, N, K, R = x.shape[0], dy.shape[-1], x.shape[-1], A.shape[0]
    w_err = torch.as_tensor(w_err, dtype=torch.float64).expand_as(w64)

    g1, dyB = dy64 @ w64, dy64 @ B64
    g2 = dyB @ A64
    dx = g1 + g2
    dyB_err = u * dyB.abs() + ACC * N * (ady @ B64.abs())
    acc = N * ady @ w64.abs() + R * dyB.abs() @ A64.abs()
    extra = ady @ w_err + dyB_err @ A64.abs()
    dx_bound = MARGIN * (u * (g1.abs() + g2.abs() + dx.abs()) + ACC * acc + extra)

    dA = dyB[:, :r].t() @ x64
    dA_bound = MARGIN * (u * dA.abs() + ACC * M * dyB[:, :r].abs().t() @ ax + dyB_err[:, :r].t() @ ax)

    xa = x64 @ A64[:r].t()
    xa_err = u * xa.abs() + ACC * K * (ax @ A64[:r].abs().t())
    dB = dy64.t() @ xa
    dB_bound = MARGIN * (u * dB.abs() + ACC * M * ady.t() @ xa.abs() + ady.t() @ xa_err)
    return {"dx": (dx, dx_bound), "dA": (dA, dA_bound), "dB": (dB, dB_bound)}


def assert_bounded(got: torch.Tensor, expected_and_bound: tuple[torch.Tensor, torch.Tensor], what: str = "") -> None:
    expected, bound = expected_and_bound
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got.double().reshape(expected.shape) - expected).abs()
    assert (err <= bound).all(), f"{what}: {(err / bound.clamp_min(1e-300)).max():.3g}x its bound"
