"""One-pass dequantization of the frozen base weight: NF4 (bitsandbytes layout) and FP8 (optimum-quanto layout).

Both kernels are bit-exact with the owning library: fp32 products in the library's order, no FMA contraction
(`enable_fp_fusion=False`; bitsandbytes multiplies and adds the nested absmax in two separate kernels), one
round-to-nearest-even into the output dtype.

The launches are registered as torch.library custom ops (`torch.ops.urae_lite.nf4_dequantize`,
`nf4_dequantize_into`, `fp8_dequantize`, `fp8_dequantize_into`) with fake implementations, so FakeTensorMode
and torch.compile trace through them; each launch runs on its tensors' device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .triton_utils import check_launchable, device_guard, interpreting, round_to

NF4_BLOCK = 64  # the kernel's tile: urae_lite.quant.nf4.NF4_BLOCKSIZE (the format owns it; the tests hold them equal)
_NF4_ROWS = 16 if interpreting() else 64  # quant blocks per program: 64 x 64 elements = 8 KiB of bf16 out
_FP8_TILE = (16, 32) if interpreting() else (32, 256)


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr,  # uint8 (ceil(n / 2),): two codes a byte, element 2i in the high nibble
    absmax_ptr,  # uint8 (n_blocks,): code of each block's absmax in the nested map
    nested_absmax_ptr,  # fp32 (ceil(n_blocks / 256),)
    nested_map_ptr,  # fp32 (256,): bitsandbytes' dynamic map
    offset_ptr,  # fp32 (): mean absmax removed before nesting
    quant_map_ptr,  # fp32 (16,): NF4 levels
    out_ptr,  # (n,) in the output dtype
    n,
    ROWS: tl.constexpr,
):
    # One row = one quant block = 64 elements = 32 bytes; the tile is (ROWS, 32) bytes -> (ROWS, 64) values.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    n_blocks = tl.cdiv(n, 64)
    code = tl.load(absmax_ptr + rows, mask=rows < n_blocks, other=0).to(tl.int32)
    nested = tl.load(nested_absmax_ptr + rows // 256, mask=rows < n_blocks, other=0.0)
    absmax = tl.load(nested_map_ptr + code) * nested + tl.load(offset_ptr)  # (ROWS,)

    byte_idx = rows[:, None] * 32 + tl.arange(0, 32)[None, :]  # (ROWS, 32)
    byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < (n + 1) // 2, other=0).to(tl.int32)
    hi = tl.load(quant_map_ptr + (byte >> 4)) * absmax[:, None]
    lo = tl.load(quant_map_ptr + (byte & 15)) * absmax[:, None]
    values = tl.reshape(tl.join(hi, lo), (ROWS, 64))  # interleave: element 2i <- hi, 2i + 1 <- lo

    elem_idx = rows[:, None] * 64 + tl.arange(0, 64)[None, :]
    tl.store(out_ptr + elem_idx, round_to(values, out_ptr.dtype.element_ty), mask=elem_idx < n)


@triton.jit
def _fp8_dequant_kernel(
    data_ptr,  # uint8 view of float8_e4m3fn (N, K), contiguous
    scale_ptr,  # (N,) per-row scale, any float dtype
    out_ptr,  # (N, K) contiguous
    N,
    K,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    idx = rows[:, None] * K + cols[None, :]
    b = tl.load(data_ptr + idx, mask=mask, other=0).to(tl.uint32)

    # Decode e4m3fn from its bits (exact, and works on GPUs without fp8 conversion instructions, sm < 89):
    # normal: (-1)^s * 2^(e-7) * (1 + m/8) -> fp32 exponent e + 120; subnormal (e = 0): m * 2^-9; 0x7F/0xFF: NaN.
    sign = (b & 0x80) << 24
    bits = tl.where((b & 0x7F) == 0x7F, sign | 0x7FC00000, sign | (((b & 0x7F) << 20) + (120 << 23)))
    subnormal = (b & 7).to(tl.float32) * 0.001953125
    value = tl.where((b & 0x78) == 0, tl.where(sign != 0, -subnormal, subnormal), bits.to(tl.float32, bitcast=True))

    scale = tl.load(scale_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, round_to(value * scale[:, None], out_ptr.dtype.element_ty), mask=mask)


def _check_out(out: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The kernels write `out` flat, in `dtype`."""
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of shape {tuple(shape)}, got "
            f"{out.dtype} {tuple(out.shape)} (contiguous={out.is_contiguous()})"
        )
    return out


# ---- launches (the real implementations of the custom ops below) -------------------------------------------------
def nf4_kernel_args(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_quant_map: torch.Tensor,
    offset: torch.Tensor,
    quant_map: torch.Tensor,
    out: torch.Tensor,
) -> tuple[tuple, dict]:
    """(positional args, meta kwargs) of the NF4 launch; the compile tests build their kernels from this too."""
    args = (
        packed.contiguous().view(torch.uint8),
        absmax.contiguous(),
        nested_absmax.float().contiguous(),
        nested_quant_map.float().contiguous(),
        offset.float(),
        quant_map.float().contiguous(),
        out,
        out.numel(),
    )
    return args, {"ROWS": _NF4_ROWS, "num_warps": 4, "enable_fp_fusion": False}


def fp8_kernel_args(data: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> tuple[tuple, dict]:
    """(positional args, meta kwargs) of the FP8 launch; the compile tests build their kernels from this too."""
    block_n, block_k = _FP8_TILE
    args = (data.contiguous().view(torch.uint8), scale.contiguous().view(-1), out, data.shape[0], data.shape[1])
    return args, {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4, "enable_fp_fusion": False}


def _launch_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_quant_map: torch.Tensor,
    offset: torch.Tensor,
    quant_map: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Dequantize into `out` on the buffers' GPU (Triton launches on the *current* device otherwise)."""
    check_launchable(packed, absmax, nested_absmax, nested_quant_map, offset, quant_map, out)
    if out.numel() == 0:
        return
    grid = (triton.cdiv(triton.cdiv(out.numel(), NF4_BLOCK), _NF4_ROWS),)
    args, meta = nf4_kernel_args(packed, absmax, nested_absmax, nested_quant_map, offset, quant_map, out)
    with device_guard(out.device):
        _nf4_dequant_kernel[grid](*args, **meta)


def _launch_fp8(data: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """Dequantize into `out` on the data's GPU (Triton launches on the *current* device otherwise)."""
    check_launchable(data, scale, out)
    if out.numel() == 0:
        return
    block_n, block_k = _FP8_TILE
    grid = (triton.cdiv(data.shape[0], block_n), triton.cdiv(data.shape[1], block_k))
    args, meta = fp8_kernel_args(data, scale, out)
    with device_guard(out.device):
        _fp8_dequant_kernel[grid](*args, **meta)


# ---- custom ops: what autograd, FakeTensorMode and torch.compile see --------------------------------------------
@torch.library.custom_op("urae_lite::nf4_dequantize", mutates_args=())
def _nf4_dequantize_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_quant_map: torch.Tensor,
    offset: torch.Tensor,
    quant_map: torch.Tensor,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """NF4 buffers -> a new dense `shape` tensor in `dtype`."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    _launch_nf4(packed, absmax, nested_absmax, nested_quant_map, offset, quant_map, out)
    return out


@_nf4_dequantize_op.register_fake
def _(packed, absmax, nested_absmax, nested_quant_map, offset, quant_map, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.custom_op("urae_lite::nf4_dequantize_into", mutates_args=("out",))
def _nf4_dequantize_into_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_quant_map: torch.Tensor,
    offset: torch.Tensor,
    quant_map: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """NF4 buffers -> `out` (a reused workspace; declared mutated, so tracing orders it correctly)."""
    _launch_nf4(packed, absmax, nested_absmax, nested_quant_map, offset, quant_map, out)


@_nf4_dequantize_into_op.register_fake
def _(packed, absmax, nested_absmax, nested_quant_map, offset, quant_map, out):
    return None


@torch.library.custom_op("urae_lite::fp8_dequantize", mutates_args=())
def _fp8_dequantize_op(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 data and row scales -> a new dense tensor in `dtype`."""
    out = torch.empty(data.shape, dtype=dtype, device=data.device)
    _launch_fp8(data, scale, out)
    return out


@_fp8_dequantize_op.register_fake
def _(data, scale, dtype):
    return data.new_empty(data.shape, dtype=dtype)


@torch.library.custom_op("urae_lite::fp8_dequantize_into", mutates_args=("out",))
def _fp8_dequantize_into_op(data: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """FP8 data and row scales -> `out` (declared mutated, so tracing orders it correctly)."""
    _launch_fp8(data, scale, out)


@_fp8_dequantize_into_op.register_fake
def _(data, scale, out):
    return None


# ---- public entry points ------------------------------------------------------------------------------------------
def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_quant_map: torch.Tensor,
    offset: torch.Tensor,
    quant_map: torch.Tensor,
    shape: Sequence[int],
    out: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dense weight of `shape` from bitsandbytes NF4 buffers (blocksize 64, nested absmax), into `out` if given.

    Bit-exact with `bitsandbytes.functional.dequantize_4bit(..., quant_type="nf4")` (which reads its built-in
    NF4 table; `quant_map` is the state's copy of it). `offset` stays a tensor so nothing waits on the host.
    Runs as `torch.ops.urae_lite.nf4_dequantize` (or `nf4_dequantize_into` with `out`).
    """
    n = math.prod(shape)
    if packed.numel() * packed.element_size() < (n + 1) // 2 or absmax.numel() < -(-n // NF4_BLOCK):
        raise ValueError(f"NF4 buffers too small for shape {tuple(shape)}")
    buffers = (packed, absmax, nested_absmax, nested_quant_map, offset, quant_map)
    if out is None:
        return torch.ops.urae_lite.nf4_dequantize(*buffers, [int(d) for d in shape], dtype)
    torch.ops.urae_lite.nf4_dequantize_into(*buffers, _check_out(out, shape, dtype))
    return out


def fp8_dequantize(
    data: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Dense (N, K) weight from quanto qfloat8_e4m3fn (axis 0) data (N, K) and scale (N, 1), into `out` if given.

    Equals quanto's `scale * data.to(scale.dtype)` bit for bit (the e4m3 x bf16 product is exact in fp32, so
    the single rounding to `dtype` is the only one). Runs as `torch.ops.urae_lite.fp8_dequantize` (or
    `fp8_dequantize_into` with `out`).
    """
    if data.dim() != 2 or scale.numel() != data.shape[0]:
        raise ValueError(
            f"fp8 data must be (N, K) with one scale per row, got {tuple(data.shape)} and {tuple(scale.shape)}"
        )
    if out is None:
        return torch.ops.urae_lite.fp8_dequantize(data, scale, dtype)
    torch.ops.urae_lite.fp8_dequantize_into(data, scale, _check_out(out, data.shape, dtype))
    return out
