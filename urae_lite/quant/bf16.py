"""bf16: the weight kept dense in the compute dtype (no quantization; the fastest and the largest base)."""

from __future__ import annotations

import torch

from .base import Layout, QuantFormat


class BF16(QuantFormat):
    name = "bf16"
    dense = True
    speed = 1.00

    def layout(self, out_features: int, in_features: int, dtype: torch.dtype) -> Layout:
        return {"weight": ((out_features, in_features), dtype)}

    def quantize(self, weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"weight": weight.contiguous()}

    def dequantize(self, qw) -> torch.Tensor:
        return qw.weight if qw.weight.dtype == qw.dtype else qw.weight.to(qw.dtype)

    def dequantize_kernel(self, qw, out: torch.Tensor | None) -> torch.Tensor:
        w = self.dequantize(qw)
        return w if out is None else out.copy_(w)

    def state_tensors(self, qw, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": qw.weight}

    def from_state_tensors(self, prefix: str, tensors: dict[str, torch.Tensor], shape) -> dict[str, torch.Tensor]:
        return {"weight": tensors[f"{prefix}.weight"]}
