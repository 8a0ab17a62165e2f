"""FP8: optimum-quanto's `qfloat8_e4m3fn` with one scale per output row (axis 0), in quanto's plain layout.

`weight` float8_e4m3fn (N, K) and `scale` (N, 1) in the compute dtype, scale = absmax(row) / 448;
w = weight.to(dtype) * scale.
"""

from __future__ import annotations

import torch

from .base import Layout, QuantFormat


class FP8(QuantFormat):
    name = "fp8"
    kernel_op = "fp8_dequantize"
    speed = 1.03  # one multiply per weight on the way into the workspace

    def layout(self, out_features: int, in_features: int, dtype: torch.dtype) -> Layout:
        return {"weight": ((out_features, in_features), torch.float8_e4m3fn), "scale": ((out_features, 1), dtype)}

    def quantize(self, weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        from optimum.quanto import qfloat8_e4m3fn, quantize_weight
        from optimum.quanto.calibrate import absmax_scale

        scale = absmax_scale(weight, qfloat8_e4m3fn, axis=0)
        # optimized=False: quanto's plain layout. With the default, a CUDA GPU of compute capability >= 8 gets a
        # Marlin tensor (int32-packed data, permuted scales, a JIT-built extension) for every FLUX shape, which
        # neither our kernel nor the reference path reads.
        q = quantize_weight(weight, qtype=qfloat8_e4m3fn, axis=0, scale=scale, optimized=False)
        if q._data.dtype != torch.float8_e4m3fn or q._data.shape != weight.shape:
            raise RuntimeError(
                f"optimum-quanto returned {type(q).__name__} with {q._data.dtype} data "
                f"{tuple(q._data.shape)}; urae-lite reads plain e4m3 (N, K)"
            )
        return {"weight": q._data.contiguous(), "scale": q._scale.contiguous()}

    def dequantize(self, qw) -> torch.Tensor:
        """quanto's arithmetic: the e4m3 value upcast to the scale's dtype, times the scale."""
        return qw.weight.to(qw.scale.dtype).mul(qw.scale).to(qw.dtype)

    def dequantize_kernel(self, qw, out: torch.Tensor | None) -> torch.Tensor:
        from urae_lite import kernels

        return kernels.fp8_dequantize(qw.weight, qw.scale, out=out, dtype=qw.dtype)

    def state_tensors(self, qw, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight._data": qw.weight, f"{prefix}.weight._scale": qw.scale}

    def from_state_tensors(self, prefix: str, tensors: dict[str, torch.Tensor], shape) -> dict[str, torch.Tensor]:
        return {"weight": tensors[f"{prefix}.weight._data"], "scale": tensors[f"{prefix}.weight._scale"]}
