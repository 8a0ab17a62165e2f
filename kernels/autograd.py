"""Autograd for the adapted linear: the frozen base is re-dequantized in backward, never saved.

Saved for backward: x (only when A trains) and xa = x·Aᵀ (only when B trains), plus the small A and B.
The reference path (F.linear on the dequantized weight) would keep the dense (N, K) weight alive per layer.
Every kernel runs through a `torch.ops.urae_lite` custom op, so the whole function also runs on fake tensors
(FakeTensorMode, torch.compile tracing).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch._guards import detect_fake_mode

from .lowrank_gemm import lowrank_backward


class DequantizableWeight(Protocol):
    """What `adapted_linear` needs from a frozen base (urae_lite.quant.QuantizedWeight provides it)."""

    dense: bool  # stored dense in the compute dtype: no workspace to dequantize into
    dtype: torch.dtype  # dtype `dequantize` produces
    weight: torch.Tensor  # storage buffer; gives the device

    @property
    def shape(self) -> torch.Size: ...  # (N, K)

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor: ...


_workspaces: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _tracing(t: torch.Tensor) -> bool:
    """True under torch.compile or a fake mode: a buffer made now is a fake (or graph) tensor and must not
    enter the global workspace cache, where a later real call would pick it up."""
    return torch.compiler.is_compiling() or detect_fake_mode((t,)) is not None


def _workspace(base: DequantizableWeight) -> torch.Tensor:
    """A flat `base.dtype` buffer of at least the base's size on its device. Real calls share one per device
    (grown to the largest layer and held: FLUX's largest is norm1.linear, 18432 x 3072 bf16 = 108 MiB); kernels
    run in stream order, so a layer's GEMM has read the buffer before the next layer's dequantization writes it.
    Traced calls get a fresh buffer of the same size, so memory accounting still sees it."""
    device, numel = base.weight.device, base.shape.numel()
    if _tracing(base.weight):
        return torch.empty(numel, dtype=base.dtype, device=device)
    key = (device, base.dtype)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        _workspaces.pop(key, None)  # free the old buffer before allocating the larger one
        buf = _workspaces[key] = torch.empty(numel, dtype=base.dtype, device=device)
    return buf


def _dense_weight(base: DequantizableWeight, dtype: torch.dtype) -> torch.Tensor:
    """base as a dense (N, K) `dtype` weight; quantized bases dequantize into the shared workspace."""
    if base.dense:
        w = base.dequantize()
    else:
        w = base.dequantize(out=_workspace(base)[: base.shape.numel()].view(base.shape))
    return w if w.dtype == dtype else w.to(dtype)


class AdaptedLinearFunction(torch.autograd.Function):
    """y (M, N) = x (M, K) · Wᵀ + (x · Aᵀ) · Bᵀ + bias with W = base.dequantize(); 2-D x, all in one dtype.

    Gradients flow to x, A, B, bias; for A and B only the trainable rank prefix [0, n_trainable) is non-zero.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        bias: torch.Tensor | None,
        base: DequantizableWeight,
        n_trainable: int,
    ) -> torch.Tensor:
        y, xa = torch.ops.urae_lite.lowrank_forward(x, _dense_weight(base, x.dtype), A, B, bias)
        need_A, need_B = ctx.needs_input_grad[1:3]
        train_A, train_B = need_A and n_trainable > 0, need_B and n_trainable > 0
        ctx.base, ctx.n_trainable, ctx.train = base, n_trainable, (train_A, train_B)
        ctx.save_for_backward(x if train_A else None, xa if train_B else None, A, B)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, xa, A, B = ctx.saved_tensors
        need_dx, need_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        train_A, train_B = ctx.train
        weight = _dense_weight(ctx.base, dy.dtype) if need_dx else None
        dx, dA, dB = lowrank_backward(dy, x, xa, weight, A, B, ctx.n_trainable, need_dx, train_A, train_B)
        dbias = dy.sum(0) if need_dbias else None
        return dx, dA, dB, dbias, None, None


def adapted_linear(
    x: torch.Tensor,
    base: DequantizableWeight,
    bias: torch.Tensor | None,
    A: torch.Tensor | None,
    B: torch.Tensor | None,
    n_trainable: int,
) -> torch.Tensor:
    """Fused adapted linear for x (..., K) -> (..., N): x·Wᵀ + (x·Aᵀ)·Bᵀ + bias, A (R, K), B (N, R) with the
    slice scales already folded into B and the trainable slices first (rank prefix [0, n_trainable)).
    A = B = None is a layer without adapter (R = 0).

    Computes in the autocast dtype when autocast is on (like F.linear), else in x's dtype.
    """
    N, K = base.shape
    if A is None or B is None:
        A, B = x.new_empty(0, K), x.new_empty(N, 0)
    R = A.shape[0]
    if x.shape[-1] != K or A.shape != (R, K) or B.shape != (N, R) or not 0 <= n_trainable <= R:
        raise ValueError(
            f"adapted_linear: x {tuple(x.shape)}, base {(N, K)}, A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}, n_trainable {n_trainable} do not fit"
        )
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    cast = [None if t is None else t.to(dtype) for t in (x.reshape(-1, K), A, B, bias)]
    y = AdaptedLinearFunction.apply(*cast, base, n_trainable)
    return y.reshape(*x.shape[:-1], N)
