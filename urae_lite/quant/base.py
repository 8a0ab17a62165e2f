"""What every storage format of a frozen base weight provides: the interface `QuantizedWeight`, the planner and the
fake-tensor harness use, so that a format is one class (gpt-fast's one-handler-per-format, with a fixed interface).
"""

from __future__ import annotations

import math

import torch
from torch import nn

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


class QuantFormat:
    """One storage format of an (out_features, in_features) frozen weight. The methods that take `qw` read its
    buffers and `dtype` / `shape` (a urae_lite.quant.QuantizedWeight, which delegates here).

    A subclass names its buffers once in `layout`; the planner's bytes per weight and the harness's fake buffers are
    read from it, so they cannot drift from what `quantize` makes."""

    name: str = ""
    #: stored dense in the compute dtype: nothing to dequantize, so no dequantization workspace either
    dense: bool = False
    #: time of a GEMM on this base relative to bf16 (dequantization into the workspace), for the planner's ranking
    speed: float = 1.0
    #: the kernel op that dequantizes it (urae_lite.kernel_check.OPS), which the kernel switch is asked about
    kernel_op: str | None = None

    # ---- the buffers -------------------------------------------------------------------------------------------
    def layout(self, out_features: int, in_features: int, dtype: torch.dtype) -> Layout:
        """Buffer name -> (shape, dtype) of one weight in this format (`dtype`: the compute dtype)."""
        raise NotImplementedError

    def nbytes(self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes one weight takes in this format: what the planner counts."""
        return sum(
            math.prod(shape) * torch.empty((), dtype=dt).element_size()
            for shape, dt in self.layout(out_features, in_features, dtype).values()
        )

    def empty(self, out_features: int, in_features: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Uninitialised buffers of the layout (the fake-tensor harness gives them fake storage)."""
        return {
            name: torch.empty(shape, dtype=dt)
            for name, (shape, dt) in self.layout(out_features, in_features, dtype).items()
        }

    # ---- what the library does ---------------------------------------------------------------------------------
    def quantize(self, weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The buffers of `weight` (already in `dtype`), made by the library that owns the format."""
        raise NotImplementedError

    def dequantize(self, qw: nn.Module) -> torch.Tensor:
        """The dense weight in `qw.dtype` through the owning library's code (the CPU path, the kernels' reference)."""
        raise NotImplementedError

    def dequantize_kernel(self, qw: nn.Module, out: torch.Tensor | None) -> torch.Tensor:
        """The dense weight through the fused Triton kernel (into `out` when given)."""
        raise NotImplementedError

    # ---- serialization (the key layout diffusers / transformers use for the library's layers) -----------------------
    def state_tensors(self, qw: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def from_state_tensors(
        self, prefix: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """The buffers from serialized tensors (a KeyError names a missing one)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name
