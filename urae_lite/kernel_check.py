"""Each kernel op run on a device against its plain-PyTorch reference: what the self-check (urae_lite.kernel_verdicts)
and `urae-lite doctor` run before the kernels are trusted on a card nobody tested.

A check makes fresh random inputs on the device, fills the output with NaN (plus one guard row or tail that must stay
NaN) so that an element the kernel forgets or a write past the end shows, runs the kernel through the launch the
layers use, and compares with the reference (kernels/reference.py, or float64 for the GEMMs). Anything the kernel
raises (a Triton compile error such as "out of shared memory" on an unforeseen card, a launch error) is a failed
check with its message; running out of device memory is not the kernel's fault and propagates.

The ops:

* `nf4_dequantize`, `fp8_dequantize`: the base weight's dequantization into the layers' workspace (`out=`).
* `lowrank_forward`: y = x·Wᵀ + (x·Aᵀ)·Bᵀ + bias, the fused GEMM of the adapted linear's forward.
* `lowrank_backward`: dx = dy·W + (dy·B)·A, the same kernel with W read transposed (dA and dB are plain matmuls).

Error bounds (why a correct kernel passes and a wrong one fails):

* Dequantization is bit-exact with the reference (kernels/dequant.py: fp32 products in the libraries' order, no FMA
  contraction, one round-to-nearest-even into the output dtype), so the bound is 0 and one differing bit fails.
* The GEMM computes c = a·wᵀ + l·uᵀ + bias from operands stored in `dtype`, with the intermediate l (x·Aᵀ or dy·B) an
  input made beforehand, so the float64 reference from the same stored values is the exact result. Its error has two
  sources. (1) fp32 accumulation of k = K + R (+1 with bias) terms: products of bf16/fp16 values are exact in fp32
  (8 + 8 and 11 + 11 significand bits), fp32 ones are rounded once (interpreter, `input_precision="ieee"`), and any
  summation order (tiles, rank chunks, tensor-core adders) stays within k·2^-24·S to first order, S = Σ|terms|
  (Higham, Accuracy and Stability of Numerical Algorithms, §3.1); tensor cores truncate in their adders, up to
  twice that, so we allow k·2^-22·S. (2) The one rounding of the fp32 sum into `dtype`: u·|c| with u = 2^-8
  (bf16), 2^-11 (fp16), 2^-24 (fp32), doubled for margin. Per element: |error| ≤ 2u·|ref| + k·2^-22·S. This is a
  worst-case bound: what it catches is a wrong result (a bad tile, mask or stride, a stale or unwritten element: errors
  of the size of the output), not last-bit differences; in bf16 an output 1% off fails it (most of its elements are
  then above their bound: tests/test_kernel_check.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

#: what layers ask `kernel_switch.kernels_enabled` about: two dequantizations, the fused GEMM's forward and backward
OPS: tuple[str, ...] = ("nf4_dequantize", "fp8_dequantize", "lowrank_forward", "lowrank_backward")
DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)

# Doctor's small shapes, odd in every dimension (interpreter tiles are 32, GPU tiles 32-256): every mask is used,
# NF4's last block is partial and its element count odd (a half-filled byte), the rank has a masked second chunk.
SMALL_DEQUANT = (37, 71)  # (N, K)
SMALL_GEMM = (37, 70, 50, 40)  # (M, K, N, R)
# The self-check's shapes: off the tiles too (M, and N against 128- and 256-wide tiles), but multiples of 16 with K
# and N multiples of 64, like FLUX's. Triton compiles one binary per such divisibility pattern, so the check compiles
# and tests the binaries a FLUX run uses (an odd shape would compile a dozen more that no run uses), and rank 16 is
# the 2K LoRA's and the training recipes'.
SELF_CHECK_DEQUANT = (80, 192)
SELF_CHECK_GEMM = (80, 128, 192, 16)
# One FLUX shape: M = 4096 tokens (a 1024² image) against K = 3072 and N = 3072 (attention) or 12288 (MLP).
FLUX_M, FLUX_K, FLUX_NS, FLUX_RANK = 4096, 3072, (3072, 12288), 64

_UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
_ACCUMULATION = 2.0**-22  # per term: fp32 accumulation (2^-24) x 4, for tensor cores' truncating adders
_COMPARE_ELEMENTS = 2**24  # outputs compared in float64 at a time (128 MiB a copy)


@dataclass(frozen=True)
class CheckResult:
    """One op on one device in one dtype: ok when every element is within its bound and nothing raised."""

    op: str
    dtype: str  # "bfloat16", ...
    shape: tuple[int, ...]  # (N, K) for dequantization, (M, K, N, R) for the GEMMs
    ok: bool
    error: float  # max |fused - reference| (inf when the kernel raised or left a NaN)
    bound: float  # the largest per-element bound (error <= bound whenever ok)
    fused_ms: float | None = None  # median time of the kernel (None: not timed)
    reference_ms: float | None = None  # median time of the plain-PyTorch reference in `dtype`
    message: str = ""  # why it failed (or "")
    seed: int = 0  # the inputs' seed, to replay a failure

    @property
    def time_ratio(self) -> float | None:
        """fused ÷ reference time (below 1: the kernel is faster)."""
        if not self.fused_ms or not self.reference_ms:
            return None
        return self.fused_ms / self.reference_ms

    def as_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "time_ratio": self.time_ratio}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_op(
    op: str,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    shape: tuple[int, ...] | None = None,
    repeats: int = 0,
    seed: int | None = None,
) -> CheckResult:
    """Run `op` on `device` in `dtype` at `shape` (default: the self-check's) against its reference; with `repeats`
    > 0 also time both (median of that many runs after a warm-up)."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}: one of {', '.join(OPS)}")
    device = torch.device(device)
    shape = tuple(shape or (SELF_CHECK_DEQUANT if op.endswith("dequantize") else SELF_CHECK_GEMM))
    seed = int.from_bytes(os.urandom(4), "little") % 2**31 if seed is None else seed
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with on_device, torch.no_grad(), torch.autocast(device.type, enabled=False):
            return _CHECKS[op](device, dtype, shape, repeats, seed)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # a compile or launch error: the op is not usable on this device
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        return CheckResult(
            op, dtype_name(dtype), shape, False, math.inf, 0.0, message=f"{type(e).__name__}: {first_line}"
        )


# ---- inputs and timing -------------------------------------------------------------------------------------------
def _poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, buffer): `out` of `shape` is the leading part of a NaN-filled buffer one row longer, so the row after
    it is a guard a write past the end would change; `out` keeps the strides of a fresh tensor."""
    buffer = torch.full((shape[0] + 1, *shape[1:]), float("nan"), dtype=dtype, device=device)
    return buffer[: shape[0]], buffer


def _guard_written(buffer: torch.Tensor, rows: int) -> bool:
    return not bool(buffer[rows:].isnan().all())


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float | None:
    """Median milliseconds of `fn` over `repeats` runs after one warm-up (CUDA events on a GPU)."""
    if repeats <= 0:
        return None
    fn()
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


# ---- dequantization: bit-exact -----------------------------------------------------------------------------------
def _exact(
    op: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    got: torch.Tensor,
    buffer: torch.Tensor,
    ref: torch.Tensor,
    times: tuple[float | None, float | None],
    seed: int,
) -> CheckResult:
    """Bit-for-bit comparison (NaN left in `got` is an element never written)."""
    guard = _guard_written(buffer, shape[0])
    unwritten = int(got.isnan().sum())
    differ = int((got.view(-1).view(_int_view(dtype)) != ref.view(-1).view(_int_view(dtype))).sum())
    error = math.inf if unwritten or guard else float((got.double() - ref.double()).abs().max())
    message = ""
    if unwritten:
        message = f"{unwritten} elements never written"
    elif guard:
        message = "wrote past the end of its output"
    elif differ:
        message = f"{differ} of {got.numel()} elements differ from the reference"
    ok = not (unwritten or guard or differ)
    return CheckResult(op, dtype_name(dtype), shape, ok, error, 0.0, *times, message, seed)


def _int_view(dtype: torch.dtype) -> torch.dtype:
    return {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]


def _check_nf4(
    device: torch.device, dtype: torch.dtype, shape: tuple[int, ...], repeats: int, seed: int
) -> CheckResult:
    from urae_lite.kernels import nf4_dequantize
    from urae_lite.kernels.reference import nf4_dequantize_ref

    g = _generator(device, seed)
    n = math.prod(shape)
    blocks = -(-n // 64)

    def rand_bytes(count: int) -> torch.Tensor:
        return torch.randint(0, 256, (count,), generator=g, device=device, dtype=torch.int32).to(torch.uint8)

    # Any byte is a valid pair of codes and any map a valid table: the kernel's arithmetic does not depend on them.
    buffers = (
        rand_bytes((n + 1) // 2).reshape(-1, 1),  # packed codes, as QuantizedWeight stores them
        rand_bytes(blocks),  # absmax codes
        torch.rand(-(-blocks // 256), generator=g, device=device) + 0.5,  # nested absmax
        torch.randn(256, generator=g, device=device),  # nested map
        torch.randn((), generator=g, device=device) * 0.1,  # offset
        torch.randn(16, generator=g, device=device),  # NF4 levels
    )
    out, buffer = _poisoned(shape, dtype, device)
    got = nf4_dequantize(*buffers, shape, out=out, dtype=dtype)
    ref = nf4_dequantize_ref(*buffers, shape, dtype=dtype)
    times = (
        _time_ms(lambda: nf4_dequantize(*buffers, shape, out=out, dtype=dtype), device, repeats),
        _time_ms(lambda: nf4_dequantize_ref(*buffers, shape, dtype=dtype), device, repeats),
    )
    return _exact("nf4_dequantize", dtype, shape, got, buffer, ref, times, seed)


def _check_fp8(
    device: torch.device, dtype: torch.dtype, shape: tuple[int, ...], repeats: int, seed: int
) -> CheckResult:
    from urae_lite.kernels import fp8_dequantize
    from urae_lite.kernels.reference import fp8_dequantize_ref

    g = _generator(device, seed)
    bits = torch.randint(0, 256, shape, generator=g, device=device, dtype=torch.int32)
    bits = torch.where((bits & 0x7F) == 0x7F, bits - 1, bits)  # no NaN codes: a NaN out must mean "never written"
    data = bits.to(torch.uint8).view(torch.float8_e4m3fn)
    scale = (torch.randn(shape[0], 1, generator=g, device=device) * 0.01).to(dtype)  # quanto: absmax / 448
    out, buffer = _poisoned(shape, dtype, device)
    got = fp8_dequantize(data, scale, out=out, dtype=dtype)
    ref = fp8_dequantize_ref(data, scale, dtype)
    times = (
        _time_ms(lambda: fp8_dequantize(data, scale, out=out, dtype=dtype), device, repeats),
        _time_ms(lambda: fp8_dequantize_ref(data, scale, dtype), device, repeats),
    )
    return _exact("fp8_dequantize", dtype, shape, got, buffer, ref, times, seed)


# ---- the fused GEMM: within the bound of its error analysis -----------------------------------------------------
def _within_bound(
    op: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    got: torch.Tensor,
    buffer: torch.Tensor,
    operands: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    times: tuple[float | None, float | None],
    seed: int,
) -> CheckResult:
    """`got` = a·wᵀ + l·uᵀ + bias against float64 from the same stored operands (module docstring: the bound), in
    row blocks of at most 2^24 outputs, so that a FLUX shape's float64 copies fit beside the operands."""
    a, w, l, u, bias = operands
    w64, u64 = w.double(), u.double()
    w_abs, u_abs = w64.abs(), u64.abs()
    bias64 = None if bias is None else bias.double()
    k = a.shape[1] + l.shape[1] + (bias is not None)
    rows = max(1, _COMPARE_ELEMENTS // got.shape[1])
    error, bound_max, over = 0.0, 0.0, 0
    worst = (-1.0, 0, 0.0, 0.0)  # (error / bound, flat index, error, bound) of the worst element
    for start in range(0, got.shape[0], rows):
        a64, l64 = a[start : start + rows].double(), l[start : start + rows].double()
        ref = a64 @ w64.t() + l64 @ u64.t()
        terms = a64.abs() @ w_abs.t() + l64.abs() @ u_abs.t()
        if bias64 is not None:
            ref, terms = ref + bias64, terms + bias64.abs()
        bound = 2 * _UNIT_ROUNDOFF[dtype] * ref.abs() + k * _ACCUMULATION * terms
        err = (got[start : start + rows].double() - ref).abs().nan_to_num(nan=math.inf)
        over += int((err > bound).sum())
        error, bound_max = max(error, float(err.max())), max(bound_max, float(bound.max()))
        ratio = (err / bound).flatten()
        i = int(ratio.argmax())
        if ratio[i] > worst[0]:
            worst = (float(ratio[i]), start * got.shape[1] + i, float(err.flatten()[i]), float(bound.flatten()[i]))
    unwritten = int(got.isnan().sum())
    guard = _guard_written(buffer, got.shape[0])
    message = ""
    if unwritten:
        message = f"{unwritten} elements never written (or not finite)"
    elif guard:
        message = "wrote past the end of its output"
    elif over:
        row, col = divmod(worst[1], got.shape[1])
        message = (
            f"{over} of {got.numel()} elements above their bound, worst [{row}, {col}]: "
            f"error {worst[2]:.3g} > bound {worst[3]:.3g}"
        )
    ok = not (unwritten or guard or over)
    error = math.inf if unwritten or guard else error
    return CheckResult(op, dtype_name(dtype), shape, ok, error, bound_max, *times, message, seed)


def _gemm_operands(
    device: torch.device, dtype: torch.dtype, shape: tuple[int, ...], seed: int
) -> tuple[torch.Tensor, ...]:
    """x (M, K), W (N, K), A (R, K), B (N, R), bias (N,), dy (M, N) at unit-gain scales, in `dtype`."""
    M, K, N, R = shape
    g = _generator(device, seed)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=g, device=device) * scale).to(dtype)

    return (
        randn(M, K),
        randn(N, K, scale=K**-0.5),
        randn(R, K, scale=K**-0.5),
        randn(N, R, scale=R**-0.5),
        randn(N),
        randn(M, N, scale=N**-0.5),
    )


def _check_forward(
    device: torch.device, dtype: torch.dtype, shape: tuple[int, ...], repeats: int, seed: int
) -> CheckResult:
    from urae_lite.kernels import lowrank_forward
    from urae_lite.kernels.lowrank_gemm import gemm_lowrank
    from urae_lite.kernels.reference import lowrank_forward_ref

    x, w, A, B, bias, _ = _gemm_operands(device, dtype, shape, seed)
    xa = x @ A.t()  # the intermediate the forward op makes (cuBLAS), rounded to dtype: an input of the kernel
    out, buffer = _poisoned((x.shape[0], w.shape[0]), dtype, device)
    gemm_lowrank(x, w, xa, B, bias, out=out)  # the forward op's launch, into a poisoned buffer
    times = (
        _time_ms(lambda: lowrank_forward(x, w, A, B, bias), device, repeats),
        _time_ms(lambda: lowrank_forward_ref(x, w, A, B, bias), device, repeats),
    )
    return _within_bound("lowrank_forward", dtype, shape, out, buffer, (x, w, xa, B, bias), times, seed)


def _check_backward(
    device: torch.device, dtype: torch.dtype, shape: tuple[int, ...], repeats: int, seed: int
) -> CheckResult:
    from urae_lite.kernels.lowrank_gemm import gemm_lowrank

    x, w, A, B, _, dy = _gemm_operands(device, dtype, shape, seed)
    dyB = dy @ B  # the intermediate the backward makes (cuBLAS), rounded to dtype
    out, buffer = _poisoned(x.shape, dtype, device)
    gemm_lowrank(dy, w.t(), dyB, A.t(), out=out)  # the backward's dx launch (W read transposed), poisoned
    times = (
        _time_ms(lambda: torch.ops.urae_lite.lowrank_dx(dy, w, dyB, A), device, repeats),
        _time_ms(lambda: dy @ w + dyB @ A, device, repeats),
    )
    return _within_bound("lowrank_backward", dtype, shape, out, buffer, (dy, w.t(), dyB, A.t(), None), times, seed)


_CHECKS: dict[str, Callable[[torch.device, torch.dtype, tuple[int, ...], int, int], CheckResult]] = {
    "nf4_dequantize": _check_nf4,
    "fp8_dequantize": _check_fp8,
    "lowrank_forward": _check_forward,
    "lowrank_backward": _check_backward,
}


def shapes(op: str, which: str) -> list[tuple[int, ...]]:
    """The shapes `op` is checked at: `small` (odd), `self-check` or `flux` (K = 3072 against N = 3072 and 12288,
    M = 4096 for the GEMMs)."""
    dequant = op.endswith("dequantize")
    if which == "small":
        return [SMALL_DEQUANT if dequant else SMALL_GEMM]
    if which == "self-check":
        return [SELF_CHECK_DEQUANT if dequant else SELF_CHECK_GEMM]
    if which == "flux":
        return [(n, FLUX_K) if dequant else (FLUX_M, FLUX_K, n, FLUX_RANK) for n in FLUX_NS]
    raise ValueError(f"unknown shape set {which!r}: small, self-check or flux")
