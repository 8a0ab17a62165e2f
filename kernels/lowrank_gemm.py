"""GEMM with the adapter's up-projection folded into the accumulator: C = A·Wᵀ + L·Uᵀ + bias, stored once.

Forward:  y  (M, N) = x  (M, K) · W (N, K)ᵀ + xa  (M, R) · B (N, R)ᵀ + bias,  xa  = x · Aᵀ
Backward: dx (M, K) = dy (M, N) · W (N, K)  + dyB (M, R) · A (R, K),         dyB = dy · B
          dA (R, K) = dyBᵀ · x,  dB (N, R) = dyᵀ · xa   (trainable prefix of R only)

The frozen base weight W comes in dense (dequantized once per call): at FLUX's M (4.6k-66k tokens) a
tensor-core GEMM over a dequantized tile beats decoding NF4 inside the K loop. The skinny products (M x R and
R x K) are memory-bound reads of x / dy and go to cuBLAS; the fused part saves writing and re-reading the
(M, N) output that a separate `y += xa · Bᵀ` would cost.

Tiles are autotuned per (power-of-two bucket of M, N, K, layout, rank chunk), only among the configs whose
shared memory fits the device (consumer cards allow ~99 KiB a block, A100 163 KiB, H100 227 KiB), and timed
without Triton's 256 MiB L2-flush buffer. The rank R of stacked adapters is unbounded: the kernel walks it in
chunks of at most BLOCK_R_MAX, so shared memory does not grow with R.

The launches are registered as torch.library custom ops (`torch.ops.urae_lite.gemm_lowrank`,
`lowrank_forward`, `lowrank_dx`, `gemm_lowrank_into`) with fake implementations, so FakeTensorMode and
torch.compile trace through them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemm_tuning import (  # noqa: F401  (re-exported: tests and the compile checks read them here)
    BLOCK_R_MAX,
    MAX_TUNED,
    _autotune_options,
    _bench,
    _early_prune,
    block_r,
    device_smem_limit,
    gemm_configs,
    gpu_configs,
    m_bucket,
    prune_configs,
    smem_estimate,
)
from .triton_utils import check_launchable, device_guard, interpreting, round_to


@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr):
    """acc + a·b; exact fp32 products (ieee) for fp32 inputs and in the interpreter, whose bf16 dot is wrong."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.autotune(
    configs=gemm_configs(),
    key=["M_BUCKET", "N", "K", "stride_wk", "HAS_LOWRANK", "BLOCK_R"],
    prune_configs_by={"early_config_prune": _early_prune},
    **_autotune_options(),
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _gemm_lowrank_kernel(
    a_ptr,
    w_ptr,
    l_ptr,
    u_ptr,
    bias_ptr,
    c_ptr,  # a (M, K), w (N, K), l (M, R), u (N, R), bias (N,), c (M, N)
    M,
    N,
    K,
    R,
    M_BUCKET,  # autotune key only (m_bucket(M)); unused by the kernel
    stride_am,
    stride_ak,
    stride_wn,
    stride_wk,
    stride_lm,
    stride_lr,
    stride_un,
    stride_ur,
    stride_cm,
    stride_cn,
    HAS_LOWRANK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rank chunk (block_r(R)): a power of two >= 16 (tl.dot's minimum), tail masked
    FP32_DOT: tl.constexpr,  # interpreter (its bf16 dot is wrong) or fp32 inputs: exact fp32 products
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles walk the N tiles together so W tiles stay in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_m
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped indices keep loads in bounds without masks (and stay contiguous when M, N are multiples of 16);
    # the store masks the wrapped rows/cols away. Rows are int64 (M x K passes 2^31 at 4K, batch 2); cols stay
    # int32 (the weight has < 2^31 elements), which keeps them contiguous for vector loads of W.t() in backward.
    rows = (offs_m % M).to(tl.int64)
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn  # (BLOCK_K, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = _dot(a, w, acc, FP32_DOT)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if HAS_LOWRANK:  # up-projection into the same accumulator: one rounding, one store
        offs_r = tl.arange(0, BLOCK_R)
        l_ptrs = l_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr  # (BLOCK_M, BLOCK_R)
        u_ptrs = u_ptr + offs_r[:, None] * stride_ur + cols[None, :] * stride_un  # (BLOCK_R, BLOCK_N)
        # Rank chunks, not pipelined (num_stages=1): one L and one U tile in shared memory at any R.
        for r in tl.range(0, tl.cdiv(R, BLOCK_R), num_stages=1):
            r_left = R - r * BLOCK_R
            l = tl.load(l_ptrs, mask=offs_r[None, :] < r_left, other=0.0)
            u = tl.load(u_ptrs, mask=offs_r[:, None] < r_left, other=0.0)
            acc = _dot(l, u, acc, FP32_DOT)
            l_ptrs += BLOCK_R * stride_lr
            u_ptrs += BLOCK_R * stride_ur
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]

    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptrs, round_to(acc, c_ptr.dtype.element_ty), mask=mask)


def _shape_error(**operands: torch.Tensor | None) -> ValueError:
    listed = ", ".join(f"{k} {None if t is None else tuple(t.shape)}" for k, t in operands.items())
    return ValueError(f"shapes do not chain: {listed}")


def _check_dtypes(*tensors: torch.Tensor) -> None:
    """The kernel reads every operand in one dtype."""
    if len({t.dtype for t in tensors}) != 1:
        raise ValueError(f"operands must share a dtype, got {', '.join(str(t.dtype) for t in tensors)}")


def _check_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    l: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
) -> None:
    """c = a·wᵀ + l·uᵀ + bias: shapes must chain (the kernel trusts them)."""
    (M, K), (N, R) = a.shape, u.shape
    if (
        w.shape != (N, K)
        or l.shape != (M, R)
        or (bias is not None and bias.shape != (N,))
        or (out is not None and out.shape != (M, N))
    ):
        raise _shape_error(a=a, w=w, l=l, u=u, bias=bias, out=out)
    _check_dtypes(a, w, l, u)


def _check_forward(
    x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """y = x·weightᵀ + (x·Aᵀ)·Bᵀ + bias: shapes must chain."""
    K, (N, R) = x.shape[1], B.shape
    if weight.shape != (N, K) or A.shape != (R, K) or (bias is not None and bias.shape != (N,)):
        raise _shape_error(x=x, weight=weight, A=A, B=B, bias=bias)
    _check_dtypes(x, weight, A, B)


def kernel_args(
    a: torch.Tensor, w: torch.Tensor, l: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> tuple[tuple, dict]:
    """(positional args, constexpr kwargs) of the kernel launch for these operands; the compile tests build
    their kernels from this too, so they compile what a launch would."""
    (M, K), (N, R) = a.shape, u.shape
    args = (
        a,
        w,
        l if R else a,
        u if R else a,
        bias if bias is not None else out,
        out,
        M,
        N,
        K,
        R,
        m_bucket(M),
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        l.stride(0),
        l.stride(1),
        u.stride(0),
        u.stride(1),
        out.stride(0),
        out.stride(1),
    )
    meta = {
        "HAS_LOWRANK": R > 0,
        "HAS_BIAS": bias is not None,
        "BLOCK_R": block_r(R),
        "FP32_DOT": interpreting() or a.dtype == torch.float32,
        "enable_fp_fusion": False,
    }
    return args, meta


def _launch_gemm(
    a: torch.Tensor, w: torch.Tensor, l: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> None:
    """Run the kernel into `out` on the operands' GPU (Triton launches on the *current* device otherwise)."""
    check_launchable(a, w, l, u, out)
    M, N = out.shape
    if M == 0 or N == 0:
        return

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args, meta = kernel_args(a, w, l, u, bias, out)
    with device_guard(out.device):
        _gemm_lowrank_kernel[grid](*args, **meta)


# ---- custom ops: what autograd, FakeTensorMode and torch.compile see --------------------------------------------
@torch.library.custom_op("urae_lite::gemm_lowrank", mutates_args=())
def _gemm_lowrank_op(
    a: torch.Tensor, w: torch.Tensor, l: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """c = a·wᵀ + l·uᵀ + bias into a new (M, N) tensor."""
    out = torch.empty((a.shape[0], w.shape[0]), dtype=a.dtype, device=a.device)
    _launch_gemm(a, w, l, u, bias, out)
    return out


@_gemm_lowrank_op.register_fake
def _(a, w, l, u, bias):
    return a.new_empty((a.shape[0], w.shape[0]))


@torch.library.custom_op("urae_lite::gemm_lowrank_into", mutates_args=("out",))
def _gemm_lowrank_into_op(
    a: torch.Tensor, w: torch.Tensor, l: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> None:
    """c = a·wᵀ + l·uᵀ + bias written into `out` (declared mutated, so tracing orders it correctly)."""
    _launch_gemm(a, w, l, u, bias, out)


@_gemm_lowrank_into_op.register_fake
def _(a, w, l, u, bias, out):
    return None


@torch.library.custom_op("urae_lite::lowrank_forward", mutates_args=())
def _lowrank_forward_op(
    x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa) of the adapted linear's forward: xa = x·Aᵀ by cuBLAS, y by the fused kernel."""
    xa = x @ A.t()  # (M, R): skinny, memory-bound read of x
    y = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    _launch_gemm(x, weight, xa, B, bias, y)
    return y, xa


@_lowrank_forward_op.register_fake
def _(x, weight, A, B, bias):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], A.shape[0]))


@torch.library.custom_op("urae_lite::lowrank_dx", mutates_args=())
def _lowrank_dx_op(dy: torch.Tensor, weight: torch.Tensor, dyB: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """dx = dy·W + dyB·A: the backward's form of the fused GEMM (dyB = dy·B comes in, dA reuses it)."""
    dx = torch.empty((dy.shape[0], weight.shape[1]), dtype=dy.dtype, device=dy.device)
    _launch_gemm(dy, weight.t(), dyB, A.t(), None, dx)  # W (N, K) read as (K, N): no transposed copy
    return dx


@_lowrank_dx_op.register_fake
def _(dy, weight, dyB, A):
    return dy.new_empty((dy.shape[0], weight.shape[1]))


# ---- public entry points ------------------------------------------------------------------------------------------
def gemm_lowrank(
    a: torch.Tensor,
    w: torch.Tensor,
    l: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """c (M, N) = a (M, K) · w (N, K)ᵀ + l (M, R) · u (N, R)ᵀ + bias (N,); any strides (pass `W.t()` views)."""
    _check_gemm(a, w, l, u, bias, out)
    if out is None:
        return torch.ops.urae_lite.gemm_lowrank(a, w, l, u, bias)
    torch.ops.urae_lite.gemm_lowrank_into(a, w, l, u, bias, out)
    return out


def lowrank_forward(
    x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (M, N) = x (M, K) · weight (N, K)ᵀ + (x · A (R, K)ᵀ) · B (N, R)ᵀ + bias.

    Returns (y, xa): xa (M, R) is kept for the backward pass (R/K the size of x)."""
    _check_forward(x, weight, A, B, bias)
    return torch.ops.urae_lite.lowrank_forward(x, weight, A, B, bias)


def lowrank_backward(
    dy: torch.Tensor,
    x: torch.Tensor | None,
    xa: torch.Tensor | None,
    weight: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    n_trainable: int,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dA, dB) of `lowrank_forward` for dy (M, N); dA / dB are zero outside the trainable rank prefix
    [0, n_trainable) and None when not needed (x only needed for dA, xa only for dB, weight only for dx)."""
    R = A.shape[0]
    t = n_trainable
    dyB = dy @ B if (need_dx or need_dA) else None  # (M, R)
    dx = torch.ops.urae_lite.lowrank_dx(dy, weight, dyB, A) if need_dx else None  # (M, K)
    dA = dB = None
    if need_dA:
        dA = dyB.t() @ x if t == R else torch.cat([dyB[:, :t].t() @ x, x.new_zeros(R - t, x.shape[1])])
    if need_dB:
        dB = dy.t() @ xa if t == R else torch.cat([dy.t() @ xa[:, :t], dy.new_zeros(dy.shape[1], R - t)], dim=1)
    return dx, dA, dB
