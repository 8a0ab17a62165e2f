"""GEMM with the adapter's up-projection folded into the accumulator: C = A·Wᵀ + L·Uᵀ + bias, stored once.

Forward:  y  (M, N) = x  (M, K) · W (N, K)ᵀ + xa  (M, R) · B (N, R)ᵀ + bias,  xa  = x · Aᵀ
Backward: dx (M, K) = dy (M, N) · W (N, K)  + dyB (M, R) · A (R, K),         dyB = dy · B
          dA (R, K) = dyBᵀ · x,  dB (N, R) = dyᵀ · xa   (trainable prefix of R only)

The frozen base weight W comes in dense (dequantized once per call): at FLUX's M (4.6k-66k tokens) a
tensor-core GEMM over a dequantized tile beats decoding NF4 inside the K loop. The skinny products (M x R and
R x K) are memory-bound reads of x / dy and go to cuBLAS; the fused part saves writing and re-reading the
(M, N) output that a separate `y += xa · Bᵀ` would cost.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import check_launchable, interpreting, round_to


def _configs() -> list[triton.Config]:
    """H100-class tiles (bf16 wgmma, <= 227 KiB shared memory); one small config under the interpreter."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]

    def cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                             num_warps=warps, num_stages=stages)

    return [
        cfg(128, 256, 64, 8, 3),
        cfg(256, 128, 64, 8, 3),
        cfg(128, 128, 64, 8, 4),
        cfg(128, 128, 64, 4, 4),
        cfg(64, 256, 64, 4, 4),
        cfg(128, 64, 64, 4, 4),
        cfg(64, 128, 64, 4, 4),
    ]


@triton.autotune(configs=_configs(), key=["M", "N", "K", "stride_wk"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _gemm_lowrank_kernel(
    a_ptr, w_ptr, l_ptr, u_ptr, bias_ptr, c_ptr,  # a (M, K), w (N, K), l (M, R), u (N, R), bias (N,), c (M, N)
    M, N, K, R,
    stride_am, stride_ak, stride_wn, stride_wk, stride_lm, stride_lr, stride_un, stride_ur, stride_cm, stride_cn,
    HAS_LOWRANK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,  # R padded to a power of two >= 16 (tl.dot's minimum), masked
    FP32_DOT: tl.constexpr,  # interpreter (its bf16 dot is wrong) or fp32 inputs: exact fp32 products
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
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
        if FP32_DOT:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if HAS_LOWRANK:  # up-projection into the same accumulator: one rounding, one store
        offs_r = tl.arange(0, BLOCK_R)
        l = tl.load(l_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                    mask=offs_r[None, :] < R, other=0.0)  # (BLOCK_M, BLOCK_R)
        u = tl.load(u_ptr + offs_r[:, None] * stride_ur + cols[None, :] * stride_un,
                    mask=offs_r[:, None] < R, other=0.0)  # (BLOCK_R, BLOCK_N)
        if FP32_DOT:
            acc = tl.dot(l.to(tl.float32), u.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(l, u, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]

    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptrs, round_to(acc, c_ptr.dtype.element_ty), mask=mask)


def gemm_lowrank(
    a: torch.Tensor,
    w: torch.Tensor,
    l: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """c (M, N) = a (M, K) · w (N, K)ᵀ + l (M, R) · u (N, R)ᵀ + bias (N,); any strides (pass `W.t()` views)."""
    check_launchable(a, w, l, u)
    (M, K), (N, R) = a.shape, u.shape
    if w.shape != (N, K) or l.shape != (M, R) or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"shapes do not chain: a {tuple(a.shape)}, w {tuple(w.shape)}, l {tuple(l.shape)}, "
                         f"u {tuple(u.shape)}, bias {None if bias is None else tuple(bias.shape)}")
    if len({a.dtype, w.dtype, l.dtype, u.dtype}) != 1:
        raise ValueError(f"a, w, l, u must share a dtype, got {a.dtype}, {w.dtype}, {l.dtype}, {u.dtype}")
    if out is None:
        out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return out

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _gemm_lowrank_kernel[grid](
        a, w, l if R else a, u if R else a, bias if bias is not None else out, out,
        M, N, K, R,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), l.stride(0), l.stride(1), u.stride(0), u.stride(1),
        out.stride(0), out.stride(1),
        HAS_LOWRANK=R > 0, HAS_BIAS=bias is not None, BLOCK_R=max(16, triton.next_power_of_2(R)),
        FP32_DOT=interpreting() or a.dtype == torch.float32, enable_fp_fusion=False,
    )
    return out


def lowrank_forward(
    x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (M, N) = x (M, K) · weight (N, K)ᵀ + (x · A (R, K)ᵀ) · B (N, R)ᵀ + bias.

    Returns (y, xa): xa (M, R) is kept for the backward pass (R/K the size of x)."""
    xa = x @ A.t()  # (M, R): skinny, memory-bound read of x
    return gemm_lowrank(x, weight, xa, B, bias), xa


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
    dx = gemm_lowrank(dy, weight.t(), dyB, A.t()) if need_dx else None  # (M, K): W (N, K) read as (K, N)
    dA = dB = None
    if need_dA:
        dA = dyB.t() @ x if t == R else torch.cat([dyB[:, :t].t() @ x, x.new_zeros(R - t, x.shape[1])])
    if need_dB:
        dB = dy.t() @ xa if t == R else torch.cat([dy.t() @ xa[:, :t], dy.new_zeros(dy.shape[1], R - t)], dim=1)
    return dx, dA, dB
