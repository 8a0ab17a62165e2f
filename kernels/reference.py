"""Plain-PyTorch statements of what the kernels compute; the tests hold the kernels to these.

They run in whatever dtype they are given (the tests pass float64 for the GEMMs). The dequantizations
follow the libraries' arithmetic order so that they, too, are bit-exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def nf4_dequantize_ref(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_quant_map: torch.Tensor,
    offset: torch.Tensor,
    quant_map: torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """w[i] = quant_map[code_i] * (nested_quant_map[absmax[i // 64]] * nested_absmax[i // 16384] + offset),
    all fp32, rounded once to `dtype`; code_{2j} is the high nibble of byte j."""
    n = math.prod(shape)
    byte = packed.reshape(-1).view(torch.uint8).long()
    codes = torch.stack([byte >> 4, byte & 15], dim=1).reshape(-1)[:n]  # (n,)
    blocks = torch.arange(absmax.numel(), device=absmax.device)
    real_absmax = nested_quant_map.float()[absmax.long()] * nested_absmax.float()[blocks // 256]
    real_absmax = real_absmax + offset.float()  # separate add, as bitsandbytes does (no FMA)
    w = quant_map.float()[codes] * real_absmax.repeat_interleave(64)[:n]
    return w.to(dtype).reshape(tuple(shape))


def fp8_dequantize_ref(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """quanto's qfloat8 dequantization: data (N, K) e4m3fn upcast to the scale dtype, times scale (N, 1)."""
    return (scale * data.to(scale.dtype)).to(dtype)


def lowrank_forward_ref(
    x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y (M, N) = x (M, K) · weight (N, K)ᵀ + (x · A (R, K)ᵀ) · B (N, R)ᵀ + bias (N,)."""
    y = x @ weight.t() + (x @ A.t()) @ B.t()
    return y if bias is None else y + bias


def lowrank_backward_ref(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB) of `lowrank_forward_ref` for dy (M, N), every rank trainable."""
    dyB = dy @ B  # (M, R)
    dx = dy @ weight + dyB @ A  # (M, K)
    dA = dyB.t() @ x  # (R, K)
    dB = dy.t() @ (x @ A.t())  # (N, R)
    return dx, dA, dB
